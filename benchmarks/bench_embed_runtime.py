"""Embedding runtimes on the demo corpus: torch fp32 (the reference) vs torch bf16 autocast vs ONNX Runtime fp32
vs ONNX Runtime int8.

On the distinct texts of the demo (the 2,225 BBC News articles, 2,127 distinct texts, all over 128 tokens, so
every forward pass is a full 128-token window — as in the demo's embed stage):

* **quality**: cosine of each runtime's document vector to torch's fp32 vector (min / 1st percentile / mean);
* **downstream**: the demo's 20,000 units (``simulate_units`` with the demo settings of ``conf/local.yaml``) get
  each runtime's vectors; one TopK SAE (128 latents, k = 8, 20 epochs, seed 0: the demo dictionary) is trained on
  the torch vectors and encodes every runtime's vectors, and NEXIS (in-memory engine, GCM, α = 0.05, FWER,
  ρ = 0.5, min_active 20, covariates tenure_days/prior_sessions: the demo's identify settings) selects on each —
  ``same_dictionary`` compares those selections. ``own_dictionary`` trains a dictionary per runtime (what a
  pipeline run would do) and also on torch vectors computed with other batching (``torch_rebatched``: the
  floating-point noise floor), reporting each selection's size and its neurons' majority topics;
* **throughput**: one thread per runtime (what each of ``local[2]``'s two Python workers runs), the same
  texts and token-budget batches, runtimes interleaved over ``--repeats`` passes of ``--speed-texts`` texts
  (min and median seconds, ratio to torch); ``--spark`` adds the embed UDF over all distinct texts on
  ``local[2]`` per runtime (the stage's model pass without Delta writes), interleaved too.

    .venv/bin/python benchmarks/bench_embed_runtime.py                      # quality + NEXIS + in-process speed
    .venv/bin/python benchmarks/bench_embed_runtime.py --spark --repeats 3
    .venv/bin/python benchmarks/bench_embed_runtime.py --runtimes torch,torch_bf16 --spark   # embed.precision

Prints one JSON document. ONNX exports are cached (``embed.cache_dir`` default); the first run pays for them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import numpy as np

RUNTIMES = {"torch": {"runtime": "torch", "precision": "fp32"}, "torch_bf16": {"runtime": "torch", "precision": "bf16"},
            "onnx": {"runtime": "onnx"}, "onnx_int8": {"runtime": "onnx", "quantize": "int8"}}


def _log(msg):
    print(f"[bench_embed_runtime] {msg}", file=sys.stderr, flush=True)


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _nexis_on(codes, units, seed=0):
    from tokens2policy.identify.engine import nexis

    w = units[["tenure_days", "prior_sessions"]].to_numpy(np.float64)
    res = nexis(units["engagement"].to_numpy(), units["treatment"].to_numpy(), codes, w=w, alpha=0.05, test="gcm",
                adjust="FWER", rho=0.5, min_active=20, seed=seed)
    return sorted(int(j) for j in res.selected)


def _sae(x, seed=0):
    from tokens2policy.represent.sae import SparseAutoencoder

    return SparseAutoencoder(n_latents=128, k=8, epochs=20, batch_size=512, lr=1e-3, seed=seed, aux_k=64).fit(x)


def _topics_of(codes, topics, selected):
    """Each selected neuron's majority topic among the units where it is active (share in brackets)."""
    out = []
    csc = codes.tocsc()
    for j in selected:
        rows = csc.indices[csc.indptr[j]:csc.indptr[j + 1]]
        vals, counts = np.unique(topics[rows], return_counts=True)
        out.append(f"{vals[counts.argmax()]} ({counts.max() / max(len(rows), 1):.0%})")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-texts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runtimes", default="torch,onnx,onnx_int8")
    ap.add_argument("--skip-nexis", action="store_true")
    ap.add_argument("--spark", action="store_true", help="also time the embed UDF on local[2] per runtime")
    ap.add_argument("--cache-dir", default=None, help="embed.cache_dir for the ONNX exports")
    args = ap.parse_args(argv)
    names = [r for r in args.runtimes.split(",") if r]
    if names[0] != "torch":
        raise SystemExit("the first runtime must be torch (the reference)")

    from tokens2policy.config import DemoConfig, EmbedConfig
    from tokens2policy.embed.models import resolve_model
    from tokens2policy.ingest.demo import load_bbc_articles, simulate_units

    arts = load_bbc_articles()
    texts = list(dict.fromkeys(arts["text"].tolist()))
    out = {"n_texts": len(texts), "max_tokens": 128, "threads": 1, "load_average_start": os.getloadavg()}
    specs = {n: dataclasses.replace(resolve_model(EmbedConfig(cache_dir=args.cache_dir, **RUNTIMES[n])),
                                    cpu_threads=1) for n in names}
    out["model_hash"] = {n: s.model_hash for n, s in specs.items()}
    models, out["load_seconds"] = {}, {}
    for n, spec in specs.items():
        t = time.perf_counter()
        models[n] = spec.load()
        out["load_seconds"][n] = round(time.perf_counter() - t, 2)  # an ONNX export on the first run only
        _log(f"loaded {n} in {out['load_seconds'][n]} s")
    import torch

    torch.set_num_threads(1)

    # quality over every distinct text (also a first, full-corpus timing)
    vectors, out["full_pass_seconds"] = {}, {}
    for n, model in models.items():
        t = time.perf_counter()
        vectors[n] = np.stack(model.encode(texts).vectors)
        out["full_pass_seconds"][n] = round(time.perf_counter() - t, 2)
        _log(f"{n}: full pass {out['full_pass_seconds'][n]} s")
    out["cosine_to_torch"] = {}
    for n in names[1:]:
        c = _cos(vectors[n], vectors["torch"])
        out["cosine_to_torch"][n] = {"min": round(float(c.min()), 6), "p01": round(float(np.quantile(c, 0.01)), 6),
                                     "mean": round(float(c.mean()), 6)}

    # throughput, interleaved
    sub = texts[: args.speed_texts]
    secs = {n: [] for n in names}
    for r in range(args.repeats):
        for n, model in models.items():
            t = time.perf_counter()
            model.encode(sub)
            secs[n].append(time.perf_counter() - t)
        _log(f"repeat {r}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in secs.items()))
    out["speed"] = {n: {"seconds": [round(x, 3) for x in v], "min": round(min(v), 3),
                        "median": round(statistics.median(v), 3),
                        "docs_per_second": round(len(sub) / min(v), 1),
                        "speedup_vs_torch_min": round(min(secs["torch"]) / min(v), 3),
                        "speedup_vs_torch_median": round(statistics.median(secs["torch"]) / statistics.median(v), 3)}
                    for n, v in secs.items()}

    if not args.skip_nexis:
        units = simulate_units(DemoConfig(n_units=20000, seed=7), arts)
        row_of = {t: i for i, t in enumerate(texts)}
        text_of = dict(zip(arts["article_id"], arts["text"]))
        unit_rows = np.array([row_of[text_of[a]] for a in units["article_id"]])
        topics = units["topic"].to_numpy()
        x = {n: vectors[n][unit_rows] for n in names}
        t = time.perf_counter()
        sae = _sae(x["torch"])
        codes = {n: sae.encode(x[n]) for n in names}
        same = {n: _nexis_on(codes[n], units) for n in names}
        out["same_dictionary"] = {
            "selected": same, "topics": {n: _topics_of(codes[n], topics, s) for n, s in same.items()},
            "identical_to_torch": {n: same[n] == same["torch"] for n in names[1:]},
            "codes_support_agreement": {n: round(float((codes[n] != 0).multiply(codes["torch"] != 0).sum()
                                                       / (codes["torch"] != 0).sum()), 4) for n in names[1:]}}
        rebatched = dataclasses.replace(specs["torch"], batch_tokens=1024, max_batch_size=16).load()
        x["torch_rebatched"] = np.stack(rebatched.encode(texts).vectors)[unit_rows]
        out["own_dictionary"] = {}
        for n in [*names, "torch_rebatched"]:
            own = _sae(x[n])
            z = own.encode(x[n])
            sel = _nexis_on(z, units)
            out["own_dictionary"][n] = {"n_selected": len(sel), "topics": sorted(_topics_of(z, topics, sel))}
        out["nexis_seconds"] = round(time.perf_counter() - t, 1)

    if args.spark:
        out["spark_udf"] = _spark_udf(texts, specs, args.repeats)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=1, default=str))
    return out


