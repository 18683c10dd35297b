"""A small real pipeline for the storage tests: the demo experiment's logs (BBC News text), made small."""
from __future__ import annotations

from typing import Dict, List

# small enough for a slow test on 2 cores; every stage still does its real work
FAST = ["demo.n_units=240", "represent.epochs=2", "effects.n_bootstrap=20", "spark.driver_memory=3g",
        "policy.register_model=false", "report.log_to_mlflow=false"]
# the demo logs read as plain files: the column mapping the demo kind implies, spelled out
AS_FILES = ["source.assigned_at_col=assigned_at", "source.measured_at_col=measured_at",
            "ingest.expected_treated_share=0.5"]
THROUGH_POLICY = ("ingest", "embed", "represent", "identify", "effects", "policy")
# every table a stage writes per experiment (ingest: MERGE; the rest: overwrite with replaceWhere / by experiment)
PER_EXPERIMENT = ("units", "embeddings", "neurons", "modifiers", "selection_trace", "marginal_screen", "gates",
                  "effects", "policy_rules", "policy_value", "assignments")


def demo_logs(spark, data_dir: str, tracking: str, n_units: int = 240):
    """The demo's raw logs (with its deliberately broken rows), generated under ``data_dir``."""
    from tokens2policy.config import load_config
    from tokens2policy.ingest.demo import ensure_demo

    cfg = load_config(None, [f"data_dir={data_dir}", f"tracking.tracking_uri={tracking}", f"demo.n_units={n_units}"])
    return ensure_demo(spark, cfg)


def rows_by_experiment(spark, cfg, tables=PER_EXPERIMENT) -> Dict[str, Dict[str, List[tuple]]]:
    """{table: {experiment_id: sorted rows}} (floats rounded to 9 digits; list columns as tuples)."""
    from tokens2policy.lakehouse import read_table

    def norm(v):
        if isinstance(v, float):
            return round(v, 9)
        if isinstance(v, list):
            return tuple(norm(x) for x in v)
        return v

    out: Dict[str, Dict[str, List[tuple]]] = {}
    for t in tables:
        got: Dict[str, List[tuple]] = {}
        for r in read_table(spark, cfg, t).collect():
            d = r.asDict()
            got.setdefault(d["experiment_id"], []).append(tuple(norm(d[k]) for k in sorted(d)))
        out[t] = {e: sorted(rows, key=repr) for e, rows in got.items()}
    return out
