"""Design 2 — semi-synthetic real text: the demo corpus through the real embed → SAE path.

The representation is built once on the driver (:func:`build_text_representation`): the 2,225 BBC News articles of
the demo corpus are embedded by the configured frozen model (``embed.*``, offline) and encoded by a TopK sparse
autoencoder trained on them (``represent.k``, ``represent.expansion`` / ``n_latents``, ``represent.epochs``). For
each topic and each SAE neuron, F1 of "neuron active" vs "article has the topic" is computed over the corpus; the
ground truth for a *driving* topic (a non-zero entry of ``demo.modifiers``) is its best-F1 neuron.

Each repetition (:func:`simulate_text`) draws n readers, each with a uniformly drawn article, a randomized T, and

    Y = m[topic] + T (base + effect * sum_k modifiers[k] 1{topic = k}) + N(0, noise_sd^2)

(the demo's outcome model without covariates and communities), and hands the SAE codes of the articles (a sparse
matrix) to the methods.

Two truths are scored (docs/validation.md, "Design 2"):

* **best-F1 neuron** per driving topic — the issue's definition. A TopK SAE with k of L latents active fires each
  neuron on about k/L of the articles (8/128 = 6 % for the demo dictionary), while a topic covers ~20 %, so a topic
  is carried by several sub-topic neurons and no single neuron reaches a high F1; NEXIS' minimal set then contains
  several neurons per topic and this strict truth under-rates every method.
* **topic-aligned neurons**: the neurons whose activations are mostly on the driving topic, precision
  P(topic = k | neuron active) > ``aligned_share`` (default 0.5: the topic is the neuron's majority topic). They
  form one group of interchangeable neurons per driving topic (the best-F1 neuron always in it), scored by the
  ``*_aligned`` metrics of :func:`tokens2policy.validate.study.selection_metrics`: a topic is recovered when a
  selected neuron is aligned with it, and a selected neuron aligned with no driving topic is a false positive.
"""
from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class TextDesign:
    n: int = 2000
    effect: float = 1.0                      # scales every topic modifier
    base: float = 0.5
    modifiers: tuple = (("sport", 1.5), ("politics", -1.0))
    main_effects: tuple = (("business", 0.2), ("entertainment", 0.1), ("politics", -0.1), ("sport", 0.3),
                           ("tech", 0.0))
    noise_sd: float = 1.0
    treated_share: float = 0.5
    representation: str = ""                 # path of the .npz written by build_text_representation
    aligned_share: float = 0.5               # topic-aligned neuron: P(topic | neuron active) above this
    kind: str = "text"
    outcome: str = "gaussian"

    @property
    def heterogeneity(self) -> float:
        return float(self.effect)

    def key(self) -> str:
        d = asdict(self)
        d.pop("representation")
        return "|".join(f"{k}={v}" for k, v in sorted(d.items()))

    def to_dict(self):
        d = asdict(self)
        d["modifiers"] = [list(x) for x in self.modifiers]
        d["main_effects"] = [list(x) for x in self.main_effects]
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["modifiers"] = tuple(tuple(x) for x in d["modifiers"])
        d["main_effects"] = tuple(tuple(x) for x in d["main_effects"])
        return cls(**d)


def neuron_attribute_f1(codes: sp.spmatrix, A: np.ndarray) -> np.ndarray:
    """(attributes, n_latents) F1 of "neuron active" (> 0) vs each 0/1 attribute column of ``A`` (docs x attributes)."""
    active = (sp.csr_matrix(codes) > 0).astype(np.float64)
    n_active = np.asarray(active.sum(axis=0)).ravel()
    A = np.asarray(A, np.float64)
    tp = np.asarray((active.T @ A)).T                                   # attributes x latents
    denom = n_active[None, :] + A.sum(0)[:, None]
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-300), 0.0)


def neuron_attribute_precision(codes: sp.spmatrix, A: np.ndarray) -> np.ndarray:
    """(attributes, n_latents) precision P(attribute | neuron active) (0 for a never-active neuron)."""
    active = (sp.csr_matrix(codes) > 0).astype(np.float64)
    n_active = np.asarray(active.sum(axis=0)).ravel()
    tp = np.asarray((active.T @ np.asarray(A, np.float64))).T
    return np.where(n_active[None, :] > 0, tp / np.maximum(n_active, 1.0)[None, :], 0.0)


def topic_indicators(topics: np.ndarray, names) -> np.ndarray:
    return np.column_stack([(np.asarray(topics) == name) for name in names]).astype(np.float64)


def neuron_topic_f1(codes: sp.spmatrix, topics: np.ndarray, names) -> np.ndarray:
    """(len(names), n_latents) F1 of active (> 0) vs topic membership, from sparse counts."""
    return neuron_attribute_f1(codes, topic_indicators(topics, names))


