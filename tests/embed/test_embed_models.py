"""The text model wrapper against plain SentenceTransformer.encode (no Spark)."""
import dataclasses

import numpy as np
import pytest

from embed_helpers import bbc_paragraphs, cosine_rows
from tokens2policy.config import EmbedConfig
from tokens2policy.embed.models import (
    STATUS_CHUNKED,
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_TOO_LONG,
    STATUS_TRUNCATED,
    TextEmbeddingModel,
    resolve_model,
    resolve_source,
    weights_hash,
)


@pytest.fixture(scope="module")
def wrap(st_model):
    def _wrap(**kw):
        return TextEmbeddingModel(st_model, **kw)

    return _wrap


def test_vectors_equal_plain_encode_including_truncation(wrap, encode_plain, st_model):
    texts = bbc_paragraphs(60) + [" ".join(bbc_paragraphs(8, skip=60))]  # the last one exceeds 64 tokens
    model = wrap(max_tokens=64, batch_tokens=1024)
    enc = model.encode(texts)
    ref = encode_plain(texts, max_tokens=64)
    got = np.stack(enc.vectors)
    assert cosine_rows(got, ref).min() >= 0.9999
    assert enc.status[-1] == STATUS_TRUNCATED and enc.n_tokens[-1] == 62  # 64 minus [CLS] and [SEP]
    n_ids = [len(st_model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert enc.status == [STATUS_TRUNCATED if n > 62 else STATUS_OK for n in n_ids]
    assert enc.n_tokens == [min(n, 62) for n in n_ids]


def test_statuses_for_empty_blank_null_and_too_long(wrap):
    model = wrap(max_text_chars=50)
    enc = model.encode(["", "   \n", None, float("nan"), "x" * 51, "short text"])
    assert enc.status == [STATUS_EMPTY] * 4 + [STATUS_TOO_LONG, STATUS_OK]
    assert enc.vectors[:5] == [None] * 5 and enc.vectors[5].shape == (384,)
    assert enc.n_tokens[:5] == [0] * 5


def test_token_states_equal_plain_token_embeddings(wrap, st_model):
    texts = bbc_paragraphs(5)
    model = wrap(max_tokens=128, states_per_unit=1000)
    enc = model.encode(texts, want_states=[True, False, True, False, True])
    assert enc.states[1] is None and enc.states[3] is None
    for i in (0, 2, 4):
        ref = st_model.encode([texts[i]], output_value="token_embeddings")[0].numpy()[1:-1]  # drop [CLS]/[SEP]
        st = enc.states[i]
        ids = st_model.tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        assert st.positions.tolist() == list(range(len(ids)))
        assert st.tokens == st_model.tokenizer.convert_ids_to_tokens(ids)
        assert np.abs(st.vectors - ref).max() < 1e-4


def test_states_subsample_is_deterministic_and_capped(wrap):
    text = " ".join(bbc_paragraphs(4))
    model = wrap(states_per_unit=10)
    a = model.encode([text], [True]).states[0]
    b = model.encode([text], [True]).states[0]
    assert len(a.positions) == 10 and np.all(np.diff(a.positions) > 0)
    assert a.positions.tolist() == b.positions.tolist()


def _single_token_words(tokenizer, n):
    words = []
    for tok in tokenizer.get_vocab():
        if tok.isalpha() and tok.islower() and len(tok) >= 4 and len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1:
            words.append(tok)
        if len(words) >= n:
            return sorted(words)
    raise AssertionError("vocabulary too small")


def test_chunk_mean_pools_windows_like_independent_encoding(wrap, st_model, encode_plain):
    """Chunk-and-pool = token-weighted mean of the windows' vectors, re-normalized (the model normalizes)."""
    max_tokens, body = 16, 14
    words = _single_token_words(st_model.tokenizer, 3 * body + 5)  # windows of 14, 14, 14 and 5 tokens
    text = " ".join(words)
    model = wrap(max_tokens=max_tokens, long_text="chunk_mean", states_per_unit=1000)
    enc = model.encode([text], [True])
    assert enc.status == [STATUS_CHUNKED] and enc.n_tokens == [len(words)]
    windows = [" ".join(words[k : k + body]) for k in range(0, len(words), body)]
    wv = encode_plain(windows, max_tokens=max_tokens)
    weights = np.array([min(body, len(words) - k) for k in range(0, len(words), body)], dtype=float)
    pooled = (wv * weights[:, None]).sum(0) / weights.sum()
    pooled /= np.linalg.norm(pooled)
    assert cosine_rows(enc.vectors[0][None], pooled[None])[0] >= 0.9999
    st = enc.states[0]
    assert st.positions.tolist() == list(range(len(words))) and st.tokens == words
    second = st_model.encode([windows[1]], output_value="token_embeddings")[0].numpy()[1:-1]
    assert np.abs(st.vectors[body : 2 * body] - second).max() < 1e-4
    # more windows than max_chunks: keep the first ones, status truncated
    enc2 = wrap(max_tokens=max_tokens, long_text="chunk_mean", max_chunks=2).encode([text])
    assert enc2.status == [STATUS_TRUNCATED] and enc2.n_tokens == [2 * body]


def test_model_hash_tracks_vector_settings_not_execution_settings():
    spec = resolve_model(EmbedConfig())
    same = [dataclasses.replace(spec, device="cuda"), dataclasses.replace(spec, batch_tokens=999),
            dataclasses.replace(spec, cpu_threads=7)]
    assert all(s.model_hash == spec.model_hash for s in same)
    changed = [dataclasses.replace(spec, max_tokens=64), dataclasses.replace(spec, long_text="chunk_mean"),
               dataclasses.replace(spec, weights_hash="0" * 32)]
    assert len({spec.model_hash, *(s.model_hash for s in changed)}) == 4


def test_weights_hash_is_content_addressed(tmp_path):
    for name, data in [("config.json", b"{}"), ("model.safetensors", b"\x00" * 100)]:
        (tmp_path / name).write_bytes(data)
    h1 = weights_hash(tmp_path)
    assert weights_hash(tmp_path) == h1
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 99 + b"\x01")
    assert weights_hash(tmp_path) != h1


def test_resolve_source_default_local_dir_and_offline_hub_error(tmp_path):
    name, source, h = resolve_source("default")
    assert name == "sentence-transformers/all-MiniLM-L6-v2" and len(h) == 32
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path))[1] == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="not in the local cache"):
        resolve_source("nobody/no-such-model-xyz")


