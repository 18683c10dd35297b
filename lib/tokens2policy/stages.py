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
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tokens2policy.config import Config

log = logging.getLogger(__name__)

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
    """What identifies the experiment logs' current content, so that an unchanged source skips ingest.

    A Delta source (by path or name, ``source.kind`` delta or table): its latest version. Files (parquet, csv,
    json, or a Delta path that is not a table): names, sizes and modification times as the file system that owns
    the location lists them (Hadoop's FileSystem through Spark: ``hdfs://``, ``s3a://``, ``abfss://``, globs too).
    A view, a non-Delta catalog table or ``source.query``: a checksum of the rows computed by Spark (row count plus
    two aggregates of a 64-bit row hash), which reads the source once.
    """
    from tokens2policy.lakehouse import storage

    src = config.source
    key = src.location_key
    location = getattr(src, key) if key else None
    if src.kind == "demo" or not location:
        return src.kind
    if src.kind in ("delta", "table"):
        version = _delta_version(spark, location, by_name=src.kind == "table" or ("/" not in location
                                                                                  and ":" not in location))
        if version is not None:
            return f"delta@{version}"
    if src.kind in ("table", "query"):
        df = spark.read.table(location) if src.kind == "table" else spark.sql(location)
        return "rows@" + _content_checksum(df)
    entries = [(e.path, e.size, e.mtime_ms) for e in storage.list_files(location, spark)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _delta_version(spark, location: str, by_name: bool) -> Optional[int]:
    """The latest Delta version of a table (by path or name), or None when it is not a Delta table."""
    from delta.tables import DeltaTable

    try:
        if not by_name and not DeltaTable.isDeltaTable(spark, location):
            return None
        table = DeltaTable.forName(spark, location) if by_name else DeltaTable.forPath(spark, location)
        return int(table.history(1).select("version").first()[0])
    except Exception:  # not Delta (a view, a Hive/JDBC table), or no such table: the caller reads it as rows
        return None


def _content_checksum(df) -> str:
    from pyspark.sql import functions as F

    h = F.xxhash64(*[F.col("`" + c.replace("`", "``") + "`") for c in df.columns])
    row = df.select(h.alias("h")).agg(F.count(F.lit(1)), F.bit_xor("h"), F.sum(F.pmod("h", F.lit(2147483647)))).first()
    return hashlib.sha256(json.dumps([int(row[0]), row[1], row[2]], default=str).encode()).hexdigest()[:16]


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


def _show_version(value) -> str:
    return "missing" if value is None else str(value)


def stale_reason(spark, config: Config, stage: Stage, last: Optional[dict] = None) -> Optional[str]:
    """Why ``stage`` must run, in words, or None when it is up to date.

    Up to date: ``last`` (the stage's latest success, read from ``stage_runs`` when not given) saw today's config
    sections and input versions, and its outputs exist. The runner's skip rule (:func:`is_up_to_date`) and
    ``t2p status`` both read this one function, so the reason shown is the rule applied.
    """
    from tokens2policy.lakehouse import table_exists

    if last is None:
        last = last_successes(spark, config).get(stage.name)
    if last is None:
        return "never ran successfully"
    if last["config_hash"] != config_fingerprint(config, stage):
        return f"config changed (sections {', '.join(stage.sections)} or seed)"
    recorded = json.loads(last["input_versions"])
    current = _input_versions(spark, config, stage)
    changed = [f"{k} {_show_version(recorded.get(k))} → {_show_version(current.get(k))}"
               for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if changed:
        return "inputs changed: " + ", ".join(changed)
    missing = [t for t in stage.outputs if not table_exists(spark, config, t)]
    if missing:
        return "outputs missing: " + ", ".join(missing)
    return None


def is_up_to_date(spark, config: Config, stage: Stage, last: Optional[dict] = None) -> bool:
    """True when ``last`` (the stage's latest success) saw today's config and input versions and outputs exist."""
    return stale_reason(spark, config, stage, last) is None


def _record(spark, config: Config, stage: Stage, status: str, inputs, summary, started: float,
            error: str = "") -> float:
    """Append the outcome to ``stage_runs``; return the seconds recorded (the stage's wall time)."""
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
    return row[6]


def run_stages(
    spark,
    config: Config,
    names: Sequence[str],
    force: Sequence[str] = (),
    skip_up_to_date: bool = True,
    echo: Optional[Callable[[str], None]] = None,
    stages: Sequence[Stage] = STAGES,
    resolve: Callable[[str], Callable] = None,
) -> List[dict]:
    """Run stages in pipeline order; skip those up to date; record every outcome in ``stage_runs``.

    A failing stage is recorded and re-raised, leaving every earlier output intact; the next run resumes there
    because the stages before it are up to date. Progress lines go to ``echo`` (default: this module's logger at
    INFO; ``t2p --log-level`` sets what is shown).
    """
    from tokens2policy.lakehouse import MissingTableError

    echo = echo or log.info
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
        forced = force_all or stage.name in force
        reason = (f"forced (--force {'all' if force_all else stage.name})" if forced
                  else stale_reason(spark, config, stage, last) if skip_up_to_date else "skip rule off")
        if reason is None:
            echo(f"[t2p] {stage.name}: up to date (inputs and config unchanged) — skipped; --force {stage.name} reruns")
            results.append({"stage": stage.name, "skipped": True})
            continue
        echo(f"[t2p] {stage.name}: must run: {reason}")
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
        seconds = _record(spark, config, stage, "success", inputs, summary, started)
        echo(f"[t2p] {stage.name}: done in {seconds:.1f}s")
        # the runner's wall time is the stage's "seconds"; a stage's own phase timings stay as "phase_seconds"
        result = {**summary, "stage": stage.name, "skipped": False, "seconds": seconds}
        if "seconds" in summary:
            result["phase_seconds"] = summary["seconds"]
        results.append(result)
    return results
