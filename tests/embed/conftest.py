"""Fixtures of the embed tests: the plain in-process reference model."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def st_model():
    """The plain in-process SentenceTransformer (the reference every Spark result is compared with)."""
    from sentence_transformers import SentenceTransformer

    from tokens2policy.embed.models import default_model_path

    return SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)


@pytest.fixture
def encode_plain(st_model):
    """``encode_plain(texts, max_tokens)``: SentenceTransformer.encode at the given sequence limit."""

    def _encode(texts, max_tokens: int = 128, **kw):
        old = st_model.max_seq_length
        st_model.max_seq_length = max_tokens
        try:
            return st_model.encode(list(texts), batch_size=32, convert_to_numpy=True, **kw)
        finally:
            st_model.max_seq_length = old

    return _encode