def neuron_topic_precision(codes: sp.spmatrix, topics: np.ndarray, names) -> np.ndarray:
    """(len(names), n_latents) precision P(topic | neuron active) over the corpus (0 for a never-active neuron)."""
    return neuron_attribute_precision(codes, topic_indicators(topics, names))


def representation_hash(cfg) -> str:
    payload = {"embed": cfg.embed.model_dump(mode="json"), "represent": cfg.represent.model_dump(mode="json"),
               "seed": cfg.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def build_text_representation(cfg, out_dir, epochs: Optional[int] = None, n_articles: Optional[int] = None) -> Path:
    """Embed the demo corpus, train the SAE, write codes + topics + F1 truth to ``out_dir`` (cached by config).

    ``n_articles``: a seeded random subset of the corpus (None: all 2,225 articles; embedding them takes minutes
    of CPU)."""
    from tokens2policy.config import DEMO_TOPICS
    from tokens2policy.embed.models import resolve_model
    from tokens2policy.ingest.demo import load_bbc_articles
    from tokens2policy.represent.sae import SparseAutoencoder

    out = Path(out_dir) / f"text_representation_{representation_hash(cfg)}_{epochs}_{n_articles}.npz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    arts = load_bbc_articles()
    if n_articles is not None and n_articles < len(arts):
        arts = arts.iloc[np.sort(np.random.default_rng(cfg.seed).permutation(len(arts))[:n_articles])]
    spec = resolve_model(cfg.embed)
    # the embeddings are the expensive part: cached apart from the SAE, keyed by the vector function and the subset
    emb_path = Path(out_dir) / f"text_embeddings_{spec.model_hash}_{cfg.seed}_{n_articles}.npz"
    if emb_path.exists():
        stored = np.load(emb_path)
        X, keep = stored["X"], stored["keep"]
    else:
        model = spec.load()
        vectors, keep = [], []
        texts = arts["text"].tolist()
        for lo in range(0, len(texts), 64):
            enc = model.encode(texts[lo:lo + 64], want_states=[False] * len(texts[lo:lo + 64]))
            for j, v in enumerate(enc.vectors):
                if v is not None:
                    vectors.append(np.asarray(v, np.float32))
                    keep.append(lo + j)
        X, keep = np.vstack(vectors), np.asarray(keep)
        np.savez_compressed(emb_path, X=X, keep=keep)
    rc = cfg.represent
    n_latents = rc.n_latents
    if n_latents is None and rc.docs_per_latent:   # the stage's rule on the corpus' distinct texts
        from tokens2policy.represent.sae import latents_for_corpus

        n_latents = latents_for_corpus(len(X), rc.k, rc.docs_per_latent, rc.expansion * X.shape[1])
    sae = SparseAutoencoder(n_latents=n_latents, k=rc.k, lr=rc.lr, epochs=epochs or rc.epochs,
                            batch_size=min(rc.batch_size, len(X)), seed=cfg.seed, expansion=rc.expansion,
                            num_threads=1).fit(X)
    codes = sp.csr_matrix(sae.encode(X))
    topics = arts["topic"].to_numpy()[keep]
    f1 = neuron_topic_f1(codes, topics, DEMO_TOPICS)
    np.savez_compressed(out, data=codes.data, indices=codes.indices, indptr=codes.indptr,
                        shape=np.array(codes.shape), topics=topics.astype(str), topic_names=np.array(DEMO_TOPICS),
                        f1=f1, metrics=json.dumps(sae.metrics(X)))
    return out


_CACHE: Dict[str, dict] = {}
_SHIPPED: Dict[str, bytes] = {}


def ship_representation(path: str, data: bytes) -> None:
    """Make the bytes of the .npz at ``path`` (a path on the driver) what :func:`load_representation` reads for that
    path in this process: the validate job broadcasts each representation and its tasks register it here, so
    executors that cannot see the driver's disk (any multi-node cluster, or a remote ``data_dir``) read the
    driver's file."""
    _SHIPPED[str(path)] = data


def load_representation(path: str) -> dict:
    """The stored representation (cached per process: executors read it once; from the shipped bytes when the
    validate job broadcast them, :func:`ship_representation`).

    Driver attributes: the stored ``attributes`` / ``attribute_names`` (documents x attributes 0/1; written by
    :mod:`tokens2policy.validate.drivers`), else one indicator per topic named by the topic."""
    if path not in _CACHE:
        z = np.load(io.BytesIO(_SHIPPED[path]) if path in _SHIPPED else path, allow_pickle=False)
        codes = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        names = [str(s) for s in z["topic_names"]]
        topics = z["topics"].astype(str)
        if "attributes" in z.files:
            A, attr_names = z["attributes"].astype(np.float64), [str(s) for s in z["attribute_names"]]
        else:
            A, attr_names = topic_indicators(topics, names), list(names)
        _CACHE[path] = dict(codes=codes, topics=topics, names=names, attributes=A, attribute_names=attr_names,
                            f1=neuron_attribute_f1(codes, A), precision=neuron_attribute_precision(codes, A),
                            n_active=np.diff(sp.csc_matrix(codes).indptr), metrics=json.loads(str(z["metrics"])))
    return _CACHE[path]


def attribute_index(rep: dict, name: str) -> int:
    """Column of a driver attribute: its exact name, or ``topic=<name>`` for a bare topic name."""
    names = rep["attribute_names"]
    for key in (name, f"topic={name}"):
        if key in names:
            return names.index(key)
    raise ValueError(f"unknown driver attribute {name!r}; the representation has {names}")


def text_truth(design: TextDesign) -> Dict[str, tuple]:
    """Driving attribute (topic) -> (best-F1 neuron, its F1), in the order of ``design.modifiers``."""
    rep = load_representation(design.representation)
    out = {}
    for name, coef in design.modifiers:
        if coef != 0 and design.effect != 0:
            row = rep["f1"][attribute_index(rep, name)]
            out[name] = (int(np.argmax(row)), float(row.max()))
    return out


def text_aligned(design: TextDesign) -> Dict[str, list]:
    """Driving attribute -> its aligned neurons (precision > ``design.aligned_share``, plus the best-F1 neuron)."""
    rep = load_representation(design.representation)
    out = {}
    for name, (best, _) in text_truth(design).items():
        prec = rep["precision"][attribute_index(rep, name)]
        out[name] = sorted(set(np.nonzero(prec > design.aligned_share)[0].tolist()) | {best})
    return out


def representation_summary(path: str, design: Optional[TextDesign] = None) -> dict:
    """What the truths rest on, for the run's record: per topic the best F1 (and runner-up), the number of
    topic-aligned neurons, and the SAE's metrics."""
    rep = load_representation(path)
    design = design or TextDesign(representation=path)
    out = {"sae": rep["metrics"], "n_latents": int(rep["codes"].shape[1]), "n_articles": int(rep["codes"].shape[0]),
           "aligned_share": design.aligned_share, "topics": {}}
    for i, name in enumerate(rep["attribute_names"]):
        f1 = np.sort(rep["f1"][i])[::-1]
        out["topics"][name] = {"best_neuron": int(np.argmax(rep["f1"][i])), "f1_best": float(f1[0]),
                               "f1_runner_up": float(f1[1]) if len(f1) > 1 else None,
                               "n_aligned": int((rep["precision"][i] > design.aligned_share).sum())}
    out["aligned"] = {k: v for k, v in text_aligned(design).items()}
    return out


@dataclass
class SimulatedText:
    y: np.ndarray
    t: np.ndarray
    z: sp.csr_matrix
    truth: np.ndarray
    design: TextDesign
    topic: np.ndarray                       # each unit's (latent) topic
    f1: Dict[str, float] = field(default_factory=dict)
    aligned: list = field(default_factory=list)   # per driving topic (order of ``truth``): its aligned neurons
    tau: Optional[np.ndarray] = None              # each unit's true CATE
    doc: Optional[np.ndarray] = None              # each unit's document (row of the representation)


def simulate_text(design: TextDesign, seed) -> SimulatedText:
    rep = load_representation(design.representation)
    rng = np.random.default_rng(seed)
    n = design.n
    idx = rng.integers(0, rep["codes"].shape[0], n)
    topic = rep["topics"][idx]
    mains = dict(design.main_effects)
    tau = np.full(n, float(design.base))
    for name, coef in design.modifiers:
        tau += design.effect * coef * rep["attributes"][idx, attribute_index(rep, name)]
    t = np.zeros(n)
    t[rng.permutation(n)[: int(round(n * design.treated_share))]] = 1.0
    y = np.array([mains.get(k, 0.0) for k in topic]) + t * tau + design.noise_sd * rng.standard_normal(n)
    truth = text_truth(design)
    aligned = text_aligned(design)
    order = list(truth)   # the design's order of modifiers
    return SimulatedText(y=y, t=t, z=rep["codes"][idx], truth=np.array([truth[k][0] for k in order], dtype=int),
                         design=design, topic=topic, f1={k: v[1] for k, v in truth.items()},
                         aligned=[aligned[k] for k in order], tau=tau, doc=idx)


def text_seed(base_seed: int, design: TextDesign, rep: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, zlib.crc32(design.key().encode()), int(rep)])
