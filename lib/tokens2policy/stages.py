"""The pipeline's stages: what each reads and writes, the rule that skips an up-to-date stage, and the runner.

A stage *declares* its input tables and the config sections (or single keys, ``"ingest.smd_warn"``) it reads;
its output tables are the registry's tables it owns (:mod:`tokens2policy.lakehouse.schemas`). The runner does the
plumbing: it pins the input versions once, hands the job a :class:`tokens2policy.context.StageContext` (the
declared config view, the inputs read as of the pinned versions, checked writes, a clock, the MLflow run), and
records the run in ``stage_runs`` with its input *and output* versions. Each stage's code is
``tokens2policy.<stage>.job.main(ctx) -> dict`` (``job.run(spark, config)`` calls it the same way, directly).

A stage's ``runtime`` settings (the ``execution`` section: in memory or on Spark, :mod:`tokens2policy.execution`)
are readable but not hashed: both paths write the same tables, so changing only how a stage runs does not rerun it
(``--force STAGE`` does).

A stage is up to date when its last successful run saw the same config sections and input versions and each of
its outputs is still at the version that run recorded — so a stage killed between two of its commits (or whose
output someone else rewrote) reruns in full, and the stages after it see new input versions. ``--force STAGE``
reruns it anyway. One pipeline writes a lakehouse at a time (:mod:`tokens2policy.lakehouse.lock`): the runner
takes the run lock before the first stage that must run, so a run with nothing to do commits nothing.

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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from tokens2policy.config import Config
from tokens2policy.lakehouse.schemas import tables_of

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Tuple[str, ...]  # tables it reads (pinned and recorded)
    outputs: Tuple[str, ...]  # tables it writes
    sections: Tuple[str, ...]  # config sections (or "section.key") it reads: a change makes the stage stale
    requires: Optional[Tuple[str, ...]] = None  # inputs that must exist before it runs (None: all of them)
    tracked: Union[bool, str] = True  # an MLflow run per execution (a "section.key" naming a boolean setting)
    # config sections (or keys) it reads that choose *how* it runs, not *what* it computes (the ``execution``
    # section: in memory or on Spark, same tables either way, tests/execution): readable through ``ctx.config``
    # but outside the config hash, so changing only them does not make the stage stale
    runtime: Tuple[str, ...] = ()

    @property
    def readable(self) -> Tuple[str, ...]:
        """Every config section (or key) the stage may read: ``sections`` (hashed) plus ``runtime`` (not)."""
        return self.sections + self.runtime

    @property
    def required_inputs(self) -> Tuple[str, ...]:
        return self.inputs if self.requires is None else self.requires


# the source keys the unit column contract reads (tokens2policy.context.UnitColumns)
UNIT_COLUMNS = ("source.outcome_cols", "source.covariate_cols")
MODEL_STORE = ("tracking.tracking_uri", "tracking.registry_uri")  # where a registered model is resolved
# how a stage registers the model it logs (tokens2policy.tracking: model_name, register_alias, package_requirement)
MODEL_REGISTRATION = ("tracking.model_alias", "tracking.package_wheel")
# what the report renders (it renders whatever exists and lists the missing tables on the page)
# (demo_drivers/demo_truth/neurons: the demo's truth comparison, optional)
REPORT_TABLES = ("units", "quarantine", "modifiers", "selection_trace", "marginal_screen", "neuron_labels", "gates",
                 "calibration", "policy_rules", "policy_value", "assignments", "demo_drivers", "demo_truth",
                 "neurons")

# in memory or on Spark (tokens2policy.execution): how a stage runs, not what it computes (Stage.runtime)
EXECUTION = ("execution",)

STAGES: Tuple[Stage, ...] = (
    Stage("ingest", (), tables_of("ingest"), ("source", "demo", "ingest")),
    Stage("embed", ("units",), tables_of("embed"), ("embed", *MODEL_STORE)),
    Stage("represent", ("units", "embeddings", "token_states"), tables_of("represent"),
          ("represent", *MODEL_STORE, *MODEL_REGISTRATION, "tracking.represent_model_name"),
          requires=("embeddings", "token_states"), runtime=EXECUTION),
    Stage("identify", ("units", "neurons", "neuron_labels"), tables_of("identify"), ("identify", "honesty", *UNIT_COLUMNS),
          requires=("units", "neurons"), runtime=EXECUTION),
    # effects: neuron_labels name the neurons of the coverage line; identify.min_active its residual screen
    Stage("effects", ("units", "neurons", "modifiers", "neuron_labels"), tables_of("effects"),
          ("effects", "honesty", "identify.min_active", *UNIT_COLUMNS), requires=("units", "neurons", "modifiers"),
          runtime=EXECUTION),
    # policy: cate_final_stages is read only to serve a model (policy.register_model with a *_selected learner)
    Stage("policy", ("units", "neurons", "modifiers", "effects", "cate_final_stages"), tables_of("policy"),
          ("policy", "effects", "honesty", "embed", *UNIT_COLUMNS, *MODEL_STORE, *MODEL_REGISTRATION,
           "tracking.policy_model_name"), requires=("units", "neurons", "modifiers", "effects")),
    Stage("report", REPORT_TABLES, (), ("report", "ingest.smd_warn", *UNIT_COLUMNS, "source.cluster_col",
                                        "policy.recommended", "policy.learner"),
          requires=(), tracked="report.log_to_mlflow"),
)
STAGE_NAMES: Tuple[str, ...] = tuple(s.name for s in STAGES)
# Jobs outside the pipeline: run by name, never by `run all`.
# validate: its pipeline-path design runs the identify/effects/policy cores (with their own settings per design)
EXTRA_STAGES: Tuple[Stage, ...] = (Stage("validate", (), tables_of("validate"),
                                         ("validate", "embed", "represent", "identify", "effects", "policy",
                                          "honesty")),)
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


def _job_module(name: str):
    try:
        return importlib.import_module(f"tokens2policy.{name}.job")
    except ModuleNotFoundError as exc:
        if exc.name == f"tokens2policy.{name}.job":
            raise StageNotBuilt(f"stage '{name}' is not built yet") from None
        raise


def stage_function(name: str) -> Callable:
    """The stage's job: ``tokens2policy.<name>.job.main(ctx) -> dict``."""
    return _job_module(name).main


