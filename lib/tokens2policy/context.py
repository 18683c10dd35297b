"""What a stage's job gets from the runner: a :class:`StageContext`.

A stage declares what it reads and writes (:class:`tokens2policy.stages.Stage`: input tables, config sections;
its output tables are the registry's tables it owns, :mod:`tokens2policy.lakehouse.schemas`). The runner pins the
input versions once and hands the job a context that does the plumbing:

* ``ctx.config`` — a view of the config that answers only the declared sections (and keys): reading another one
  raises :class:`UndeclaredAccessError`, so every setting a stage depends on is in its config hash and a change
  reruns it;
* ``ctx.read(name)`` — an input table as of its pinned Delta version (reading an undeclared table raises);
  ``ctx.exists``/``ctx.version`` likewise. The stage's own output tables can be read too (their latest version:
  a stage sees its own writes);
* ``ctx.write``/``ctx.write_experiments``/``ctx.write_experiment_tables``/``ctx.merge``/``ctx.delta_table`` —
  writes to declared output tables only, each frame checked against the table's registered columns and types;
  ``ctx.frame(name, rows)`` builds a Spark frame with the table's registered schema from pandas or tuples;
* ``ctx.units`` — the unit column contract: which ``units`` columns are outcomes, covariates, the cluster, and
  the key types;
* ``ctx.clock`` (and ``ctx.new_clock(scope)``) — step timings, logged to MLflow as ``seconds.*`` metrics and
  ``timings.json`` when the stage ends; ``ctx.log_metrics``/``log_params``/``log_dict``/``log_artifacts`` — the
  stage's MLflow run (``ctx.run``), opened by the context with the pinned input versions.

Table helpers of :mod:`tokens2policy.lakehouse` given ``ctx.config`` route through the context, so a helper deep
in a job body that calls ``read_table(spark, cfg, name)`` also reads the pinned version and is checked.

Fault injection (tests): with ``T2P_FAULT_KILL_AFTER_FIRST_COMMIT=<stage>`` in the environment, the context of
that stage SIGKILLs its own process at the first write it starts after one of its output tables has changed —
i.e. between two commits of a multi-commit stage — so a test can show the rerun repairs the half-written stage;
``<stage>@<table>`` kills it only when it is about to write ``<table>`` (after some other output changed).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from tokens2policy.config import Config

SCHEMA_MISMATCH_ERRORS = ("DELTA_METADATA_MISMATCH", "DELTA_FAILED_TO_MERGE_FIELDS")  # Delta error classes of a
# write whose schema differs from the stored table's (StageContext.write upgrades additive differences)

FAULT_ENV = "T2P_FAULT_KILL_AFTER_FIRST_COMMIT"
# config fields any stage may read: where things are, not what they compute
INFRASTRUCTURE = frozenset({"data_dir", "data_path", "data_uri", "data_is_local", "lakehouse", "spark", "seed"})
# config field name -> section name where they differ
_FIELD_SECTION = {"validate_": "validate"}
_SECTION_FIELD = {v: k for k, v in _FIELD_SECTION.items()}



# pandas frames at least this long go to Spark through Arrow (ctx.frame): the row-by-row path pickles every row in
# Python (400,000 effects rows: ~30 s, growing linearly — the largest cost of the effects and policy stages at 10^6
# units), Arrow ships columns
ARROW_FRAME_ROWS = 10_000
_ARROW_SIMPLE = {"string": object, "double": "float64", "float": "float32", "int": "Int32", "bigint": "Int64",
                 "smallint": "Int16", "tinyint": "Int8", "boolean": "boolean"}


def arrow_frame(spark, pdf, schema):
    """``pdf`` (columns in ``schema``'s order) as a Spark frame through Arrow, with the row path's semantics: NaN
    and NA become null, integers and booleans with missing values as nullable types. None (the caller takes the
    row path) when a column type is not one of the simple types or arrays of them, an array holds a NaN element
    (the row path keeps it, Arrow would store a null), or Arrow is off / refuses the data."""
    import numpy as np
    import pandas as pd

    if str(spark.conf.get("spark.sql.execution.arrow.pyspark.enabled", "false")).lower() != "true":
        return None

    def missing(v):
        return v is None or (isinstance(v, float) and v != v) or v is pd.NA

    out = {}
    try:
        for f in schema.fields:
            t = f.dataType.simpleString()
            col = pdf[f.name]
            if t == "string":
                out[f.name] = col.astype(object).where(col.notna(), None)
            elif t in ("double", "float"):
                out[f.name] = pd.to_numeric(col, errors="raise").astype(_ARROW_SIMPLE[t])
            elif t in _ARROW_SIMPLE:
                out[f.name] = col.astype(_ARROW_SIMPLE[t])
            elif t.startswith("array<") and t[6:-1] in ("double", "float", "int", "bigint", "string"):
                col = col.map(lambda v: None if missing(v) else v).astype(object)
                if t[6:-1] in ("double", "float"):  # Arrow would turn a NaN element into null: the row path keeps it
                    parts = [np.asarray(v, dtype=float) for v in col if v is not None and len(v)]
                    if parts and np.isnan(np.concatenate(parts)).any():
                        return None
                out[f.name] = col
            else:
                return None
        return spark.createDataFrame(pd.DataFrame(out).reset_index(drop=True), schema)
    except Exception:  # noqa: BLE001 - data Arrow (or the cast) refuses: the row path decides, as before
        return None

class UndeclaredAccessError(RuntimeError):
    """A stage read a config section or table, or wrote a table, that its :class:`Stage` does not declare."""


# ---------------------------------------------------------------------------------------------- config view
def split_declared(declared: Iterable[str]) -> Tuple[frozenset, Dict[str, frozenset]]:
    """("source", "ingest.smd_warn") -> ({"source"}, {"ingest": {"smd_warn"}})."""
    whole, keys = set(), {}
    for d in declared:
        section, _, key = d.partition(".")
        if key:
            keys.setdefault(section, set()).add(key)
        else:
            whole.add(section)
    return frozenset(whole), {s: frozenset(k) for s, k in keys.items() if s not in whole}


class SectionView:
    """One config section of which a stage declared only some keys."""

    __slots__ = ("_section", "_keys", "_name", "_stage", "_reads")

    def __init__(self, section, keys: frozenset, name: str, stage: str, reads: set):
        for k, v in (("_section", section), ("_keys", keys), ("_name", name), ("_stage", stage), ("_reads", reads)):
            object.__setattr__(self, k, v)

    def __getattr__(self, key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        if key not in self._keys:
            value = getattr(self._section, key)  # AttributeError for a key the section does not have
            del value
            raise UndeclaredAccessError(
                f"stage '{self._stage}' read config key '{self._name}.{key}' but declares only "
                f"{sorted(self._name + '.' + k for k in self._keys)} of that section: add it to the stage's sections "
                "(tokens2policy/stages.py) so a change to it reruns the stage")
        self._reads.add(f"{self._name}.{key}")
        return getattr(self._section, key)

    def __setattr__(self, key, value):
        raise AttributeError("a stage's config is read-only")


class ConfigView:
    """The config as one stage may see it: its declared sections (or section keys) plus where things are."""

    __slots__ = ("_config", "_whole", "_keys", "_stage", "_context", "_reads")

    def __init__(self, config: Config, declared: Iterable[str], stage: str, context=None):
        whole, keys = split_declared(declared)
        for k, v in (("_config", config), ("_whole", whole), ("_keys", keys), ("_stage", stage),
                     ("_context", context), ("_reads", set())):
            object.__setattr__(self, k, v)

    @property
    def stage_context(self):
        """The :class:`StageContext` this view belongs to (table helpers route through it)."""
        return self._context

    @property
    def reads(self) -> frozenset:
        """The sections (and section keys) read so far."""
        return frozenset(self._reads)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in INFRASTRUCTURE:
            return getattr(self._config, name)
        section = _FIELD_SECTION.get(name, name)
        value = getattr(self._config, _SECTION_FIELD.get(name, name))  # AttributeError for no such field
        if section in self._whole:
            self._reads.add(section)
            return value
        if section in self._keys:
            return SectionView(value, self._keys[section], section, self._stage, self._reads)
        raise UndeclaredAccessError(
            f"stage '{self._stage}' read config section '{section}', which it does not declare: add it to the "
            "stage's sections (tokens2policy/stages.py) so a change to it reruns the stage")

    def __setattr__(self, key, value):
        raise AttributeError("a stage's config is read-only")

    def __reduce__(self):  # shipped to Spark workers: the plain config (no session, no context)
        return (_plain_config, (self._config.to_dict(),))

    def to_dict(self) -> Dict[str, Any]:
        """The declared part of the config (what the stage's config hash covers)."""
        cfg = self._config.to_dict()
        out: Dict[str, Any] = {k: cfg.get(k) for k in ("data_dir", "seed")}
        out.update({s: cfg.get(s) for s in sorted(self._whole)})
        for s, keys in self._keys.items():
            out[s] = {k: (cfg.get(s) or {}).get(k) for k in sorted(keys)}
        return out


def _plain_config(data):
    return Config.model_validate(data)


# ---------------------------------------------------------------------------------------------- unit columns
@dataclass(frozen=True)
class UnitColumns:
    """The ``units`` columns a stage works with: outcomes, covariates, cluster, and the key types.

    outcomes: the configured ``source.outcome_cols`` present in ``units`` (else a column named ``outcome``);
    covariates: the configured ``source.covariate_cols`` present (``numeric_covariates``: those of a numeric type,
    what a linear test conditions on); cluster: ``cluster`` when present; key_types: the Spark types of
    ``experiment_id``/``unit_id`` (per-unit tables downstream keep them).
    """

    outcomes: Tuple[str, ...]
    covariates: Tuple[str, ...]
    numeric_covariates: Tuple[str, ...]
    cluster: Optional[str]
    key_types: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(cls, schema, outcome_cols: Sequence[str], covariate_cols: Sequence[str]) -> "UnitColumns":
        from pyspark.sql.types import NumericType

        types = {f.name: f.dataType for f in schema.fields}
        outcomes = tuple(c for c in outcome_cols if c in types) or tuple(c for c in ("outcome",) if c in types)
        if not outcomes:
            raise ValueError(f"none of the outcome columns {list(outcome_cols)} (source.outcome_cols) is in the "
                             "units table")
        covariates = tuple(c for c in covariate_cols if c in types)
        numeric = tuple(c for c in covariates if isinstance(types[c], NumericType))
        keys = {k: types[k].simpleString() for k in ("experiment_id", "unit_id") if k in types}
        return cls(outcomes, covariates, numeric, "cluster" if "cluster" in types else None, keys)


# the source keys the unit column contract reads (declared by every stage that uses ctx.units)
UNIT_COLUMN_KEYS = ("source.outcome_cols", "source.covariate_cols")


# ---------------------------------------------------------------------------------------------- clock
class Clock:
    """Step timings: ``lap(name)`` records the seconds since the previous lap (or the start); ``timed(name)``
    times a block. Repeated names add up. ``laps`` holds them in order."""

    def __init__(self, echo: Optional[Callable[[str], None]] = None, label: str = ""):
        self.laps: Dict[str, float] = {}
        self.echo, self.label = echo, label
        self.started = self._t = time.perf_counter()

    def _add(self, name: str, seconds: float) -> float:
        self.laps[name] = round(self.laps.get(name, 0.0) + seconds, 3)
        if self.echo is not None:
            self.echo(f"[t2p] {self.label + ': ' if self.label else ''}{name}: {seconds:.2f} s")
        return seconds

    def reset(self) -> "Clock":
        """Start the next lap now (nothing recorded)."""
        self._t = time.perf_counter()
        return self

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        seconds, self._t = now - self._t, now
        return self._add(name, seconds)

    @contextlib.contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield self
        finally:
            self._t = time.perf_counter()
            self._add(name, self._t - start)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def metric_key(key: str) -> str:
    """A key MLflow accepts (experiment ids and outcomes may hold other characters)."""
    return re.sub(r"[^\w\-. /]", "_", str(key))[:250]


# ---------------------------------------------------------------------------------------------- the context
class StageContext:
    """The plumbing of one stage run (see the module docstring). Made by :func:`run_stage_job`."""

    def __init__(self, spark, config: Config, stage, versions: Mapping[str, Any], echo: Callable = print):
        from tokens2policy.lakehouse.tables import table_version

        self.spark, self.stage, self.echo = spark, stage, echo
        self.full_config = config
        self.config = ConfigView(config, stage.readable, stage.name, self)
        self.versions: Dict[str, Any] = dict(versions)  # pinned input versions (ingest: also "source")
        # outputs as the stage found them (only needed to inject a fault between two of its commits)
        self.start_versions = {t: table_version(spark, config, t) for t in stage.outputs} \
            if os.environ.get(FAULT_ENV) else {}
        self.clock = Clock(label=stage.name)
        self.clocks: Dict[str, Clock] = {}
        self.run = None  # the MLflow run (None for an untracked stage)
        self.tables_read: set = set()
        self._units: Optional[UnitColumns] = None
        self._keys: Optional[Dict[str, str]] = None

    # -- declarations -------------------------------------------------------------------------------------
    @property
    def run_id(self) -> Optional[str]:
        return self.run.info.run_id if self.run is not None else None

    def _check_readable(self, name: str) -> None:
        if name not in self.stage.inputs and name not in self.stage.outputs:
            raise UndeclaredAccessError(
                f"stage '{self.stage.name}' read table '{name}', which it does not declare as an input: add it to "
                "the stage's inputs (tokens2policy/stages.py) so its version is pinned and recorded")
        self.tables_read.add(name)

    def _check_writable(self, name: str) -> None:
        if name not in self.stage.outputs:
            raise UndeclaredAccessError(
                f"stage '{self.stage.name}' wrote table '{name}', which is not one of its outputs "
                f"{list(self.stage.outputs)} (the table registry, tokens2policy/lakehouse/schemas.py, names each "
                "table's writer)")

    # -- reading ------------------------------------------------------------------------------------------
    def version(self, name: str) -> Optional[int]:
        """An input's pinned version; an output's current version."""
        from tokens2policy.lakehouse.tables import table_version

        self._check_readable(name)
        if name in self.stage.inputs:
            return self.versions.get(name)
        return table_version(self.spark, self.full_config, name)

    def exists(self, name: str) -> bool:
        return self.version(name) is not None

    def read(self, name: str, version: Optional[int] = None):
        """An input table as of its pinned version (an output: its latest version, or ``version``)."""
        from tokens2policy.lakehouse.tables import MissingTableError, read_table, table_location

        self._check_readable(name)
        if version is None and name in self.stage.inputs:
            version = self.versions.get(name)
            if version is None:
                from tokens2policy.stages import missing_table_hint

                raise MissingTableError(f"table '{name}' does not exist at {table_location(self.full_config, name)}"
                                        f": {missing_table_hint(name)}")
        return read_table(self.spark, self.full_config, name, version=version)

    @property
    def units(self) -> UnitColumns:
        """The unit column contract, from the ``units`` schema at its pinned version (a declared input)."""
        if self._units is None:
            src = self.config.source
            self._units = UnitColumns.resolve(self.read("units").schema, src.outcome_cols, src.covariate_cols)
        return self._units

    # -- schemas and frames -------------------------------------------------------------------------------
    def _key_types(self) -> Mapping[str, str]:
        """Types of experiment_id/unit_id: as in ``units`` (else the first input that has them); per-unit output
        tables keep them."""
        if self._keys is None:
            self._keys = {}
            for name in sorted(self.stage.inputs, key=lambda t: t != "units"):
                if self.versions.get(name) is None:
                    continue
                fields = {f.name: f.dataType for f in self.read(name).schema.fields}
                if "unit_id" in fields:
                    self._keys = {k: fields[k].simpleString() for k in ("experiment_id", "unit_id") if k in fields}
                    break
        return self._keys

    def _repeats(self, name: str) -> Mapping[str, Sequence[str]]:
        if name != "units":
            return {}
        src = self.full_config.source
        return {"source.outcome_cols": list(src.outcome_cols), "source.covariate_cols": list(src.covariate_cols)}

    def schema(self, name: str):
        """The registered Spark schema of an output table (key types as in ``units``)."""
        from tokens2policy.lakehouse.schemas import table_spec

        return table_spec(name).schema(self._repeats(name), self._key_types())

    def frame(self, name: str, data):
        """A Spark frame with table ``name``'s registered schema from a pandas frame (its columns picked by name;
        NaN/NA become null) or from rows (tuples in the registry's column order)."""
        import pandas as pd

        schema = self.schema(name)
        if isinstance(data, pd.DataFrame):
            cols = [f.name for f in schema.fields]
            missing = [c for c in cols if c not in data.columns]
            if missing:
                from tokens2policy.lakehouse.schemas import SchemaContractError

                raise SchemaContractError(f"frame for table '{name}' lacks column(s) {missing}")
            if len(data) >= ARROW_FRAME_ROWS:
                fast = arrow_frame(self.spark, data[cols], schema)
                if fast is not None:
                    return fast
            pdf = data[cols].astype(object).where(data[cols].notna(), None)
            data = pdf.values.tolist()
        return self.spark.createDataFrame(list(data), schema)

    def _check_schema(self, name: str, df) -> None:
        from tokens2policy.lakehouse.schemas import TABLES, check_frame_schema

        if name in TABLES:  # a registered table (every real stage output is): its contract holds
            check_frame_schema(name, df.schema, self._repeats(name), self._key_types())

    # -- writing ------------------------------------------------------------------------------------------
    def _before_commit(self, name: str) -> None:
        """Fault injection between commits (see the module docstring)."""
        stage, _, table = os.environ.get(FAULT_ENV, "").partition("@")
        if stage != self.stage.name or (table and table != name):
            return
        from tokens2policy.lakehouse.tables import table_version

        changed = [t for t in self.stage.outputs if table_version(self.spark, self.full_config, t)
                   != self.start_versions.get(t)]
        if changed:
            self.echo(f"[t2p] {FAULT_ENV}: killing {self.stage.name} before writing '{name}' (already committed: "
                      f"{', '.join(changed)})")
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def write(self, name: str, df, mode: str = "overwrite", replace_where: Optional[str] = None,
              partition_by: Optional[Sequence[str]] = None, overwrite_schema: bool = False,
              check_schema: bool = True, user_metadata: Optional[str] = None) -> None:
        """Write an output table in one Delta commit (partitioning from the registry unless given;
        ``user_metadata`` is stored with the commit, :func:`tokens2policy.lakehouse.commit_metadata`)."""
        from tokens2policy.lakehouse.schemas import TABLES
        from tokens2policy.lakehouse.tables import write_table

        self._check_writable(name)
        if check_schema:
            self._check_schema(name, df)
        if partition_by is None and name in TABLES:
            partition_by = list(TABLES[name].partition_by) or None
        self._before_commit(name)
        args = dict(mode=mode, partition_by=partition_by, replace_where=replace_where,
                    overwrite_schema=overwrite_schema, user_metadata=user_metadata)
        try:
            write_table(df, self.full_config, name, **args)
        except Exception as exc:  # noqa: BLE001 - only Delta's schema mismatch is handled, the rest re-raised
            if overwrite_schema or not any(code in str(exc) for code in SCHEMA_MISMATCH_ERRORS):
                raise
            added = self._upgradable_columns(name, df)  # raises one line when the difference is not additive
            self.echo(f"[t2p] {name}: adding column(s) {', '.join(added)} to the table (written by an older "
                      f"tokens2policy; existing rows get nulls)")
            write_table(df, self.full_config, name, merge_schema=True, **args)

    def _upgradable_columns(self, name: str, df) -> List[str]:
        """The columns ``df`` adds to the existing table ``name`` when the table's schema is an older version of
        the registered contract: every table column is in the frame with the same type, and every added column is
        the registry's. Anything else raises :class:`SchemaContractError` in one line, naming the differences."""
        from tokens2policy.lakehouse.schemas import TABLES, SchemaContractError
        from tokens2policy.lakehouse.tables import delta_table, table_location

        table = delta_table(self.spark, self.full_config, name).toDF()
        old = {f.name: f.dataType.simpleString() for f in table.schema}
        new = {f.name: f.dataType.simpleString() for f in df.schema}
        contract = set(TABLES[name].column_names) if name in TABLES else set()
        added = [c for c in new if c not in old]
        dropped = [c for c in old if c not in new]
        retyped = [f"{c} {old[c]} -> {new[c]}" for c in old if c in new and old[c] != new[c]]
        foreign = [c for c in added if c not in contract]
        if dropped or retyped or foreign or not added:
            parts = [f"columns not in the frame: {', '.join(dropped)}" if dropped else "",
                     f"types changed: {'; '.join(retyped)}" if retyped else "",
                     f"columns outside the contract: {', '.join(foreign)}" if foreign else ""]
            raise SchemaContractError(
                f"table '{name}' at {table_location(self.full_config, name)} has a schema this version cannot "
                f"append to ({'; '.join(p for p in parts if p) or 'Delta reports a metadata mismatch'}): write "
                f"to a fresh lakehouse or migrate the table") from None
        return added

    def write_experiments(self, name: str, df, experiment_ids: Iterable) -> None:
        """Replace the rows of these experiments (all others stay) in one commit; create the table if needed."""
        from tokens2policy.lakehouse.tables import experiments_predicate, table_exists

        ids = sorted({str(e) for e in experiment_ids})
        if table_exists(self.spark, self.full_config, name):
            pred = experiments_predicate(ids)
            self.write(name, df, mode="overwrite", replace_where=pred)
        else:
            self.write(name, df, mode="overwrite")

    def write_experiment_tables(self, frames: Sequence[Tuple[str, Any]], experiment_ids: Iterable) -> None:
        """:meth:`write_experiments` for several tables: one commit per table, the first alone, the others at once.

        Why: each commit of a small table is a few Spark jobs of pure latency (Delta's snapshot of the table, the
        write, the commit; a ``replaceWhere`` overwrite also lists the table's files), so on a few cores two to
        four of them overlap (4 small tables, idle: created 3.0 s one after another vs 2.3 s this way, 12.1 vs
        6.8 s as ``replaceWhere`` overwrites; benchmarks/bench_delta_commits.py, docs/benchmarks.md). The first
        table is written alone so that a stage killed "between two of its commits" (the fault injection above, and
        a real crash) still stops with one table committed and the others not; the remaining writes run in threads that inherit this thread's
        Spark local properties (job group, scheduler pool), and every one of them finishes before the first
        error, if any, is raised — no write is abandoned half-way by this method.
        """
        from concurrent.futures import ThreadPoolExecutor

        from pyspark.util import inheritable_thread_target

        ids = sorted({str(e) for e in experiment_ids})
        frames = list(frames)
        if not frames:
            return
        for name, df in frames:  # every frame checked before the first commit (write() checks it again: a few
            self._check_writable(name)  # comparisons of column names and types, no Spark job)
            self._check_schema(name, df)
        first, rest = frames[0], frames[1:]
        self.write_experiments(first[0], first[1], ids)
        for name, _ in rest:
            self._before_commit(name)
        if not rest:
            return
        # the session given: its tags and local properties follow (and a Spark Connect session is the child's)
        write = inheritable_thread_target(self.spark)(lambda item: self.write_experiments(item[0], item[1], ids))
        with ThreadPoolExecutor(max_workers=min(4, len(rest)), thread_name_prefix="t2p-write") as pool:
            futures = [pool.submit(write, item) for item in rest]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    def merge(self, name: str, df, keys: Iterable[str], **kwargs) -> Dict[str, int]:
        """:func:`tokens2policy.lakehouse.merge_table` into an output table (creates it on first use)."""
        from tokens2policy.lakehouse.tables import merge_table

        from tokens2policy.lakehouse.schemas import TABLES

        self._check_writable(name)
        self._check_schema(name, df)
        if kwargs.get("partition_by") is None and name in TABLES:
            kwargs["partition_by"] = list(TABLES[name].partition_by) or None
        self._before_commit(name)
        return merge_table(self.spark, self.full_config, name, df, keys, **kwargs)

    def delta_table(self, name: str):
        """The DeltaTable of an output (for a MERGE or DELETE the job builds itself) or of an input (history)."""
        from tokens2policy.lakehouse.tables import delta_table

        if name in self.stage.outputs:
            self._before_commit(name)
        else:
            self._check_readable(name)
        return delta_table(self.spark, self.full_config, name)

    def output_versions(self) -> Dict[str, Optional[int]]:
        from tokens2policy.lakehouse.tables import table_version

        return {t: table_version(self.spark, self.full_config, t) for t in self.stage.outputs}

    # -- timing and MLflow --------------------------------------------------------------------------------
    def new_clock(self, scope: str, echo: bool = False) -> Clock:
        """A clock for one part of the stage (e.g. one experiment); logged as ``seconds.<scope>.<step>``."""
        clock = Clock(self.echo if echo else None, label=f"{self.stage.name} {scope}")
        self.clocks[scope] = clock
        return clock

    def timings(self) -> Dict[str, Dict[str, float]]:
        out = {"": dict(self.clock.laps)} if self.clock.laps else {}
        out.update({scope: dict(c.laps) for scope, c in self.clocks.items() if c.laps})
        return out

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Log the finite numeric metrics (keys made MLflow-safe); nothing for an untracked stage."""
        if self.run is None:
            return
        import mlflow

        clean = {}
        for k, v in metrics.items():
            try:
                x = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(x):
                clean[metric_key(k)] = x
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.run is not None:
            import mlflow

            mlflow.log_params({metric_key(k): str(v)[:500] for k, v in params.items()})

    def log_dict(self, data, artifact_file: str) -> None:
        if self.run is not None:
            import mlflow

            mlflow.log_dict(data, artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: Optional[str] = None) -> None:
        if self.run is not None:
            import mlflow

            mlflow.log_artifacts(local_dir, artifact_path=artifact_path)

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        if self.run is not None:
            import mlflow

            mlflow.log_artifact(local_path, artifact_path)

    def set_tag(self, key: str, value) -> None:
        if self.run is not None:
            import mlflow

            mlflow.set_tag(key, value)

    def _finish(self, outputs: Mapping[str, Optional[int]]) -> None:
        """At the end of a successful job: timings and output versions to the MLflow run."""
        if self.run is None:
            return
        import mlflow

        timings = self.timings()
        if timings:
            mlflow.log_dict(timings, "timings.json")
            self.log_metrics({("seconds." + (f"{scope}." if scope else "") + step): s
                              for scope, laps in timings.items() for step, s in laps.items()})
        if outputs:  # one store call for all of them
            mlflow.set_tags({f"output_version.{table}": "none" if version is None else str(version)
                             for table, version in outputs.items()})


def _tracked(stage, config: Config) -> bool:
    flag = stage.tracked
    if isinstance(flag, str):
        section, _, key = flag.partition(".")
        return bool(getattr(getattr(config, _SECTION_FIELD.get(section, section)), key))
    return bool(flag)


@dataclass
class StageResult:
    summary: dict
    output_versions: Dict[str, Optional[int]]
    run_id: Optional[str]
    config_reads: frozenset
    tables_read: frozenset


def run_stage_job(spark, config: Config, stage, job: Callable[[StageContext], Optional[dict]],
                  versions: Optional[Mapping[str, Any]] = None, echo: Callable = print,
                  preflight: Optional[Callable] = None) -> StageResult:
    """Run ``job(ctx)`` for ``stage``: run ``preflight(spark, config_view)`` (checks of its settings that must fail
    in one line before any work), pin inputs (unless ``versions`` are given), open the MLflow run, call the job, log
    timings and output versions. Raises what the job raises (the MLflow run is then marked failed)."""
    from tokens2policy.stages import pinned_versions

    if preflight is not None:
        preflight(spark, ConfigView(config, stage.readable, stage.name))
    if versions is None:
        versions = pinned_versions(spark, config, stage)
    ctx = StageContext(spark, config, stage, versions, echo=echo)
    with contextlib.ExitStack() as stack:
        if _tracked(stage, config):
            from tokens2policy.tracking import stage_run

            tables = {t: ctx.versions.get(t) for t in stage.inputs}
            ctx.run = stack.enter_context(stage_run(config, stage.name, inputs=tables))
            if "source" in ctx.versions:
                ctx.set_tag("t2p.source_fingerprint", str(ctx.versions["source"]))
        summary = job(ctx) or {}
        outputs = ctx.output_versions()
        ctx._finish(outputs)
    return StageResult(summary, outputs, ctx.run_id, ctx.config.reads, frozenset(ctx.tables_read))


def run_job(spark, config: Config, stage_name: str, job: Callable[[StageContext], Optional[dict]],
            preflight: Optional[Callable] = None) -> dict:
    """A job called directly (tests, notebooks, benchmarks): ``run_stage_job`` for the named stage, its summary.
    Unlike ``t2p run`` it neither takes the run lock nor records ``stage_runs``."""
    from tokens2policy.stages import get_stage

    return run_stage_job(spark, config, get_stage(stage_name), job, preflight=preflight).summary


def context_of(config) -> Optional[StageContext]:
    """The StageContext a config view belongs to (None for a plain :class:`Config`)."""
    return getattr(config, "stage_context", None) if isinstance(config, ConfigView) else None


def json_versions(versions: Mapping[str, Any]) -> str:
    return json.dumps(dict(versions), sort_keys=True, default=str)
