"""The pipeline's stages, what each reads and writes, and the rule that skips an up-to-date stage.

A stage is up to date when its last successful run (recorded in the ``stage_runs`` Delta table) saw the same Delta
versions of its input tables and the same config sections, and its outputs still exist. ``--force STAGE`` reruns
it anyway. Each stage's code is ``tokens2policy.<stage>.job.run(spark, config) -> dict``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
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


STAGES: Tuple[Stage, ...] = (
    Stage("ingest", (), ("units", "quarantine"), ("source", "demo", "ingest")),
    Stage("embed", ("units",), ("embeddings", "token_states"), ("embed",)),
    Stage("represent", ("embeddings", "token_states"), ("neurons", "neuron_stats", "neuron_labels"), ("represent",)),
    Stage("identify", ("units", "neurons"), ("modifiers", "selection_trace", "marginal_screen"), ("identify",)),
    Stage("effects", ("units", "neurons", "modifiers"), ("gates", "effects", "calibration"), ("effects",)),
    Stage("policy", ("units", "neurons", "modifiers", "effects"), ("policy_rules", "policy_value", "assignments"),
          ("policy", "effects")),
    Stage("report", ("units", "modifiers", "gates", "policy_value"), (), ("report",)),
)
STAGE_NAMES: Tuple[str, ...] = tuple(s.name for s in STAGES)
# Jobs outside the pipeline: run by name, never by `run all`.
EXTRA_STAGES: Tuple[Stage, ...] = (Stage("validate", (), ("validation_runs",), ("validate",)),)
RUNS_TABLE = "stage_runs"


class StageNotBuilt(RuntimeError):
    """The stage's job module does not exist yet."""


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
    results = []
    force_all = "all" in force
    selected = [s for s in stages if s.name in names]
    history = last_successes(spark, config)
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
            raise
        _record(spark, config, stage, "success", inputs, summary, started)
        echo(f"[t2p] {stage.name}: done in {time.time() - started:.1f}s")
        results.append({"stage": stage.name, "skipped": False, "seconds": time.time() - started, **summary})
    return results
