"""Deterministic reruns: the same input rows and seed give identical output tables, whatever the order and
partitioning the input rows are stored in.

The represent stage is the one that trains (an SAE on the embeddings and sampled token states); it used to train on ``toPandas()`` without an
``orderBy``, so the minibatch sequence followed the files' order. Here the same units, embeddings and token states are stored twice, once in
unit order in one file and once shuffled across four partitions, on two lakehouses; represent runs on each and every
output table is compared row for row (codes, statistics, labels), exactly (no tolerance).
"""
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # two represent runs (SAE training, labels, MLflow) on 2 shared cores

WORDS = ["goal", "match", "vote", "election", "market", "shares", "today", "people", "said", "week"]


def _inputs(n=160, d=12, seed=3):
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(3, d))
    topic = np.arange(n) % 3
    x = (rng.uniform(1, 2, size=(n, 1)) * atoms[topic] + 0.1 * rng.normal(size=(n, d))).astype(np.float32)
    ids = [f"u{i:04d}" for i in range(n)]
    texts = [" ".join(rng.choice(WORDS, size=10)) for _ in range(n)]
    units = pd.DataFrame({"experiment_id": "exp1", "unit_id": ids, "text": texts})
    emb = pd.DataFrame({"experiment_id": "exp1", "unit_id": ids, "model": "m", "model_hash": "h1",
                        "vector": [r.tolist() for r in x], "dim": d, "status": "ok"})
    toks = pd.DataFrame([{"experiment_id": "exp1", "unit_id": ids[i], "model_hash": "h1", "position": p,
                          "token": w, "vector": (x[i] + 0.01 * rng.normal(size=d)).astype(np.float32).tolist()}
                         for i in range(0, n, 4) for p, w in enumerate(texts[i].split()[:3])])
    return units, emb, toks


def _store(spark, cfg, units, emb, toks, shuffle):
    from tokens2policy.lakehouse import write_table

    if shuffle:
        order = np.random.default_rng(11).permutation(len(emb))
        units, emb = units.iloc[order[::-1]], emb.iloc[order]
        toks = toks.iloc[np.random.default_rng(12).permutation(len(toks))]
    parts = 4 if shuffle else 1
    write_table(spark.createDataFrame(units).repartition(parts), cfg, "units", partition_by=["experiment_id"])
    write_table(spark.createDataFrame(emb).repartition(parts), cfg, "embeddings", partition_by=["experiment_id"])
    write_table(spark.createDataFrame(toks).repartition(parts), cfg, "token_states", partition_by=["experiment_id"])


def _table(spark, cfg, name):
    from tokens2policy.lakehouse import read_table

    df = read_table(spark, cfg, name).toPandas()
    for c in df.columns:
        if df[c].map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray))).any():
            df[c] = df[c].map(lambda v: repr(v.tolist() if isinstance(v, np.ndarray) else v))
    return df.sort_values(list(df.columns), kind="stable").reset_index(drop=True)


def test_represent_twice_on_reordered_inputs_writes_identical_tables(spark, tmp_path):
    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import table_exists
    from tokens2policy.represent import job
    from tokens2policy.stages import get_stage

    units, emb, toks = _inputs()
    tables = {}
    for shuffle in (False, True):
        cfg = load_config(None, [f"data_dir={tmp_path / f'run{int(shuffle)}'}", "represent.n_latents=12",
                                 "represent.k=2", "represent.epochs=4", "represent.batch_size=16",
                                 "represent.num_threads=1", "represent.register_model=false",
                                 "represent.label_top_docs=10", "represent.n_examples=2", "seed=5"])
        _store(spark, cfg, units, emb, toks, shuffle)
        job.run(spark, cfg)
        tables[shuffle] = {t: _table(spark, cfg, t) for t in get_stage("represent").outputs
                           if table_exists(spark, cfg, t)}  # not the distributed path's staging table
    assert set(tables[False]) == set(tables[True]) >= {"neurons", "neuron_stats", "neuron_labels"}
    assert len(tables[False]["neurons"]) == len(units)
    for name, want in tables[False].items():
        pd.testing.assert_frame_equal(tables[True][name], want, check_exact=True, obj=name)
