"""Figures are written from summaries (and skipped when the sweep cannot support them)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from tokens2policy.validate import plots
from tokens2policy.validate.study import summarize_coverage, summarize_selection


def _rows():
    rng = np.random.default_rng(0)
    recs = []
    for design, eff in (("linear", 0.25), ("linear", 0.5), ("null", 0.0)):
        for n in (250, 1000):
            for method in ("nexis_hc2", "marginal_bh"):
                for rep in range(5):
                    sel = float(rng.uniform() < 0.1)
                    recs.append(dict(design=design, outcome="gaussian", n=n, m=10, effect=eff, kind="selection",
                                     method=method, family=method.split("_")[0],
                                     iou=np.nan if design == "null" else rng.uniform(), precision=np.nan,
                                     recall=np.nan, n_selected=sel, any_selected=sel))
    for n in (250, 1000):  # design 2: strict and topic-aligned IoU
        for method in ("nexis_hc2", "marginal_bh"):
            for rep in range(5):
                recs.append(dict(design="text", outcome="gaussian", n=n, m=128, effect=1.0, kind="selection",
                                 method=method, family=method.split("_")[0], iou=rng.uniform(0, 0.3),
                                 iou_aligned=rng.uniform(0.3, 1), precision=np.nan, recall=np.nan,
                                 n_selected=3.0, any_selected=1.0))
    for rep in range(20):
        for eff in (0.25, 0.5):  # several effects at the coverage n: one series each
            recs.append(dict(design="linear", outcome="gaussian", n=1000, m=10, effect=eff, kind="coverage",
                             estimand="policy value", covered=float(rep % 10 != 0), estimate=0.0, true_value=0.0,
                             ci_low=-1.0, ci_high=1.0))
    return pd.DataFrame(recs)


def test_all_figures_are_written(tmp_path):
    rows = _rows()
    sel, cov = summarize_selection(rows), summarize_coverage(rows)
    made = plots.all_figures(sel, cov, tmp_path, alpha=0.05)
    assert set(made) == {"iou_vs_n", "iou_vs_effect", "null_fwer", "coverage", "text_iou_vs_n"}
    for path in made.values():
        assert path.name.startswith("validation_") and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000
    one_effect = sel[sel["effect"] != 0.25]
    assert plots.iou_vs_effect(one_effect, tmp_path / "x.png") is None  # one effect size: no effect sweep
    assert plots.null_fwer(sel[sel["design"] != "null"], tmp_path / "y.png") is None
    assert plots.text_iou_vs_n(sel[sel["design"] != "text"], tmp_path / "z.png") is None
    # design 2 rows stay out of the design-1 panels
    assert plots.iou_vs_n(sel[sel["design"].isin(["text", "null"])], tmp_path / "w.png") is None
