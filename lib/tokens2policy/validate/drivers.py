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
code. A repetition also computes the **heterogeneity coverage** of the default method's selection
(:func:`coverage_rows`): the effects stage's learners on the draw (ridge nuisances on the selected and the 64 most
frequent neurons, DR-learner linear on the selected neurons' indicators vs ridge on all those features) and
:func:`tokens2policy.effects.coverage.heterogeneity_coverage`, against its truth computed from the simulated tau.
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


def coverage_rows(task, sim, selected: Sequence[int], alpha: float, seed: int, n_bootstrap: int = 100,
                  n_features: int = 64) -> List[Dict]:
    """Heterogeneity coverage of ``selected`` on this draw with the effects stage's learners, and its truths:

    * ``coverage share``: estimate and bootstrap CI of
      :func:`~tokens2policy.effects.coverage.heterogeneity_coverage`; true value: the same share with the simulated
      tau in place of the DR scores (no noise, no debiasing needed);
    * ``tau share selected`` / ``tau share features``: R² of the true tau on the selected neurons' indicators / on
      the full learner's features (what share of Var(tau) a linear function of them can carry) — reported, not
      estimated (no CI)."""
    from tokens2policy.effects import DRLearner, NuisanceParams, cross_fit_nuisances
    from tokens2policy.effects.coverage import explained_heterogeneity, heterogeneity_coverage
    from tokens2policy.identify import make_folds

    from .study import _coverage_row

    t0 = time.perf_counter()
    n = len(sim.y)
    z = sp.csc_matrix(sim.z)
    counts = np.diff(z.indptr)
    top = [int(j) for j in np.argsort(-counts, kind="stable")[:n_features] if counts[j] > 0]
    cols = list(dict.fromkeys([int(s) for s in selected] + top))
    X = z[:, cols].toarray()
    folds = make_folds(n, 5, seed)
    t = sim.t.astype(int)
    nu = cross_fit_nuisances(X, t, sim.y, folds, NuisanceParams("ridge"), seed=seed)
    Zs = _indicators(z, selected)
    sel = DRLearner(final="linear").fit(X, t, sim.y, folds, Z=Zs, nuisances=nu)
    full = DRLearner(final="ridge").fit(X, t, sim.y, folds, Z=X, nuisances=nu)
    phi = sel.scores_[:, 1] - sel.scores_[:, 0]
    res = heterogeneity_coverage(phi, sel.oof_cate_, full.oof_cate_, folds, alpha=alpha, n_bootstrap=n_bootstrap,
                                 seed=seed)
    S = np.column_stack([sel.oof_cate_, full.oof_cate_])
    joint = explained_heterogeneity(sim.tau, S, folds, debias=False)
    truth = explained_heterogeneity(sim.tau, S[:, :1], folds, debias=False) / joint if joint > 1e-12 else np.nan

    def r2(F):
        if F.shape[1] == 0 or np.var(sim.tau) == 0:
            return 0.0 if np.var(sim.tau) > 0 else np.nan
        F1 = np.column_stack([np.ones(n), F])
        beta, *_ = np.linalg.lstsq(F1, sim.tau, rcond=None)
        return float(1 - np.var(sim.tau - F1 @ beta) / np.var(sim.tau))

    secs = time.perf_counter() - t0
    rows = [_coverage_row(task, "coverage share", res.share, np.nan, res.share_ci[0], res.share_ci[1],
                          min(max(truth, 0.0), 1.0) if np.isfinite(truth) else np.nan, secs)]
    rows[0]["se"] = float(res.warning)   # the warning flag of this draw (se has no meaning for a percentile CI)
    rows.append(_coverage_row(task, "tau share selected", r2(Zs), np.nan, np.nan, np.nan, np.nan, 0.0))
    rows.append(_coverage_row(task, "tau share features", r2(X), np.nan, np.nan, np.nan, np.nan, 0.0))
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
