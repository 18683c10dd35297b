"""Where runs stand: each stage's last run and whether it is up to date (``t2p status``), each table's size,
version and last commit (``t2p tables``), and a table's first rows (``t2p show``).

Everything is read, nothing written. The up-to-date verdict and its reason come from
:func:`tokens2policy.stages.stale_reason`, the very function the runner's skip rule uses, so ``t2p status`` says
"stale: inputs changed: units 3 → 4" exactly when ``t2p run`` would rerun the stage for that reason. Each function
returns a pandas DataFrame (a notebook shows it as a table); :func:`to_text` prints one for the terminal.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from tokens2policy.config import Config, ConfigError

SHOW_CELL_CHARS = 60  # a text cell of `t2p show` is cut to this many characters
SHOW_LIST_ITEMS = 4  # an array cell of `t2p show` lists this many items, then "… (+n)"


def known_tables() -> List[str]:
    """Every table the pipeline writes, in pipeline order: each stage's outputs, then the run log and the
    tables written on the side (the demo's source and truth, represent's training copy, the cluster check)."""
    from tokens2policy.stages import EXTRA_STAGES, RUNS_TABLE, STAGES

    names: List[str] = []
    for stage in STAGES + EXTRA_STAGES:
        names += [t for t in stage.outputs if t not in names]
    side = [RUNS_TABLE, "demo_source", "demo_truth", "demo_drivers", "represent_training", "cluster_check"]
    return names + [t for t in side if t not in names]


def writer_of(table: str) -> str:
    """The stage (or side job) that writes ``table``."""
    from tokens2policy.stages import RUNS_TABLE, producer_of

    side = {RUNS_TABLE: "stage runner", "demo_source": "ingest (demo)", "demo_truth": "ingest (demo)",
            "demo_drivers": "ingest (demo)", "represent_training": "represent", "cluster_check": "jobs/cluster_check"}
    return producer_of(table) or side.get(table, "?")


def _versions_text(versions: Optional[Dict[str, Any]]) -> str:
    if not versions:
        return ""
    return ", ".join(f"{k}@{'missing' if v is None else v}" for k, v in sorted(versions.items()))


def _latest_runs(spark, config: Config) -> Dict[str, dict]:
    """Each stage's latest run in ``stage_runs``, whatever its status."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import read_table, table_exists
    from tokens2policy.stages import RUNS_TABLE

    if not table_exists(spark, config, RUNS_TABLE):
        return {}
    latest = Window.partitionBy("stage").orderBy(F.col("finished_at").desc())
    rows = (read_table(spark, config, RUNS_TABLE).withColumn("_rank", F.row_number().over(latest))
            .where(F.col("_rank") == 1).drop("_rank").collect())
    return {r["stage"]: r.asDict() for r in rows}


def stage_status(spark, config: Config) -> pd.DataFrame:
    """One row per pipeline stage (and per extra stage that ever ran, e.g. validate).

    Columns: stage; last_run (when the latest run finished), status (success/failed), seconds; inputs (the input
    versions that run read) and outputs (the output versions it wrote, when ``stage_runs`` records them);
    up_to_date (bool) and state ("up to date" or "stale: <why>", from the runner's own skip rule).
    """
    from tokens2policy.stages import EXTRA_STAGES, STAGES, last_successes, stale_reason

    latest = _latest_runs(spark, config)
    successes = last_successes(spark, config)
    rows = []
    for stage in STAGES + tuple(s for s in EXTRA_STAGES if s.name in latest):
        run = latest.get(stage.name) or {}
        reason = stale_reason(spark, config, stage, successes.get(stage.name)) if successes.get(stage.name) \
            else "never ran successfully"
        outputs = run.get("output_versions")
        state = "up to date" if reason is None else f"stale: {reason}"
        if run.get("status") == "failed" and run.get("error"):
            state += f" (last run failed: {run['error'].splitlines()[0][:120]})"
        rows.append({
            "stage": stage.name,
            "last_run": run.get("finished_at"),
            "status": run.get("status") or "never ran",
            "seconds": run.get("seconds"),
            "inputs": _versions_text(json.loads(run["input_versions"])) if run.get("input_versions") else "",
            "outputs": _versions_text(json.loads(outputs)) if isinstance(outputs, str) and outputs else "",
            "up_to_date": reason is None,
            "state": state,
        })
    return pd.DataFrame(rows, columns=["stage", "last_run", "status", "seconds", "inputs", "outputs", "up_to_date",
                                       "state"])


