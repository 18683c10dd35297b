"""Design 3 — distributed drivers: a lexicon attribute that cuts across topics plus a topical driver, on two corpora.

The demo's drivers are topics, which a small document-level dictionary isolates best. Here the effect is driven by

    tau = base + effect * (1.0 * 1{tone = positive} - 0.8 * 1{topic = T})

with ``tone = positive`` the lexicon attribute of :mod:`tokens2policy.validate.corpora` (mean VADER valence of the
text in the corpus' top third: many words spread over the text, across topics — a *distributed* driver) and T a
topic (``politics`` on BBC News, ``birth_control`` on the drug reviews): one strong and one moderate driver.

Each design point names a corpus and a **representation variant** (:func:`parse_variant`), built once per study on
the driver by :func:`build_driver_representation` from the cached corpus embeddings
(:func:`tokens2policy.validate.corpora.embed_corpus`) and stored in the format of design 2
(:mod:`tokens2policy.validate.text`, with the driver attributes added), so the simulation (:func:`simulate_text`),
the truths (best-F1 and aligned neurons per driver, aligned share 0.5) and the selection metrics are design 2's own
code. A repetition also computes the **heterogeneity coverage** as the pipeline does (:func:`coverage_rows`): the draw
through identify (on the selection units) and effects (on the estimation units) with the stages' defaults, the
``calibration`` table's coverage share and CI against its truth computed from the simulated tau.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

DRIVERS = {"bbc": (("tone=positive", 1.0), ("topic=politics", -0.8)),
           "drugs": (("tone=positive", 1.0), ("topic=birth_control", -0.8))}
TRAIN_STEPS = 800      # optimizer steps per dictionary (the demo pipeline's SAE: 20,000 units x 20 epochs / 512)


def parse_variant(spec: str) -> dict:
    """``<doc|tok>:<n_latents>:<k>[:m<p1>-<p2>...]`` -> dict(train_on, n_latents, k, matryoshka).

    ``doc``: the SAE is trained on and encodes document vectors (the pipeline's ``train_on: documents``,
    ``encode: document``); ``tok``: trained on token states, each document's code the max over its token codes
    (``train_on: tokens``, ``encode: tokens_maxpool``); ``m16-64``: Matryoshka prefixes (``represent.matryoshka``)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("doc", "tok"):
        raise ValueError(f"representation variant {spec!r} must be '<doc|tok>:<n_latents>:<k>[:m<p1>-<p2>]'")
    pre = ()
    if len(parts) == 4:
        if not parts[3].startswith("m"):
            raise ValueError(f"representation variant {spec!r}: the 4th part must be m<p1>-<p2>...")
        pre = tuple(int(x) for x in parts[3][1:].split("-"))
    return dict(train_on="tokens" if parts[0] == "tok" else "documents", n_latents=int(parts[1]), k=int(parts[2]),
                matryoshka=pre)


