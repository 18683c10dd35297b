"""Benchmarks of the represent stage's numerical core.

  .venv/bin/python benchmarks/bench_represent.py                  # SAE throughput + encode + planted recovery
  .venv/bin/python benchmarks/bench_represent.py --ddp            # + 1 vs 2 process TorchDistributor (needs Spark)
  .venv/bin/python benchmarks/bench_represent.py --bbc            # + BBC/MiniLM quality and label hits
  .venv/bin/python benchmarks/bench_represent.py --horovod        # only: 1 vs 2 Horovod ranks vs 2 DDP ranks
  .venv/bin/python benchmarks/bench_represent.py --demo-threads 0,1,2  # only: the demo's SAE training per thread count

Prints one JSON line per case.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "represent"))


def planted(n, d, atoms, active, seed=0):
    from _synthetic import planted_sparse

    return planted_sparse(n=n, d=d, n_atoms=atoms, active=active, seed=seed)


def case_train(n=20000, d=384, expansion=8, k=32, epochs=2, threads=None):
    from tokens2policy.represent.sae import SparseAutoencoder

    x, _, _ = planted(n, d, 4 * d, 16)
    sae = SparseAutoencoder(expansion=expansion, k=k, epochs=epochs, batch_size=512, lr=1e-3, num_threads=threads)
    t = time.perf_counter()
    sae.fit(x)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    z = sae.encode(x)
    enc_s = time.perf_counter() - t
    m = sae.metrics(x)
    return {"case": "sae_train", "n": n, "d": d, "n_latents": sae.n_latents_, "k": k, "epochs": epochs,
            "fit_s": round(fit_s, 2), "train_rows_per_s": round(n * epochs / fit_s),
            "encode_rows_per_s": round(n / enc_s), **{k_: round(v, 4) for k_, v in m.items()}}


# the demo's SAE settings (conf/local.yaml's represent section)
DEMO_SAE = dict(n_latents=128, k=8, epochs=20, batch_size=512, seed=0, aux_k=64)


def demo_sae_rows(seed=0):
    """The demo's SAE training shape: 20,000 rows of 384 dims drawn from 2,225 distinct vectors (the articles)."""
    rng = np.random.default_rng(seed)
    base = (rng.normal(size=(2225, 384)) @ rng.normal(size=(384, 384)) / 20).astype(np.float32)
    return base[rng.integers(0, 2225, 20000)]


def case_demo_threads(threads):
    """The demo's SAE training (:func:`demo_sae_rows`, :data:`DEMO_SAE`) on each thread count (0: represent's
    default, num_threads=None), with the load average."""
    from tokens2policy.represent.sae import SAEParams, train_loop

    x = demo_sae_rows()
    out = []
    for th in threads:
        p = SAEParams(**DEMO_SAE, num_threads=th or None)
        load = os.getloadavg()[0]
        t = time.perf_counter()
        train_loop(x, p)
        out.append({"case": "demo_sae_threads", "num_threads": th or "default (None)",
                    "fit_s": round(time.perf_counter() - t, 2), "load_avg_1m_before": round(load, 1)})
    return out


def case_planted():
    from tokens2policy.represent.sae import SparseAutoencoder

    x, atoms, _ = planted(20000, 64, 128, 4, seed=1)
    t = time.perf_counter()
    sae = SparseAutoencoder(n_latents=512, k=4, epochs=10, batch_size=256, lr=4e-3, num_threads=1).fit(x)
    best = (atoms @ sae.dictionary_.T).max(1)
    return {"case": "planted_recovery", "d": 64, "atoms": 128, "n_latents": 512, "fit_s": round(time.perf_counter() - t, 2),
            "min_cos": round(float(best.min()), 4), "share_atoms_cos_ge_0.9": round(float((best >= 0.9).mean()), 4)}


def case_ddp():
    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import get_spark
    from tokens2policy.represent.distributed import ArraySource, train_distributed
    from tokens2policy.represent.sae import SAEParams

    spark = get_spark(load_config(None, ["data_dir=/tmp/t2p_bench_represent", "spark.session=create"]))
    x, _, _ = planted(20000, 64, 128, 4)
    p = SAEParams(n_latents=512, k=8, epochs=5, batch_size=512, lr=2e-3)
    out = []
    for backend, procs in (("local", 1), ("torch", 1), ("torch", 2)):
        t = time.perf_counter()
        sae = train_distributed(ArraySource(x), p, backend=backend, num_processes=procs, spark=spark)
        out.append({"case": "ddp", "backend": backend, "processes": procs, "wall_s": round(time.perf_counter() - t, 2),
                    "normalized_mse": round(sae.metrics(x)["normalized_mse"], 5)})
    return out