def table_overview(spark, config: Config, names: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per known table: rows, Delta version, when and how it was last committed (from the Delta
    history), and the stage that writes it. A table not written yet has exists=False and empty cells."""
    from concurrent.futures import ThreadPoolExecutor

    from tokens2policy.lakehouse import delta_table, read_table, table_exists

    def one(name: str) -> dict:
        row = {"table": name, "exists": False, "rows": None, "version": None, "last_commit": None,
               "operation": "", "written_by": writer_of(name)}
        if not table_exists(spark, config, name):
            return row
        last = delta_table(spark, config, name).history(1).collect()[0]
        params = last["operationParameters"] or {}
        mode = params.get("mode")
        row.update(exists=True, version=int(last["version"]), last_commit=last["timestamp"],
                   operation=str(last["operation"]) + (f" ({mode})" if mode else ""),
                   # Delta answers count() from the log's per-file statistics: no data file is read
                   rows=int(read_table(spark, config, name).count()))
        return row

    names = list(names) if names is not None else known_tables()
    with ThreadPoolExecutor(max_workers=4) as pool:  # small independent reads: overlap Spark's per-job latency
        rows = list(pool.map(one, names))
    df = pd.DataFrame(rows, columns=["table", "exists", "rows", "version", "last_commit", "operation", "written_by"])
    return df.astype({"rows": "Int64", "version": "Int64"})


def check_table_name(name: str) -> str:
    """``name`` if it is a table the pipeline writes, else a one-line :class:`ConfigError` listing them (a table
    name becomes part of a storage path or a catalog name, so only known names are accepted)."""
    known = known_tables()
    if name not in known:
        raise ConfigError(f"unknown table '{name}'; choose one of: {', '.join(known)}")
    return name


def readable(value: Any, chars: int = SHOW_CELL_CHARS, items: int = SHOW_LIST_ITEMS) -> Any:
    """A cell made short enough to read in a terminal row: long text cut with "…", arrays as their first items
    and a count, structs (Spark Rows, dicts) as ``key=value`` pairs. Numbers, None and dates are left as they are."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "asDict"):
        value = value.asDict()
    if isinstance(value, dict):
        text = ", ".join(f"{k}={readable(v, chars // 2, items)}" for k, v in value.items())
        return _cut("{" + text + "}", chars)
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        shown = ", ".join(str(readable(v, chars // 2, items)) for v in value[:items])
        more = f", … (+{len(value) - items})" if len(value) > items else ""
        return _cut(f"[{shown}{more}]", chars)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return _cut(" ".join(value.split()), chars)
    return value


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "…"


def table_head(spark, config: Config, name: str, limit: int = 20, version: Optional[int] = None) -> pd.DataFrame:
    """The first ``limit`` rows of a known table (as of a Delta ``version``), every cell made readable."""
    from tokens2policy.lakehouse import MissingTableError, read_table, table_exists, table_location
    from tokens2policy.stages import missing_table_hint

    check_table_name(name)
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if not table_exists(spark, config, name):
        raise MissingTableError(f"table '{name}' does not exist yet (looked at {table_location(config, name)}): "
                                f"{missing_table_hint(name)}")
    df = read_table(spark, config, name, version=version)
    rows = df.limit(int(limit)).collect()
    return pd.DataFrame([[readable(v) for v in r] for r in rows], columns=df.columns)


def _missing(v: Any) -> bool:
    return v is None or v is pd.NaT or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _cell_text(v: Any, column: str) -> str:
    if _missing(v):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}" if column == "seconds" else f"{v:.4g}"
    if column in ("last_run", "last_commit"):
        return str(v)[:19]  # to the second
    return str(v)


def to_text(df: pd.DataFrame) -> str:
    """A DataFrame as aligned terminal text: no index, numbers right-aligned (4 significant digits; seconds to
    0.1 s), text left-aligned, times to the second, missing values as "—"."""
    if df.empty:
        return "(no rows)"
    columns = [str(c) for c in df.columns]
    cells = [[_cell_text(v, c) for v in df[c].tolist()] for c in columns]
    numeric = [all(_missing(v) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in df[c].tolist())
               for c in columns]
    widths = [max(len(c), *(len(x) for x in col)) for c, col in zip(columns, cells)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns)] + [line([col[i] for col in cells]) for i in range(len(df))])
