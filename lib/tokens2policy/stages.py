"""The pipeline's stages, what each reads and writes, and the rule that skips an up-to-date stage.

A stage is up to date when its last successful run (recorded in the ``stage_runs`` Delta table) saw the same Delta
versions of its input tables and the same config sections, and its outputs still exist. ``--force STAGE`` reruns
it anyway. Each stage's code is ``tokens2policy.<stage>.job.run(spark, config) -> dict``.

Before a stage starts, :func:`check_inputs` turns the usual first-run mistakes into one line that says what to do:
an input table that no stage has written yet (naming the stage that writes it), an empty ``units`` table, a
``<stage>.experiment_id`` with no units. :func:`require_gpu` does the same for a setting that demands a CUDA GPU.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tokens2policy.config import Config


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    sections: Tuple[str, ...]  # config sections whose change makes the stage stale
    requires: Optional[Tuple[str, ...]] = None  # inputs that must exist before it runs (None: all of them)

    @property
    def required_inputs(self) -> Tuple[str, ...]:
        return self.inputs if self.requires is None else self.requires


STAGES: Tuple[Stage, ...] = (
    Stage("ingest", (), ("units", "quarantine"), ("source", "demo", "ingest")),
    Stage("embed", ("units",), ("embeddings", "token_states"), ("embed",)),
    Stage("represent", ("embeddings", "token_states"), ("neurons", "neuron_stats", "neuron_labels"), ("represent",)),
    Stage("identify", ("units", "neurons"), ("modifiers", "selection_trace", "marginal_screen"),
          ("identify", "honesty")),
    Stage("effects", ("units", "neurons", "modifiers"), ("gates", "effects", "calibration"),
          ("effects", "honesty")),
    Stage("policy", ("units", "neurons", "modifiers", "effects"), ("policy_rules", "policy_value", "assignments"),
          ("policy", "effects", "honesty")),
    # the report renders whatever exists and lists the missing tables on the page
    Stage("report", ("units", "modifiers", "gates", "policy_value"), (), ("report",), requires=()),
)
STAGE_NAMES: Tuple[str, ...] = tuple(s.name for s in STAGES)
# Jobs outside the pipeline: run by name, never by `run all`.
EXTRA_STAGES: Tuple[Stage, ...] = (Stage("validate", (), ("validation_runs",), ("validate",)),)
RUNS_TABLE = "stage_runs"


class StageNotBuilt(RuntimeError):
    """The stage's job module does not exist yet."""


class EmptyInputError(RuntimeError):
    """A stage's input holds no units (an empty ``units`` table, or no units of the configured experiment id)."""


# stage settings that restrict a stage to one experiment, and the table whose experiments they must name
EXPERIMENT_SETTINGS: Dict[str, str] = {"represent": "embeddings", "report": "units"}


def get_stage(name: str) -> Stage:
    for stage in STAGES + EXTRA_STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage '{name}'; choose one of: {', '.join(STAGE_NAMES)} or all")


def stage_function(name: str) -> Callable:
    try:
        module = importlib.import_module(f"tokens2policy.{name}.job")
    except ModuleNotFoundError as exc:
        if exc.name == f"tokens2policy.{name}.job":
            raise StageNotBuilt(f"stage '{name}' is not built yet") from None
        raise
    return module.run


def producer_of(table: str, stages: Sequence[Stage] = STAGES + EXTRA_STAGES) -> Optional[str]:
    """The stage that writes ``table`` (None for a table no stage writes)."""
    return next((s.name for s in stages if table in s.outputs), None)


def missing_table_hint(table: str, stages: Sequence[Stage] = STAGES + EXTRA_STAGES) -> str:
    """What to run so that ``table`` exists: "run `t2p run represent` first (...)" or a generic hint."""
    producer = producer_of(table, tuple(stages) + STAGES + EXTRA_STAGES)
    if producer is None:
        return "run the stage that writes it first"
    return f"run `t2p run {producer}` first (the {producer} stage writes it), or `t2p run all`"


