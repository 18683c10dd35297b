"""Randomization check: treated share and covariate balance per experiment.

* Treated share ``p_hat`` against the expected share ``p`` (``ingest.expected_treated_share``, or the demo's design
  share): ``z = (p_hat - p) / sqrt(p (1 - p) / n)``; ``|z| > ingest.share_tolerance_sd`` flags a sample-ratio
  mismatch (Fabijan et al. 2019, "Diagnosing Sample Ratio Mismatch in Online Controlled Experiments", KDD).
  Without an expected share the share is reported only.
* Per covariate the standardized mean difference ``SMD = (m1 - m0) / sqrt((s1^2 + s0^2) / 2)`` (Austin 2009, Stat.
  Med. 28:3083) and Welch's ``z = (m1 - m0) / sqrt(s1^2/n1 + s0^2/n0)``. A warning needs both a practically large
  imbalance (``|SMD| > ingest.smd_warn``, 0.1 by convention) and one unlikely under randomization
  (``|z| > ingest.smd_tolerance_sd``): with n in the thousands chance alone rarely crosses either, and in small
  experiments an SMD of 0.1 is common noise that should not raise an alarm.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from tokens2policy.config import IngestConfig


def balance_stats(units: DataFrame, covariates: Sequence[str]) -> Dict[str, dict]:
    """One small aggregation: per experiment n, n_treated and per-arm mean/variance of every covariate."""
    t = F.col("treatment")
    aggs = [F.count(F.lit(1)).alias("n"), F.sum(t).alias("n1")]
    for i, c in enumerate(covariates):
        x = F.col(f"`{c}`")
        aggs += [F.avg(F.when(t == 1, x)).alias(f"m1_{i}"), F.avg(F.when(t == 0, x)).alias(f"m0_{i}"),
                 F.var_samp(F.when(t == 1, x)).alias(f"v1_{i}"), F.var_samp(F.when(t == 0, x)).alias(f"v0_{i}")]
    out = {}
    for r in units.groupBy("experiment_id").agg(*aggs).collect():
        d = r.asDict()
        out[d["experiment_id"]] = {
            "n": int(d["n"]), "n_treated": int(d["n1"] or 0),
            "covariates": {c: {k: d[f"{k}_{i}"] for k in ("m1", "m0", "v1", "v0")} for i, c in enumerate(covariates)},
        }
    return out


def randomization_check(stats: Dict[str, dict], cfg: IngestConfig,
                        expected_share: Optional[float]) -> Tuple[Dict[str, dict], List[str]]:
    """Share test and SMDs per experiment; returns (report, warnings)."""
    report, warnings = {}, []
    for exp, s in sorted(stats.items()):
        n, n1 = s["n"], s["n_treated"]
        n0 = n - n1
        share = n1 / n if n else float("nan")
        rep = {"n": n, "n_treated": n1, "treated_share": share, "expected_share": expected_share, "share_z": None,
               "smd": {}, "smd_z": {}}
        if n1 == 0 or n0 == 0:
            warnings.append(f"experiment '{exp}': {'no treated' if n1 == 0 else 'no control'} units among {n}")
        if expected_share is not None and n:
            z = (share - expected_share) / math.sqrt(expected_share * (1 - expected_share) / n)
            rep["share_z"] = z
            if abs(z) > cfg.share_tolerance_sd:
                warnings.append(f"experiment '{exp}': treated share {share:.4f} vs expected {expected_share:.4f} "
                                f"(z = {z:.1f}) suggests broken randomization (sample-ratio mismatch)")
        for c, m in s["covariates"].items():
            if None in (m["m1"], m["m0"]) or n1 < 2 or n0 < 2:
                continue
            v1, v0 = m["v1"] or 0.0, m["v0"] or 0.0
            diff = m["m1"] - m["m0"]
            pooled = math.sqrt((v1 + v0) / 2)
            se = math.sqrt(v1 / n1 + v0 / n0)
            smd = diff / pooled if pooled > 0 else 0.0
            z = diff / se if se > 0 else 0.0
            rep["smd"][c], rep["smd_z"][c] = smd, z
            if abs(smd) > cfg.smd_warn and abs(z) > cfg.smd_tolerance_sd:
                warnings.append(f"experiment '{exp}': covariate '{c}' SMD {smd:+.3f} (z = {z:.1f}) suggests "
                                f"broken randomization")
        report[exp] = rep
    return report, warnings