def test_config_validation_errors():
    with pytest.raises(ValueError, match="token_sample_rate"):
        resolve_model(EmbedConfig(token_sample_rate=1.5))
    with pytest.raises(ValueError, match="max_tokens"):
        resolve_model(EmbedConfig(max_tokens=2))


def test_cuda_half_precision_matches_cpu(st_model):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    spec = dataclasses.replace(resolve_model(EmbedConfig()), device="cuda")
    gpu = spec.load()
    assert gpu.device.startswith("cuda") and next(gpu.st_model.parameters()).dtype == torch.float16
    texts = bbc_paragraphs(40)
    got = np.stack(gpu.encode(texts).vectors)
    ref = np.stack(TextEmbeddingModel(st_model).encode(texts).vectors)
    assert cosine_rows(got, ref).min() >= 0.999  # fp16 vs fp32


def test_device_cuda_without_gpu_is_a_clear_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from tokens2policy.embed.models import pick_device

    assert pick_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        pick_device("cuda")


@pytest.mark.slow
def test_mlflow_registered_model_resolves_hashes_and_loads(tmp_path, st_model):
    """``embed.model=models:/name/version``: an MLflow-registered sentence-transformers model (logs ~90 MB)."""
    import mlflow
    import mlflow.sentence_transformers

    from tokens2policy.embed.models import load_sentence_transformer

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("embed-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        mlflow.sentence_transformers.log_model(st_model, name="encoder", registered_model_name="t2p-minilm")
    name, source, h = resolve_source("models:/t2p-minilm/1", tracking_uri=uri)
    assert name == source == "models:/t2p-minilm/1" and len(h) == 32
    model = TextEmbeddingModel(load_sentence_transformer(source, tracking_uri=uri))
    texts = bbc_paragraphs(10)
    ref = TextEmbeddingModel(st_model).encode(texts).vectors
    assert cosine_rows(np.stack(model.encode(texts).vectors), np.stack(ref)).min() >= 0.9999
    with pytest.raises(ValueError, match="cannot resolve MLflow model"):
        resolve_source("models:/t2p-minilm/7", tracking_uri=uri)
