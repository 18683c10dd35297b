"""The prepared GPU check (benchmarks/bench_gpu.py) runs or skips cleanly on a machine without a GPU.

The device machine has no JVM and no network, so the script carries the default model with fp16 weights; the slow
test checks on the CPU that those weights give the fp32 reference vectors (cosine ≥ 0.9999), that the stage's
encoder and the SAE run through the script, and that its counts add up.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_gpu.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_measure_says_skipped_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the skip path does not apply")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, SCRIPT, "measure", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in json.loads(out.read_text())


@pytest.mark.slow
def test_prepared_fp16_model_reproduces_the_fp32_vectors_and_the_script_runs_on_cpu(tmp_path):
    bench = _bench()
    prepared = str(tmp_path / "gpu")
    os.makedirs(prepared)
    info = bench.prepare(prepared, n_reference=32)
    assert info["texts"] == 32 and info["bytes"] < 60 * 2 ** 20  # fits a device call's 64 MiB with the repo
    ref = np.load(os.path.join(prepared, "reference_vectors.npy"))
    assert ref.shape == (32, 384) and np.allclose(np.linalg.norm(ref, axis=1), 1, atol=1e-5)

    report = bench.measure(prepared, "cpu", n_docs=40, sae_rows=600, sae_epochs=1, demo_sae=False)
    emb = report["embedding"]
    assert emb["cosine_to_fp32_cpu"]["texts"] == 32 and emb["cosine_to_fp32_cpu"]["min"] >= 0.9999
    assert emb["docs"] == 40 and emb["tokens_per_doc"] == 126.0  # every text fills the window (126 + 2 specials)
    assert emb["encode_docs_per_s"] == pytest.approx(40 / emb["encode_s"], rel=0.02)
    assert emb["forward_batches"] == 1 and emb["max_batch_size"] == 64  # the CPU batching default
    (sae,) = report["sae"]
    assert sae["rows"] == 600 and sae["n_latents"] == 3072 and 0 < sae["normalized_mse"] < 1.5