def case_horovod():
    """1 process vs 2 Horovod ranks (horovod.spark.run, gloo, CPU) vs 2 DDP ranks, each rank reading its own
    parquet shard of a Delta table; same data and seed."""
    import pandas as pd

    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import get_spark
    from tokens2policy.represent.distributed import delta_source, train_distributed
    from tokens2policy.represent.sae import SAEParams

    spark = get_spark(load_config(None, ["data_dir=/tmp/t2p_bench_represent", "spark.session=create"]))
    x, _, _ = planted(20000, 64, 128, 4)
    path = "/tmp/t2p_bench_represent/horovod_vectors"
    (spark.createDataFrame(pd.DataFrame({"vector": [r.tolist() for r in x]})).repartition(4)
     .write.format("delta").mode("overwrite").save(path))
    src = delta_source(spark, path)
    p = SAEParams(n_latents=512, k=8, epochs=5, batch_size=512, lr=2e-3, seed=0)
    out, ref = [], None
    for backend, procs in (("local", 1), ("horovod", 1), ("horovod", 2), ("torch", 2)):
        t = time.perf_counter()
        sae = train_distributed(src, p, backend=backend, num_processes=procs, spark=spark)
        wall = time.perf_counter() - t
        ref = ref or sae
        cos = np.abs(sae.dictionary_ @ ref.dictionary_.T).max(axis=1)
        out.append({"case": "horovod", "backend": backend, "processes": procs, "wall_s": round(wall, 2),
                    "normalized_mse": round(sae.metrics(x)["normalized_mse"], 6),
                    "min_atom_cos_vs_local": round(float(cos.min()), 6), "load_avg_1m": round(os.getloadavg()[0], 1)})
    return out


def case_bbc():
    from _bbc import bbc_corpus, bbc_embeddings
    import scipy.sparse as sp

    from tokens2policy.represent.labels import TermContrast, label_neurons
    from tokens2policy.represent.sae import SparseAutoencoder

    texts, topics, ids = bbc_corpus()
    emb = bbc_embeddings(texts, ids)
    t = time.perf_counter()
    sae = SparseAutoencoder(n_latents=128, k=8, epochs=60, batch_size=64, lr=2e-3, num_threads=1).fit(emb)
    fit_s = time.perf_counter() - t
    labels = label_neurons(sae.encode(emb), texts, ids, scores=sae.scores(emb), label_terms=5, redact_text=False)
    names = sorted(set(topics))
    tc = TermContrast().fit(texts)
    typical = tc.top_terms(sp.csr_matrix(np.array([topics == t for t in names], dtype=float)), n_terms=30)
    hits = {}
    for name, terms in zip(names, typical):
        words = {w for w, _ in terms}
        best = max(labels, key=lambda l: len(set(l["label"].split(", ")) & words))
        hits[name] = {"label": best["label"], "typical_terms_in_label": len(set(best["label"].split(", ")) & words)}
    return {"case": "bbc_minilm", "docs": len(texts), "fit_s": round(fit_s, 2),
            **{k: round(v, 4) for k, v in sae.metrics(emb).items()}, "topics": hits}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--bbc", action="store_true")
    ap.add_argument("--horovod", action="store_true", help="only the 1 vs 2 process Horovod comparison")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--demo-threads", default=None,
                    help="only: the demo's SAE training on these thread counts, e.g. 1,2 (0 = default)")
    a = ap.parse_args()
    if a.demo_threads:
        for row in case_demo_threads([int(t) for t in a.demo_threads.split(",")]):
            print(json.dumps(row), flush=True)
        sys.exit(0)
    if a.horovod:
        for row in case_horovod():
            print(json.dumps(row), flush=True)
        sys.exit(0)
    print(json.dumps(case_train(threads=a.threads)), flush=True)
    print(json.dumps(case_planted()), flush=True)
    if a.bbc:
        print(json.dumps(case_bbc()), flush=True)
    if a.ddp:
        for row in case_ddp():
            print(json.dumps(row), flush=True)
