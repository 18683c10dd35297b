"""``embed.precision``: bf16 autocast on CPUs with bf16 matrix units, against the fp32 reference vectors."""
import dataclasses

import numpy as np
import pytest

from embed_helpers import cosine_rows
from tokens2policy.config import EmbedConfig
from tokens2policy.embed.models import (
    TextEmbeddingModel,
    TorchTextEncoder,
    cpu_has_bf16_units,
    effective_precision,
    resolve_model,
)


def _demo_texts(n):
    """The demo corpus's own articles (long: every one is truncated at 128 tokens, like the demo's embed pass)."""
    from tokens2policy.ingest.demo import load_bbc_articles

    return list(dict.fromkeys(load_bbc_articles()["text"].tolist()))[:n]


def test_effective_precision_rules():
    assert effective_precision("auto", "cuda:0") == "fp16"
    assert effective_precision("auto", "cpu") == "fp32"  # bf16 changes NEXIS selections: explicit only
    assert effective_precision("fp32", "cpu") == "fp32" and effective_precision("bf16", "cuda") == "bf16"
    with pytest.raises(ValueError, match="embed.precision must be one of"):
        effective_precision("fp8", "cpu")


def test_precision_is_refused_with_onnx_and_bf16_is_a_model_version_of_its_own():
    with pytest.raises(ValueError, match="ONNX Runtime runs fp32"):
        resolve_model(EmbedConfig(runtime="onnx", precision="bf16"))
    spec = resolve_model(EmbedConfig())
    assert spec.precision == "auto"
    assert dataclasses.replace(spec, precision="fp32").model_hash == spec.model_hash  # fp32 hashes unchanged
    assert dataclasses.replace(spec, precision="bf16").model_hash != spec.model_hash  # never mixed with fp32


@pytest.mark.skipif(not cpu_has_bf16_units(), reason="this CPU has no bf16 matrix units (AMX / AVX512-BF16)")
def test_bf16_autocast_vectors_and_states_stay_close_to_fp32(st_model):
    """bf16 autocast on 128 demo articles: the vectors differ from fp32 (else autocast did not run) and stay at
    cosine >= 0.9999; token states (not normalized) within 2 % of their norm."""
    texts = _demo_texts(128)
    want = [i % 4 == 0 for i in range(len(texts))]
    ref = TextEmbeddingModel(TorchTextEncoder(st_model, "fp32")).encode(texts, want)
    got = TextEmbeddingModel(TorchTextEncoder(st_model, "bf16")).encode(texts, want)
    a, b = np.stack(got.vectors), np.stack(ref.vectors)
    assert np.abs(a - b).max() > 1e-6          # bf16 arithmetic really ran
    assert cosine_rows(a, b).min() >= 0.9999
    assert got.status == ref.status and got.n_tokens == ref.n_tokens
    for s, r in zip(got.states, ref.states):
        assert (s is None) == (r is None)
        if s is not None:
            assert s.tokens == r.tokens
            rel = np.linalg.norm(s.vectors - r.vectors, axis=1) / np.linalg.norm(r.vectors, axis=1)
            assert rel.max() < 0.02


def test_spec_load_runs_the_resolved_precision():
    spec = dataclasses.replace(resolve_model(EmbedConfig(device="cpu")), cpu_threads=1)
    assert spec.load().precision == "fp32"
    assert dataclasses.replace(spec, precision="bf16").load().precision == "bf16"
    assert dataclasses.replace(spec, precision="fp32").load().precision == "fp32"