def _spark_udf(texts, specs, repeats):
    """Seconds of the embed UDF over ``texts`` on local[2] per runtime (noop write), runtimes interleaved."""
    import tempfile

    from pyspark.sql import functions as F

    from tokens2policy.config import load_config
    from tokens2policy.embed.models import cpu_threads_per_task
    from tokens2policy.embed.udf import make_embed_udf
    from tokens2policy.lakehouse import get_spark

    root = tempfile.mkdtemp(prefix="t2p_bench_runtime_")
    spark = get_spark(load_config(None, [f"data_dir={root}", "spark.session=create", "spark.master=local[2]"]))
    df = spark.createDataFrame([(t,) for t in texts], "text string").repartition(2).cache()
    df.count()
    threads = cpu_threads_per_task(spark)
    udfs = {n: make_embed_udf(dataclasses.replace(s, cpu_threads=threads)) for n, s in specs.items()}

    def once(udf):
        t = time.perf_counter()
        (df.sortWithinPartitions(F.length("text").desc()).select(udf(F.col("text"), F.lit(False)).alias("r"))
         .write.format("noop").mode("overwrite").save())
        return time.perf_counter() - t

    res = {n: {"cold": round(once(u), 2), "warm": []} for n, u in udfs.items()}  # cold: workers load the model
    for _ in range(repeats):
        for n, u in udfs.items():
            res[n]["warm"].append(round(once(u), 2))
    for n in res:
        res[n]["docs_per_second"] = round(len(texts) / min(res[n]["warm"]), 1)
        res[n]["speedup_vs_torch"] = round(min(res["torch"]["warm"]) / min(res[n]["warm"]), 3)
    spark.stop()
    return res


if __name__ == "__main__":
    main()