def stage_preflight(name: str) -> Optional[Callable]:
    """The stage's optional ``tokens2policy.<name>.job.preflight(spark, config)``: one-line checks of its settings (a GPU
    that is not there, a backend that is not installed) run before any work and before its MLflow run opens."""
    return getattr(_job_module(name), "preflight", None)


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

        df = read_table(spark, config, table, version=versions.get(table))
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
    """Hash of the declared sections (and section keys) plus ``seed``."""
    cfg = config.to_dict()
    payload = {}
    for item in stage.sections:
        section, _, key = item.partition(".")
        payload[item] = (cfg.get(section) or {}).get(key) if key else cfg.get(section)
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

    from tokens2policy.lakehouse import storage

    try:
        if not by_name:
            return storage.delta_version(location, spark)
        table = DeltaTable.forName(spark, location)
        return int(table.history(1).select("version").first()[0])
    except Exception:  # not Delta (a view, a Hive/JDBC table), or no such table: the caller reads it as rows
        return None


def _content_checksum(df) -> str:
    from pyspark.sql import functions as F

    h = F.xxhash64(*[F.col("`" + c.replace("`", "``") + "`") for c in df.columns])
    row = df.select(h.alias("h")).agg(F.count(F.lit(1)), F.bit_xor("h"), F.sum(F.pmod("h", F.lit(2147483647)))).first()
    return hashlib.sha256(json.dumps([int(row[0]), row[1], row[2]], default=str).encode()).hexdigest()[:16]


def pinned_versions(spark, config: Config, stage: Stage) -> Dict[str, object]:
    """The Delta version of each input table (None: missing) — computed once per stage run and handed to the job,
    which reads exactly these versions. Ingest's ``source`` is a fingerprint of the logs."""
    from tokens2policy.lakehouse import table_version

    versions: Dict[str, object] = {t: table_version(spark, config, t) for t in stage.inputs}
    if stage.name == "ingest":
        versions["source"] = source_fingerprint(spark, config)
    return versions


def output_versions(spark, config: Config, stage: Stage) -> Dict[str, Optional[int]]:
    from tokens2policy.lakehouse import table_version

    return {t: table_version(spark, config, t) for t in stage.outputs}


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