def check_inputs(spark, config: Config, stage: Stage, versions: Dict[str, object], seen: Optional[dict] = None,
                 stages: Sequence[Stage] = STAGES + EXTRA_STAGES):
    """Fail in one line before a stage starts when its input tables are missing or hold no units.

    Raises :class:`MissingTableError` naming the missing table and the stage that writes it, and
    :class:`EmptyInputError` for an empty ``units`` table or a ``<stage>.experiment_id`` with no units. ``seen``
    caches the emptiness check per table version across the stages of one run.
    """
    from tokens2policy.lakehouse import MissingTableError, read_table, table_location

    for table in stage.required_inputs:
        if versions.get(table) is None:
            raise MissingTableError(f"{stage.name} needs table '{table}', which does not exist yet (looked at "
                                    f"{table_location(config, table)}): {missing_table_hint(table, stages)}")
    seen = {} if seen is None else seen
    if "units" in stage.required_inputs:
        key = ("units", versions["units"])
        if key not in seen:
            seen[key] = read_table(spark, config, "units", version=versions["units"]).limit(1).count() > 0
        if not seen[key]:
            raise EmptyInputError(
                "table 'units' has no rows: ingest accepted no unit from the source (rejected rows are in table "
                "'quarantine'); check source.path and the column mapping (docs/ingest.md), then `t2p run ingest`")
    table = EXPERIMENT_SETTINGS.get(stage.name)
    wanted = getattr(getattr(config, stage.name, None), "experiment_id", None)
    if table and wanted is not None and versions.get(table, True) is not None:
        from pyspark.sql import functions as F

        df = read_table(spark, config, table)
        if df.where(F.col("experiment_id").cast("string") == str(wanted)).limit(1).count() == 0:
            have = sorted(str(r[0]) for r in df.select("experiment_id").distinct().limit(21).collect())
            listed = ", ".join(have[:20]) + (", ..." if len(have) > 20 else "") if have else "none"
            raise EmptyInputError(
                f"{stage.name}.experiment_id={wanted!r} has no units in table '{table}' (experiments there: "
                f"{listed}): fix the id, or --set {stage.name}.experiment_id=null for every experiment")


def _cuda_probe(_=None) -> Tuple[str, int]:
    """(host name, number of CUDA devices torch sees here) — run on the driver or in a Spark task."""
    import socket

    try:
        import torch

        return socket.gethostname(), int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # no torch, a broken driver: no usable GPU either way
        return socket.gethostname(), 0


def require_gpu(spark, setting: str, instead: str) -> Dict[str, int]:
    """Fail in one line, before any work, when ``setting`` asks for a CUDA GPU that the stage cannot use.

    With a ``local[...]`` master the Python workers run on the driver's machine, so the driver is asked; on a
    cluster one small Spark task per executor asks its own host. Returns {host: CUDA devices} when every host has
    one; raises :class:`ConfigError` saying what to do (``instead`` is the config change that runs without one).
    """
    from tokens2policy.config import ConfigError

    sc = spark.sparkContext
    if sc.master.startswith("local"):
        hosts, where = [_cuda_probe()], "on this machine"
    else:
        n = max(1, len(sc.statusTracker().getExecutorInfos()) - 1)  # the list includes the driver
        hosts, where = sc.parallelize(range(n), n).map(_cuda_probe).collect(), "on the Spark executors"
    found: Dict[str, int] = {}
    for host, count in hosts:
        found[host] = min(found.get(host, count), count)
    without = sorted(h for h, c in found.items() if c == 0)
    if without:
        raise ConfigError(
            f"{setting} needs a CUDA GPU but none is visible {where} ({', '.join(without)}: "
            f"torch.cuda.is_available() is False): run on a GPU machine or cluster with a CUDA build of torch, "
            f"or {instead}")
    return found


def config_fingerprint(config: Config, stage: Stage) -> str:
    cfg = config.to_dict()
    payload = {s: cfg.get(s) for s in stage.sections}
    payload["seed"] = cfg.get("seed")
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(spark, config: Config) -> str:
    """What identifies the experiment logs' current content: a Delta version, or file names/sizes/mtimes."""
    src = config.source
    if src.kind == "demo" or not src.path:
        return src.kind
    if src.kind == "delta":
        from delta.tables import DeltaTable

        is_path = "/" in src.path or ":" in src.path
        table = DeltaTable.forPath(spark, src.path) if is_path else DeltaTable.forName(spark, src.path)
        return f"delta@{table.history(1).select('version').first()[0]}"
    import os

    entries = []
    for root, _, files in os.walk(src.path) if os.path.isdir(src.path) else [("", [], [src.path])]:
        for f in files:
            st = os.stat(os.path.join(root, f))
            entries.append((os.path.join(root, f), st.st_size, int(st.st_mtime)))
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]


def _input_versions(spark, config: Config, stage: Stage) -> Dict[str, object]:
    from tokens2policy.lakehouse import table_version

    versions: Dict[str, object] = {t: table_version(spark, config, t) for t in stage.inputs}
    if stage.name == "ingest":
        versions["source"] = source_fingerprint(spark, config)
    return versions