def _max_pool(codes: sp.csr_matrix, owner: np.ndarray, n_docs: int) -> sp.csr_matrix:
    """Element-wise max of the rows of ``codes`` per owner (non-negative codes; an owner without rows: empty)."""
    coo = codes.tocoo()
    key = owner[coo.row].astype(np.int64) * codes.shape[1] + coo.col
    order = np.lexsort((-coo.data, key))
    key, data = key[order], coo.data[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, data = key[first], data[first]
    return sp.csr_matrix((data, (key // codes.shape[1], key % codes.shape[1])), shape=(n_docs, codes.shape[1]))


def build_driver_representation(cfg, corpus: str, variant: str, out_dir, seed: int = 0) -> Path:
    """Train the variant's dictionary on the corpus embeddings and store codes + topics + driver attributes (cached
    by corpus, variant, embedding model and seed)."""
    from tokens2policy.represent.sae import SparseAutoencoder

    from .corpora import attributes, embed_corpus, load_corpus

    v = parse_variant(variant)
    emb_path = embed_corpus(cfg, corpus, out_dir)
    key = hashlib.sha256(json.dumps([str(emb_path), variant, seed, TRAIN_STEPS, cfg.represent.lr,
                                     cfg.represent.batch_size]).encode()).hexdigest()[:12]
    out = Path(out_dir) / f"drivers_{corpus}_{variant.replace(':', '_')}_{key}.npz"
    if out.exists():
        return out
    E = np.load(emb_path)
    X, keep = E["X"].astype(np.float32), E["keep"]
    train = X if v["train_on"] == "documents" else E["tokens"].astype(np.float32)
    batch = min(int(cfg.represent.batch_size), len(train))
    epochs = max(1, math.ceil(TRAIN_STEPS * batch / len(train)))
    t0 = time.perf_counter()
    sae = SparseAutoencoder(n_latents=v["n_latents"], k=v["k"], lr=cfg.represent.lr, epochs=epochs, batch_size=batch,
                            seed=seed, aux_k=cfg.represent.aux_k, matryoshka=v["matryoshka"], num_threads=1).fit(train)
    seconds = time.perf_counter() - t0
    if v["train_on"] == "documents":
        codes = sp.csr_matrix(sae.encode(X))
    else:
        codes = _max_pool(sp.csr_matrix(sae.encode(train)), E["token_doc"], len(X))
    docs = load_corpus(corpus).iloc[keep]
    A, names = attributes(corpus)
    metrics = dict(sae.metrics(X if v["train_on"] == "documents" else train), epochs=epochs, train_rows=len(train),
                   train_seconds=round(seconds, 1), mean_l0_codes=float(np.diff(codes.indptr).mean()))
    topic_names = sorted(docs["topic"].unique())
    np.savez_compressed(out, data=codes.data, indices=codes.indices, indptr=codes.indptr, shape=np.array(codes.shape),
                        topics=docs["topic"].to_numpy().astype(str), topic_names=np.array(topic_names),
                        attributes=A[keep].astype(np.int8), attribute_names=np.array(names),
                        f1=np.zeros((0, codes.shape[1])), metrics=json.dumps(metrics))
    return out


def driver_design(corpus: str, variant: str, n: int, effect: float, representation: str):
    from .text import TextDesign

    mains = TextDesign().main_effects if corpus == "bbc" else ()
    return TextDesign(n=int(n), effect=float(effect), modifiers=DRIVERS[corpus], main_effects=mains,
                      representation=str(representation), kind=f"drivers/{corpus}/{variant}")


# --------------------------------------------------------------------------------------------- coverage per draw
def _indicators(z: sp.spmatrix, cols: Sequence[int]) -> np.ndarray:
    if not len(cols):
        return np.zeros((z.shape[0], 0))
    return (sp.csc_matrix(z)[:, list(cols)].toarray() > 0).astype(float)


def coverage_rows(task, sim, selected: Sequence[int], alpha: float, seed: int, n_bootstrap: int = 200,
                  n_features: int = 64) -> List[Dict]:
    """Heterogeneity coverage on this draw as the pipeline computes it, and its truths.

    The draw is written in the stage-table layout and run through the stages' cores with their defaults
    (:func:`tokens2policy.validate.coverage_path.stage_coverage`): identify's NEXIS on the ``selection`` units,
    the effects stage on the ``estimation`` units (nested cross-fitting, ``n_features`` most frequent neurons in
    the full learner). ``selected`` (the study method's selection on all units) is not used: the stage selects
    on its own half, and the coverage statistic is about that selection. Rows:

    * ``coverage share``: estimate and bootstrap CI from the ``calibration`` table; true value: the same share with
      the simulated tau in place of the DR scores, on the same units and predictions;
    * ``tau share selected``: R² of the true tau on the stage's selected neurons' indicators (estimation units);
    * ``tau share features``: R² of the true tau on the full learner's features (all units) — reported, not
      estimated (no CI)."""
    from .coverage_path import stage_coverage
    from .pipeline_path import path_config
    from .study import _coverage_row
    from tokens2policy.identify import make_folds

    del selected  # the stage selects on its own half (docstring)
    t0 = time.perf_counter()
    n = len(sim.y)
    z = sp.csr_matrix(sim.z)
    unit_id = np.array([f"u{i:06d}" for i in range(n)], dtype=object)
    exp = f"drivers-{task['rep']}"
    units = pd.DataFrame({"experiment_id": exp, "unit_id": unit_id, "treatment": sim.t.astype(int),
                          "outcome": sim.y, "fold": make_folds(n, 5, seed).astype(np.int32)})
    neurons = pd.DataFrame({"experiment_id": exp, "unit_id": unit_id,
                            "indices": [z.indices[z.indptr[i]:z.indptr[i + 1]].astype(np.int32) for i in range(n)],
                            "values": [z.data[z.indptr[i]:z.indptr[i + 1]].astype(np.float32) for i in range(n)]})
    cfg = path_config("split", [f"effects.nuisance_neurons={int(n_features)}", f"effects.n_bootstrap={int(n_bootstrap)}",
                                f"effects.alpha={alpha}", f"identify.alpha={alpha}", f"seed={int(seed)}"])
    r = stage_coverage(cfg, units, neurons, np.asarray(sim.tau, float))
    counts = np.diff(sp.csc_matrix(z).indptr)
    top = [int(j) for j in np.argsort(-counts, kind="stable")[:n_features] if counts[j] > 0]
    X = sp.csc_matrix(z)[:, list(dict.fromkeys(r["selected"] + top))].toarray()
    F1 = np.column_stack([np.ones(n), X])
    beta, *_ = np.linalg.lstsq(F1, sim.tau, rcond=None)
    r2_features = float(1 - np.var(sim.tau - F1 @ beta) / np.var(sim.tau)) if np.var(sim.tau) > 0 else np.nan
    secs = time.perf_counter() - t0
    rows = [_coverage_row(task, "coverage share", r["estimate"], np.nan, r["ci_low"], r["ci_high"],
                          r["true_value"], secs)]
    rows[0]["se"] = r["warning"]   # the warning flag of this draw (se has no meaning for a percentile CI)
    rows.append(_coverage_row(task, "tau share selected", r["tau_share_selected"], np.nan, np.nan, np.nan, np.nan, 0.0))
    rows.append(_coverage_row(task, "tau share features", r2_features, np.nan, np.nan, np.nan, np.nan, 0.0))
    return rows


# --------------------------------------------------------------------------------------------- summaries
def driver_hits(df: pd.DataFrame) -> pd.DataFrame:
    """Per selection row: whether each driver's aligned group was hit (columns ``hit_<driver>``, in the design's
    modifier order; the drivers are named from the design label's corpus)."""
    sel = df[(df["kind"] == "selection") & df["design"].str.startswith("drivers/")].copy()
    for i in range(2):
        sel[f"hit_{i}"] = np.nan
    for idx, r in sel.iterrows():
        groups = json.loads(r["aligned"]) if r["effect"] != 0 else []
        chosen = set(json.loads(r["selected"]))
        for i, g in enumerate(groups[:2]):
            sel.at[idx, f"hit_{i}"] = float(bool(chosen & set(g)))
    return sel


def summarize_drivers(df: pd.DataFrame) -> pd.DataFrame:
    """Per design point (corpus/variant, n, effect) and method: recall of each driver, both found, IoU_aligned,
    |S|, FWER (effect 0); and the coverage statistic of the point (mean estimate, mean truth, CI coverage of the
    truth, warning rate, true shares of Var(tau))."""
    from .study import mean_interval, wilson_interval

    sel = driver_hits(df)
    out = []
    for key, g in sel.groupby(["design", "n", "effect", "method"], sort=True):
        rec = dict(zip(["design", "n", "effect", "method"], key), reps=len(g))
        corpus = key[0].split("/")[1]
        for i, (name, _) in enumerate(DRIVERS.get(corpus, ())):
            v = g[f"hit_{i}"]
            if v.notna().any():
                rec[f"recall_{name}"] = float(v.mean())
                rec[f"recall_{name}_lo"], rec[f"recall_{name}_hi"] = wilson_interval(float(v.sum()), float(v.notna().sum()))
        if g["effect"].iloc[0] != 0:
            both = (g["hit_0"] == 1) & (g["hit_1"] == 1)
            rec["both_found"] = float(both.mean())
            rec["both_found_lo"], rec["both_found_hi"] = wilson_interval(float(both.sum()), len(g))
        m, lo, hi, _ = mean_interval(g["iou_aligned"])
        rec.update(iou_aligned=m, iou_aligned_lo=lo, iou_aligned_hi=hi, n_selected=float(g["n_selected"].mean()))
        k = float(g["any_selected"].sum())
        rec["any_selected"] = k / len(g)
        rec["any_selected_lo"], rec["any_selected_hi"] = wilson_interval(k, len(g))
        out.append(rec)
    summary = pd.DataFrame(out)
    cov = df[(df["kind"] == "coverage") & df["design"].str.startswith("drivers/")]
    crec = []
    for key, g in cov.groupby(["design", "n", "effect"], sort=True):
        rec = dict(zip(["design", "n", "effect"], key))
        c = g[g["estimand"] == "coverage share"]
        ok = c["covered"].notna()
        rec.update(coverage_share=float(c["estimate"].mean()), coverage_share_truth=float(c["true_value"].mean()),
                   coverage_ci_covers=float(c.loc[ok, "covered"].mean()) if ok.any() else np.nan,
                   coverage_warning=float(c["se"].mean()),
                   tau_share_selected=float(g.loc[g["estimand"] == "tau share selected", "estimate"].mean()),
                   tau_share_features=float(g.loc[g["estimand"] == "tau share features", "estimate"].mean()))
        crec.append(rec)
    if crec:
        summary = summary.merge(pd.DataFrame(crec), on=["design", "n", "effect"], how="left")
    return summary


def _key(text: str) -> str:
    import re

    return re.sub(r"[^\w\-. /]", "_", str(text))


def driver_metrics(summary: pd.DataFrame) -> Dict[str, float]:
    """Headline MLflow metrics: per design (corpus/variant) and method at its largest n, both drivers' recall and
    the share of repetitions finding both; the FWER of effect-0 points; the coverage statistic and its truth."""
    out: Dict[str, float] = {}
    if summary.empty:
        return out
    for (design, method), g in summary.groupby(["design", "method"]):
        real = g[g["effect"] != 0]
        if not real.empty:
            top = real[real["n"] == real["n"].max()].iloc[0]
            base = _key(f"drivers.{design}.n{int(top['n'])}.{method}")
            for col in [c for c in g.columns if c.startswith("recall_") and not c.endswith(("_lo", "_hi"))] + \
                    ["both_found", "iou_aligned", "coverage_share", "coverage_share_truth"]:
                if col in top and pd.notna(top[col]):
                    out[_key(f"{base}.{col}")] = float(top[col])
        for _, r in g[g["effect"] == 0].iterrows():
            out[_key(f"drivers.{design}.n{int(r['n'])}.{method}.fwer")] = float(r["any_selected"])
    return out


def driver_figures(summary: pd.DataFrame, out_dir) -> Dict[str, Path]:
    """``validation_drivers_recall.png`` (share of repetitions finding each driver and both, vs n, one panel per
    corpus x representation) and ``validation_drivers_coverage.png`` (the coverage statistic vs its truth)."""
    from tokens2policy.report.plots import pyplot, save_figure

    real = summary[summary["effect"] != 0] if not summary.empty else summary
    if real.empty:
        return {}
    plt = pyplot()
    out = Path(out_dir)
    designs = sorted(real["design"].unique())
    cols = min(3, len(designs))
    rows_ = math.ceil(len(designs) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.6 * rows_), squeeze=False, sharey=True)
    colors = {}
    for ax, design in zip(axes.ravel(), designs):
        g = real[real["design"] == design]
        corpus = design.split("/")[1]
        names = [n for n, _ in DRIVERS.get(corpus, ())]
        for method in sorted(g["method"].unique()):
            h = g[g["method"] == method].sort_values("n")
            c = colors.setdefault(method, f"C{len(colors)}")
            ax.plot(h["n"], h["both_found"], "-o", color=c, ms=4, label=f"{method}: both")
            for name, ls in zip(names, (":", "--")):
                if f"recall_{name}" in h:
                    ax.plot(h["n"], h[f"recall_{name}"], ls, color=c, lw=1, label=f"{method}: {name}")
        ax.axhline(0.8, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(sorted(g["n"].unique()))
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(design.replace("drivers/", ""), fontsize=9)
        ax.set_xlabel("sample size n")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(designs):]:
        ax.axis("off")
    axes[0][0].set_ylabel("share of repetitions (driver found)")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.suptitle("Design 3: distributed (tone) + topical driver — recall per driver and both found "
                 "(solid: both; dotted: tone; dashed: topic)", fontsize=9)
    made = {"drivers_recall": out / "validation_drivers_recall.png"}
    save_figure(fig, made["drivers_recall"])
    if "coverage_share" in real:
        cov = real.drop_duplicates(["design", "n"]).dropna(subset=["coverage_share"])
        if not cov.empty:
            fig, ax = plt.subplots(figsize=(5.2, 4.2))
            for i, (design, g) in enumerate(cov.groupby("design")):
                ax.plot(g["coverage_share_truth"], g["coverage_share"], "o", color=f"C{i}",
                        label=design.replace("drivers/", ""))
                ax.plot(g["coverage_share_truth"], g["tau_share_selected"], "x", color=f"C{i}", ms=5)
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="true share of the detectable heterogeneity (from tau)",
                   ylabel="coverage estimate (o) / true share of Var(tau) (x)")
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
            made["drivers_coverage"] = out / "validation_drivers_coverage.png"
            save_figure(fig, made["drivers_coverage"])
    return {k: Path(v) for k, v in made.items()}