def stale_reason(spark, config: Config, stage: Stage, last: Optional[dict] = None,
                 versions: Optional[Dict[str, object]] = None) -> Optional[str]:
    """Why ``stage`` must run, in words, or None when it is up to date.

    Up to date: ``last`` (the stage's latest success, read from ``stage_runs`` when not given) saw today's config
    sections and input versions (``versions``, pinned now), and every output is still at the version that success
    recorded. The runner's skip rule (:func:`is_up_to_date`) and ``t2p status`` both read this one function, so the
    reason shown is the rule applied.
    """
    if last is None:
        last = last_successes(spark, config).get(stage.name)
    if last is None:
        return "never ran successfully"
    if last["config_hash"] != config_fingerprint(config, stage):
        return f"config changed (sections {', '.join(stage.sections)} or seed)"
    if versions is None:
        versions = pinned_versions(spark, config, stage)
    recorded = json.loads(last["input_versions"])
    current = dict(versions)
    changed = [f"{k} {_show_version(recorded.get(k))} → {_show_version(current.get(k))}"
               for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if changed:
        return "inputs changed: " + ", ".join(changed)
    stored = last.get("output_versions")
    if stored is None:  # recorded before output versions were (or by a failed run): not provably current
        return "no output versions recorded by its last success"
    stored, now = json.loads(stored), output_versions(spark, config, stage)
    moved = [f"{k} {_show_version(stored.get(k))} → {_show_version(now.get(k))}"
             for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
    if moved:
        return "outputs changed since its last success: " + ", ".join(moved)
    return None


def is_up_to_date(spark, config: Config, stage: Stage, last: Optional[dict] = None,
                  versions: Optional[Dict[str, object]] = None) -> bool:
    """True when ``last`` (the stage's latest success) saw today's config and input versions (``versions``, pinned
    now) and every output is still at the version it recorded."""
    return stale_reason(spark, config, stage, last, versions) is None


def _record(spark, config: Config, stage: Stage, status: str, inputs, summary, started: float, error: str = "",
            outputs=None, run_id: Optional[str] = None) -> float:
    """Append the outcome to ``stage_runs``; return the seconds recorded (the stage's wall time)."""
    from tokens2policy.lakehouse import table_exists, write_table
    from tokens2policy.lakehouse.schemas import table_spec

    row = (
        stage.name,
        status,
        config_fingerprint(config, stage),
        json.dumps(inputs, sort_keys=True, default=str),
        None if outputs is None else json.dumps(outputs, sort_keys=True),
        json.dumps(summary or {}, default=str)[:20000],
        error[:2000],
        float(time.time() - started),
        _dt.datetime.now(),
        run_id,
    )
    df = spark.createDataFrame([row], table_spec(RUNS_TABLE).schema())
    loc = _runs_location(config)
    if loc not in _CURRENT_RUNS_TABLES and table_exists(spark, config, RUNS_TABLE) \
            and "output_versions" not in read_runs_columns(spark, config):
        # a stage_runs table from before output versions were recorded: add the new columns
        writer = df.write.format("delta").mode("append").option("mergeSchema", "true")
        writer.saveAsTable(loc) if config.lakehouse.mode == "catalog" else writer.save(loc)
    else:
        write_table(df, config, RUNS_TABLE, mode="append")
    _CURRENT_RUNS_TABLES.add(loc)
    return row[7]


_CURRENT_RUNS_TABLES: set = set()  # stage_runs locations known to have every column (checked once per process)


def _runs_location(config: Config) -> str:
    from tokens2policy.lakehouse import table_location

    return table_location(config, RUNS_TABLE)


def read_runs_columns(spark, config: Config) -> List[str]:
    from tokens2policy.lakehouse import read_table

    return read_table(spark, config, RUNS_TABLE).columns


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
    because the stages before it are up to date. The run lock is taken before the first stage that must run and
    released at the end (:class:`tokens2policy.lakehouse.lock.RunLock`; a held lock: one-line
    :class:`~tokens2policy.lakehouse.lock.LockHeldError`). Progress lines go to ``echo`` (default: this module's
    logger at INFO; ``t2p --log-level`` sets what is shown).
    """
    from tokens2policy.context import run_stage_job
    from tokens2policy.lakehouse import MissingTableError, table_version
    from tokens2policy.lakehouse.lock import RunLock

    echo = echo or log.info
    results = []
    force_all = "all" in force
    selected = [s for s in stages if s.name in names]
    try:
        sc = spark.sparkContext
        echo(f"[t2p] Spark {spark.version} master={sc.master} UI: {sc.uiWebUrl or 'disabled (spark.ui.enabled=false)'}")
    except Exception:  # a Spark Connect session (Databricks serverless) has no SparkContext to ask
        echo(f"[t2p] Spark {spark.version} (Spark Connect: see the Spark UI of the cluster)")
    lock = RunLock(spark, config, command="t2p run " + " ".join(s.name for s in selected), echo=echo)
    holder = lock.live_holder()
    if holder is not None:  # another pipeline writes: wait (or stop) before judging what is up to date
        lock.acquire()
    history, runs_version = last_successes(spark, config), table_version(spark, config, RUNS_TABLE)
    checked: dict = {}
    # ETA from the last successful run of each stage still to come (unknown for a stage that never ran)
    expected = {s.name: history[s.name]["seconds"] for s in selected if s.name in history}
    try:
        for position, stage in enumerate(selected, start=1):
            fn = (resolve or stage_function)(stage.name)
            forced = force_all or stage.name in force
            versions = pinned_versions(spark, config, stage)
            # history holds every stage's latest success: a stage missing there never succeeded (stale_reason
            # would look it up in stage_runs again, one Spark query per such stage)
            reason = (f"forced (--force {'all' if force_all else stage.name})" if forced
                      else "skip rule off" if not skip_up_to_date
                      else "never ran successfully" if stage.name not in history
                      else stale_reason(spark, config, stage, history[stage.name], versions))
            if reason is None:
                echo(f"[t2p] {stage.name}: up to date (inputs, config and outputs unchanged) — skipped; "
                     f"--force {stage.name} reruns")
                results.append({"stage": stage.name, "skipped": True})
                continue
            echo(f"[t2p] {stage.name}: must run: {reason}")
            if not lock.held:  # the first stage that writes: take the lock; look again if someone ran meanwhile
                lock.acquire()
                if table_version(spark, config, RUNS_TABLE) != runs_version:
                    history = last_successes(spark, config)
                    versions = pinned_versions(spark, config, stage)
                    if (skip_up_to_date and not forced and stage.name in history
                            and is_up_to_date(spark, config, stage, history[stage.name], versions)):
                        echo(f"[t2p] {stage.name}: up to date (another pipeline ran it) — skipped")
                        results.append({"stage": stage.name, "skipped": True})
                        continue
            lock.check()
            check_inputs(spark, config, stage, versions, checked, stages)
            rest = selected[position - 1:]
            known = [expected[s.name] for s in rest if s.name in expected]
            eta = (f" (ETA for the remaining {len(rest)} stage(s) ≈ {sum(known):.0f}s from their last runs"
                   + ("" if len(known) == len(rest) else f"; {len(rest) - len(known)} never ran") + ")") \
                if known else ""
            echo(f"[t2p] stage {position}/{len(selected)} {stage.name}: running{eta}")
            started = time.time()
            try:
                result = run_stage_job(spark, config, stage, fn, versions=versions, echo=echo,
                                       preflight=None if resolve else stage_preflight(stage.name))
                lock.check()
            except BaseException as exc:
                _record(spark, config, stage, "failed", versions, None, started, f"{type(exc).__name__}: {exc}")
                table = isinstance(exc, MissingTableError) and re.match(r"table '([^']+)' does not exist", str(exc))
                if table:  # say which stage writes it
                    raise MissingTableError(f"{stage.name} needs table '{table.group(1)}', which does not exist "
                                            f"yet: {missing_table_hint(table.group(1), stages)}") from exc
                raise
            seconds = _record(spark, config, stage, "success", versions, result.summary, started,
                              outputs=result.output_versions, run_id=result.run_id)
            echo(f"[t2p] {stage.name}: done in {seconds:.1f}s")
            # the runner's wall time is the stage's "seconds"; a stage's own phase timings stay as "phase_seconds"
            summary = result.summary
            results.append({**summary, "stage": stage.name, "skipped": False, "seconds": seconds,
                            **({"phase_seconds": summary["seconds"]} if "seconds" in summary else {})})
    finally:
        lock.release()
    return results