def last_successes(spark, config: Config) -> Dict[str, dict]:
    """Each stage's latest successful run from ``stage_runs`` (one small read for the whole pipeline)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import read_table, table_exists

    if not table_exists(spark, config, RUNS_TABLE):
        return {}
    latest = Window.partitionBy("stage").orderBy(F.col("finished_at").desc())
    rows = (
        read_table(spark, config, RUNS_TABLE)
        .where(F.col("status") == "success")
        .withColumn("_rank", F.row_number().over(latest))
        .where(F.col("_rank") == 1)
        .drop("_rank")
        .collect()
    )
    return {r["stage"]: r.asDict() for r in rows}


def is_up_to_date(spark, config: Config, stage: Stage, last: Optional[dict] = None) -> bool:
    """True when ``last`` (the stage's latest success) saw today's config and input versions and outputs exist."""
    from tokens2policy.lakehouse import table_exists

    if last is None:
        last = last_successes(spark, config).get(stage.name)
    if last is None or last["config_hash"] != config_fingerprint(config, stage):
        return False
    if json.loads(last["input_versions"]) != {k: v for k, v in _input_versions(spark, config, stage).items()}:
        return False
    return all(table_exists(spark, config, t) for t in stage.outputs)


def _record(spark, config: Config, stage: Stage, status: str, inputs, summary, started: float, error: str = ""):
    from pyspark.sql.types import StringType, StructField, StructType, TimestampType, DoubleType

    from tokens2policy.lakehouse import write_table

    schema = StructType(
        [
            StructField("stage", StringType(), False),
            StructField("status", StringType(), False),
            StructField("config_hash", StringType(), False),
            StructField("input_versions", StringType(), False),
            StructField("summary", StringType(), True),
            StructField("error", StringType(), True),
            StructField("seconds", DoubleType(), False),
            StructField("finished_at", TimestampType(), False),
        ]
    )
    row = (
        stage.name,
        status,
        config_fingerprint(config, stage),
        json.dumps(inputs, sort_keys=True),
        json.dumps(summary or {}, default=str)[:20000],
        error[:2000],
        float(time.time() - started),
        _dt.datetime.now(),
    )
    write_table(spark.createDataFrame([row], schema), config, RUNS_TABLE, mode="append")


def run_stages(
    spark,
    config: Config,
    names: Sequence[str],
    force: Sequence[str] = (),
    skip_up_to_date: bool = True,
    echo: Callable[[str], None] = print,
    stages: Sequence[Stage] = STAGES,
    resolve: Callable[[str], Callable] = None,
) -> List[dict]:
    """Run stages in pipeline order; skip those up to date; record every outcome in ``stage_runs``.

    A failing stage is recorded and re-raised, leaving every earlier output intact; the next run resumes there
    because the stages before it are up to date.
    """
    from tokens2policy.lakehouse import MissingTableError

    results = []
    force_all = "all" in force
    selected = [s for s in stages if s.name in names]
    try:
        sc = spark.sparkContext
        echo(f"[t2p] Spark {spark.version} master={sc.master} UI: {sc.uiWebUrl or 'disabled (spark.ui.enabled=false)'}")
    except Exception:  # a Spark Connect session (Databricks serverless) has no SparkContext to ask
        echo(f"[t2p] Spark {spark.version} (Spark Connect: see the Spark UI of the cluster)")
    history = last_successes(spark, config)
    checked: dict = {}
    # ETA from the last successful run of each stage still to come (unknown for a stage that never ran)
    expected = {s.name: history[s.name]["seconds"] for s in selected if s.name in history}
    for position, stage in enumerate(selected, start=1):
        fn = (resolve or stage_function)(stage.name)
        last = history.get(stage.name)
        if (skip_up_to_date and not force_all and stage.name not in force
                and is_up_to_date(spark, config, stage, last)):
            echo(f"[t2p] {stage.name}: up to date (inputs and config unchanged) — skipped; --force {stage.name} reruns")
            results.append({"stage": stage.name, "skipped": True})
            continue
        inputs = _input_versions(spark, config, stage)
        check_inputs(spark, config, stage, inputs, checked, stages)
        rest = selected[position - 1:]
        known = [expected[s.name] for s in rest if s.name in expected]
        eta = (f" (ETA for the remaining {len(rest)} stage(s) ≈ {sum(known):.0f}s from their last runs"
               + ("" if len(known) == len(rest) else f"; {len(rest) - len(known)} never ran") + ")") if known else ""
        echo(f"[t2p] stage {position}/{len(selected)} {stage.name}: running{eta}")
        started = time.time()
        try:
            summary = fn(spark, config) or {}
        except BaseException as exc:
            _record(spark, config, stage, "failed", inputs, None, started, f"{type(exc).__name__}: {exc}")
            table = isinstance(exc, MissingTableError) and re.match(r"table '([^']+)' does not exist", str(exc))
            if table:  # say which stage writes it
                raise MissingTableError(f"{stage.name} needs table '{table.group(1)}', which does not exist yet: "
                                        f"{missing_table_hint(table.group(1), stages)}") from exc
            raise
        _record(spark, config, stage, "success", inputs, summary, started)
        echo(f"[t2p] {stage.name}: done in {time.time() - started:.1f}s")
        results.append({"stage": stage.name, "skipped": False, "seconds": time.time() - started, **summary})
    return results
