"""The text model on ONNX Runtime: exported once per machine, cached by the model's hash, loaded without torch.

``embed.runtime: onnx`` runs the *same* vector function as the sentence-transformers model on torch: the same
tokenizer (its ``tokenizer.json``, through the Rust ``tokenizers`` library that the Hugging Face fast tokenizer
wraps), the same transformer (exported with ``torch.onnx``), and the same pooling (mean over the attention mask,
then L2 normalisation when the model has a ``Normalize`` module), computed here in numpy. Only the kernels
differ, so fp32 vectors agree with torch's to floating-point noise (tested: cosine ≥ 0.9999 on real texts).

``embed.quantize: int8`` additionally quantizes the weights of the linear layers to int8 (ONNX Runtime's
dynamic quantization: per-output-channel weight scales, per-tensor activation scales computed on the fly), except
the feed-forward output projections, whose inputs (GELU outputs) have outlier channels that one activation
scale per tensor represents badly (docs/embed.md has the measurements). That changes the vectors beyond noise, so
``quantize`` is part of the model hash.

The export (seconds) happens at most once per cache key on a machine: the first Python worker that needs it takes
a file lock, exports into a temporary directory and renames it into place; every other worker (and every later
run) loads the cached files. The cache lives in ``embed.cache_dir`` (default ``$T2P_CACHE_DIR`` or
``~/.cache/tokens2policy``), never in the package directory. It is a local per-machine cache, like the Hugging
Face cache, not a lakehouse location.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

# bump when the export procedure changes what lands in the cache (new key, fresh export)
EXPORT_FORMAT = 1
OPSET = 17
# Hugging Face model types whose graphs ONNX Runtime's transformer optimizer fuses as "bert"
# (attention, skip-layer-norm, bias-GELU, embedding-layer-norm); others keep the plain export
_FUSABLE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert"}
_GELU_OPS = {"Gelu", "BiasGelu", "FastGelu"}


def onnx_available() -> Tuple[bool, str]:
    """(True, "") when onnxruntime and onnx import, else (False, a one-line reason naming the extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return False, (f"embed.runtime=onnx needs onnxruntime and onnx ({exc.name} is not installed): "
                       "pip install 'tokens2policy[onnx]'")
    return True, ""


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """The local model cache: ``cache_dir``, else ``$T2P_CACHE_DIR``, else ``$XDG_CACHE_HOME/tokens2policy``
    (``~/.cache/tokens2policy``)."""
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    if os.environ.get("T2P_CACHE_DIR"):
        return Path(os.environ["T2P_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tokens2policy"


def export_key(weights_hash: str, quantize: str) -> str:
    """Cache key: the model files' hash, the quantization and the versions that shape the exported files."""
    import onnx
    import onnxruntime

    payload = {"weights": weights_hash, "quantize": quantize, "format": EXPORT_FORMAT, "opset": OPSET,
               "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------------------
# export (needs torch and sentence-transformers; runs once per cache key)
# --------------------------------------------------------------------------------------------------------------
def _check_pooling(st_model) -> bool:
    """Raise unless the model is Transformer → mean Pooling (→ Normalize); return whether it normalizes."""
    kinds = [type(m).__name__ for m in st_model]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ValueError(f"embed.runtime=onnx supports Transformer → Pooling (→ Normalize) models, this one is "
                         f"{' → '.join(kinds)}: use embed.runtime=torch")
    pooling = st_model[1]
    mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers >= 6; older: get_pooling_mode_str()
    if mode is None and hasattr(pooling, "get_pooling_mode_str"):
        mode = pooling.get_pooling_mode_str()
    if isinstance(mode, (list, tuple)):
        mode = "+".join(map(str, mode))
    if mode != "mean":
        raise ValueError(f"embed.runtime=onnx implements mean pooling, this model pools by {mode!r}: "
                         "use embed.runtime=torch")
    return kinds[-1] == "Normalize"


def _export_transformer(st_model, path: Path) -> None:
    """``torch.onnx`` export of the transformer: (input_ids, attention_mask[, token_type_ids]) → hidden states."""
    import torch

    import copy

    # a private copy: switching the caller's model's attention and back, or tracing it, is not side-effect free
    auto = copy.deepcopy(st_model[0].auto_model).eval()
    try:  # the eager attention exports as plain MatMul/Softmax, which the optimizer fuses into one Attention op
        auto.set_attn_implementation("eager")
    except Exception:  # older transformers or a model without the switch: the default export still works
        pass
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in getattr(st_model.tokenizer, "model_input_names", []):
        names.append("token_type_ids")

    class Hidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]], dtype=torch.long)
    example = [ids, (ids != 0).long()] + ([torch.zeros_like(ids)] if len(names) == 3 else [])
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    import warnings

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(auto), tuple(example), str(path), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def _feed_forward_outputs(model) -> List[str]:
    """MatMul nodes fed by a GELU: the feed-forward output projections (kept in fp32 by int8 quantization)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        src = producer.get(node.input[0])
        if src is not None and (src.op_type in _GELU_OPS or "intermediate_act_fn" in src.name):
            names.append(node.name)
    return names


def export_model(st_model, out_dir: Path, quantize: str = "none") -> dict:
    """Export ``st_model`` into ``out_dir`` (``model.onnx``, ``tokenizer.json``, ``meta.json``); returns the meta.

    The exported graph is checked against torch on a padded probe batch before it is accepted (largest absolute
    difference of the hidden states at unpadded positions < 1e-3 for fp32).
    """
    import onnx

    started = time.perf_counter()
    normalizes = _check_pooling(st_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "raw.onnx"
    _export_transformer(st_model, raw)
    config = st_model[0].auto_model.config
    fused = False
    model_path = out_dir / "model.onnx"
    if getattr(config, "model_type", None) in _FUSABLE:
        from onnxruntime.transformers import optimizer

        opt = optimizer.optimize_model(str(raw), model_type="bert", num_heads=int(config.num_attention_heads),
                                       hidden_size=int(config.hidden_size))
        opt.save_model_to_file(str(model_path))
        fused = True
    else:
        shutil.copy(raw, model_path)
    raw.unlink()
    excluded: List[str] = []
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        excluded = _feed_forward_outputs(onnx.load(str(model_path), load_external_data=False))
        fp32 = out_dir / "fp32.onnx"
        model_path.rename(fp32)
        import logging

        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # its "consider pre-processing" advice is for CNNs
        try:
            quantize_dynamic(str(fp32), str(model_path), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Attention"], nodes_to_exclude=excluded,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            root.setLevel(level)
        fp32.unlink()
    elif quantize != "none":
        raise ValueError(f"embed.quantize must be 'none' or 'int8', got {quantize!r}")
    st_model.tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    get_dim = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
    meta = {
        "dim": int(get_dim()),
        "normalizes": normalizes,
        "max_positions": int(getattr(config, "max_position_embeddings", 512) or 512),
        "pad_id": int(st_model.tokenizer.pad_token_id or 0),
        "fused": fused,
        "quantize": quantize,
        "fp32_nodes": excluded,
        "export_seconds": round(time.perf_counter() - started, 2),
    }
    _verify(st_model, out_dir, meta)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _verify(st_model, out_dir: Path, meta: dict) -> None:
    import torch

    enc = OnnxTextEncoder(out_dir, meta, threads=1)
    texts = ["A short probe.", "A somewhat longer probe sentence, so that the first one is padded in the batch."]
    ids = [enc.tokenizer.ids([t])[0] for t in texts]
    prefix, suffix = enc.tokenizer.template()
    seqs = [prefix + i + suffix for i in ids]
    width = max(len(s) for s in seqs)
    arr = np.full((len(seqs), width), meta["pad_id"], dtype=np.int64)
    mask = np.zeros_like(arr)
    for j, s in enumerate(seqs):
        arr[j, : len(s)], mask[j, : len(s)] = s, 1
    _, hidden = enc.forward(arr, mask, [True] * len(seqs))
    feats = {"input_ids": torch.from_numpy(arr), "attention_mask": torch.from_numpy(mask)}
    if "token_type_ids" in enc.input_names:
        feats["token_type_ids"] = torch.zeros_like(feats["input_ids"])
    with torch.inference_mode():
        ref = st_model[0].auto_model(**feats).last_hidden_state.numpy()
    diff = max(float(np.abs(hidden[j] - ref[j, : len(s)]).max()) for j, s in enumerate(seqs))
    meta["probe_max_abs_diff"] = diff
    if meta["quantize"] == "none" and diff > 1e-3:
        raise ValueError(f"the ONNX export differs from torch by {diff:.2e} on a probe batch: use embed.runtime=torch")


def ensure_exported(spec) -> Path:
    """The cache directory of ``spec``'s exported model, exporting it first when it is not there (under a lock)."""
    import fcntl

    root = cache_root(spec.cache_dir) / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    final = root / export_key(spec.weights_hash, spec.quantize)
    if (final / "meta.json").exists():
        return final
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one exporter per key on this machine; the others wait, then load
        try:
            if (final / "meta.json").exists():
                return final
            from tokens2policy.embed.models import load_sentence_transformer

            st = load_sentence_transformer(spec.source, device="cpu", tracking_uri=spec.tracking_uri,
                                           registry_uri=spec.registry_uri)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
            try:
                export_model(st, tmp, spec.quantize)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


# --------------------------------------------------------------------------------------------------------------
# runtime (no torch)
# --------------------------------------------------------------------------------------------------------------
class FastTokenizer:
    """The model's Rust tokenizer (``tokenizer.json``) with the three operations the text model needs.

    Hugging Face's fast tokenizers call the same library; truncation and padding are switched off because the
    text model cuts windows and pads itself (tested: identical ids to the transformers tokenizer on real texts).
    """

    def __init__(self, path: Path, pad_id: int = 0):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(path))
        self.backend.no_truncation()
        self.backend.no_padding()
        self.pad_id = int(pad_id)

    def ids(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def template(self) -> Tuple[List[int], List[int]]:
        from tokens2policy.embed.models import special_template

        return special_template(lambda t, specials: self.backend.encode(t, add_special_tokens=specials).ids)


class OnnxTextEncoder:
    """An exported transformer in an ONNX Runtime session plus the sentence-transformers pooling, in numpy.

    ``forward(ids, mask, want)`` → (document vectors (b, dim) float32, token states of the rows in ``want``):
    the vector is the mean of the hidden states over the mask, L2-normalised when the model normalizes — what
    the ``Pooling(mean)`` and ``Normalize`` modules compute.
    """

    runtime = "onnx"
    device = "cpu"

    def __init__(self, directory: Path, meta: Optional[dict] = None, threads: Optional[int] = None):
        import onnxruntime as ort

        directory = Path(directory)
        self.meta = meta if meta is not None else json.loads((directory / "meta.json").read_text())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(directory / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = FastTokenizer(directory / "tokenizer.json", self.meta["pad_id"])
        self.dim = int(self.meta["dim"])
        self.normalizes = bool(self.meta["normalizes"])
        self.max_positions = int(self.meta["max_positions"])
        self.quantize = self.meta.get("quantize", "none")

    def forward(self, ids: np.ndarray, mask: np.ndarray, want: Optional[Sequence[bool]] = None):
        """As :meth:`tokens2policy.embed.models.TorchTextEncoder.forward`."""
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(["last_hidden_state"], feed)[0]
        weights = mask.astype(np.float32)[:, :, None]
        vecs = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        if self.normalizes:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        vecs = vecs.astype(np.float32, copy=False)
        if want is None or not any(want):
            return vecs, None
        lengths = mask.sum(axis=1)
        return vecs, [hidden[j, : lengths[j]] if w else None for j, w in enumerate(want)]


def load_encoder(spec) -> OnnxTextEncoder:
    """The ONNX encoder of ``spec`` (exported into the cache first if needed), ``spec.cpu_threads`` threads."""
    ok, why = onnx_available()
    if not ok:
        raise ValueError(why)
    return OnnxTextEncoder(ensure_exported(spec), threads=spec.cpu_threads)
