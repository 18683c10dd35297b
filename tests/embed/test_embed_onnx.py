"""The ONNX Runtime path (embed.runtime=onnx) against the torch reference: same tokens, same vectors, same job."""
import dataclasses
import os

import numpy as np
import pytest

from embed_helpers import bbc_paragraphs, cosine_rows, write_units
from tokens2policy.config import EmbedConfig
from tokens2policy.embed.models import (
    STATUS_OK,
    STATUS_TRUNCATED,
    TextEmbeddingModel,
    effective_runtime,
    resolve_model,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """A fresh export cache for this test session (so the export procedure itself is what is tested)."""
    return str(tmp_path_factory.mktemp("onnx_cache"))


@pytest.fixture(scope="session")
def onnx_model(onnx_cache):
    return resolve_model(EmbedConfig(runtime="onnx", cache_dir=onnx_cache)).load()


def _texts():
    # short paragraphs of different lengths (padded batches) and one text over 128 tokens (truncated)
    return bbc_paragraphs(40) + [" ".join(bbc_paragraphs(12, skip=40))]


def test_onnx_vectors_tokens_and_states_equal_torch(onnx_model, st_model):
    texts = _texts()
    want = [i % 3 == 0 for i in range(len(texts))]
    ref = TextEmbeddingModel(st_model).encode(texts, want)
    got = onnx_model.encode(texts, want)
    assert onnx_model.runtime == "onnx" and onnx_model.device == "cpu"
    assert got.status == ref.status and got.status[-1] == STATUS_TRUNCATED and got.status[0] == STATUS_OK
    assert got.n_tokens == ref.n_tokens
    cos = cosine_rows(np.stack(got.vectors), np.stack(ref.vectors))
    assert cos.min() >= 0.9999
    assert np.abs(np.linalg.norm(np.stack(got.vectors), axis=1) - 1).max() < 1e-5  # normalized like the model
    for a, b, w in zip(got.states, ref.states, want):
        assert (a is None) == (b is None) == (not w)
        if w:
            assert a.tokens == b.tokens and a.positions.tolist() == b.positions.tolist()
            assert np.abs(a.vectors - b.vectors).max() < 1e-4


def test_fast_tokenizer_ids_equal_transformers_tokenizer(onnx_model, st_model):
    texts = bbc_paragraphs(300) + ["Café naïve ÉCOLE — 日本語 🎉 zero\u200bwidth\u00a0nbsp", "x" * 3000, "a  b\tc\n d"]
    ref = st_model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert onnx_model.tokenizer.ids(texts) == ref
    assert onnx_model.tokenizer.tokens(ref[0]) == st_model.tokenizer.convert_ids_to_tokens(ref[0])
    assert (onnx_model.prefix, onnx_model.suffix) == ([101], [102])  # [CLS] ... [SEP]


def test_export_is_cached_by_model_hash_outside_the_package(onnx_model, onnx_cache):
    from tokens2policy.embed import onnxrt
    from tokens2policy.embed.models import default_model_path

    spec = resolve_model(EmbedConfig(runtime="onnx", cache_dir=onnx_cache))
    path = onnxrt.ensure_exported(spec)
    assert path.parent.parent == onnxrt.cache_root(onnx_cache) and path.name == onnxrt.export_key(spec.weights_hash, "none")
    stamp = (path / "model.onnx").stat().st_mtime_ns
    assert onnxrt.ensure_exported(spec) == path and (path / "model.onnx").stat().st_mtime_ns == stamp  # no re-export
    assert not str(path).startswith(str(default_model_path().parent))
    assert onnxrt.export_key(spec.weights_hash, "int8") != path.name
    assert onnxrt.export_key("0" * 32, "none") != path.name


def test_runtime_settings_and_model_hash():
    base = resolve_model(EmbedConfig())
    onnx = resolve_model(EmbedConfig(runtime="onnx"))
    int8 = resolve_model(EmbedConfig(runtime="onnx", quantize="int8"))
    assert base.model_hash == onnx.model_hash  # fp32 ONNX: same vector function (up to float noise)
    assert int8.model_hash != base.model_hash  # int8 changes the vectors: a model version of its own
    assert resolve_model(EmbedConfig(quantize="int8")).model_hash == int8.model_hash  # int8 implies ONNX
    assert effective_runtime("auto", "none", "cuda:0") == "torch"
    assert effective_runtime("auto", "none", "cpu") == "torch"  # the measured decision (docs/benchmarks.md)
    assert effective_runtime("onnx", "none", "cpu") == "onnx" and effective_runtime("auto", "int8") == "onnx"
    with pytest.raises(ValueError, match="embed.runtime=onnx"):
        resolve_model(EmbedConfig(runtime="torch", quantize="int8"))
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_model(EmbedConfig(runtime="onnx", device="cuda"))


def test_export_refuses_a_model_that_does_not_mean_pool(tmp_path, st_model):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from tokens2policy.embed.onnxrt import export_model

    cls_pooled = SentenceTransformer(modules=[st_model[0], Pooling(384, pooling_mode="cls")], device="cpu")
    with pytest.raises(ValueError, match="mean pooling"):
        export_model(cls_pooled, tmp_path / "out")


def test_job_with_onnx_runtime_equals_in_process_onnx(spark, make_cfg, onnx_model, onnx_cache):
    from tokens2policy.embed import job as embed_job
    from tokens2policy.lakehouse import read_table

    cfg = make_cfg("embed.runtime=onnx", f"embed.cache_dir={onnx_cache}", "embed.token_sample_rate=1")
    texts = _texts()
    write_units(spark, cfg, texts)
    summary = embed_job.run(spark, cfg)
    assert summary["model_hash"] == resolve_model(EmbedConfig()).model_hash
    emb = read_table(spark, cfg, "embeddings").toPandas().sort_values("unit_id")
    ref = onnx_model.encode(texts, [True] * len(texts))
    assert emb["status"].tolist() == ref.status and emb["n_tokens"].tolist() == ref.n_tokens
    got = np.stack(emb["vector"].to_numpy())
    # batches differ (Spark partitions, length sort) only in padding: float noise, nothing more
    assert np.abs(got - np.stack(ref.vectors)).max() < 1e-5
    tok = read_table(spark, cfg, "token_states").toPandas()
    for uid, grp in tok.groupby("unit_id"):
        grp = grp.sort_values("position")
        st = ref.states[int(uid)]
        assert grp["token"].tolist() == st.tokens and grp["position"].tolist() == st.positions.tolist()
        assert np.abs(np.stack(grp["vector"].to_numpy()) - st.vectors).max() < 1e-4


@pytest.mark.slow  # a second export (quantization): ~10 s idle, ~40 s under load
def test_int8_vectors_close_to_torch(onnx_cache, st_model):
    texts = bbc_paragraphs(80, skip=100) + [" ".join(bbc_paragraphs(12, skip=40))]
    model = resolve_model(EmbedConfig(runtime="onnx", quantize="int8", cache_dir=onnx_cache)).load()
    assert model.encoder.quantize == "int8" and model.encoder.meta["fp32_nodes"]  # the FFN outputs stay fp32
    ref = TextEmbeddingModel(st_model).encode(texts)
    got = model.encode(texts)
    assert got.status == ref.status and got.n_tokens == ref.n_tokens
    cos = cosine_rows(np.stack(got.vectors), np.stack(ref.vectors))
    assert cos.min() >= 0.99 and cos.mean() >= 0.995
    assert cos.mean() < 0.99999  # really quantized (not silently the fp32 graph)


def test_cached_onnx_model_loads_without_torch_or_transformers(onnx_model, onnx_cache):
    """A Python worker with the export cached imports neither torch nor transformers (a lighter, faster load)."""
    import subprocess
    import sys

    code = ("import sys\nfrom tokens2policy.config import EmbedConfig\n"
            "from tokens2policy.embed.models import resolve_model\n"
            f"m = resolve_model(EmbedConfig(runtime='onnx', cache_dir={onnx_cache!r})).load()\n"
            "assert m.encode(['a short text']).status == ['ok']\n"
            "print(sorted(x for x in ('torch', 'transformers', 'sentence_transformers') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
