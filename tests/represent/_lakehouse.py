"""A small represent lakehouse with planted topics (units, embeddings, token_states), shared by the stage tests."""
import numpy as np
import pandas as pd

TOPICS = {"sport": ["goal", "match", "striker", "league", "coach"],
          "politics": ["vote", "election", "minister", "parliament", "party"]}
FILLER = ["today", "people", "said", "week", "year", "time", "report", "local", "news", "group"]


def planted_tables(spark, cfg, n=240, d=16, seed=0):
    from tokens2policy.lakehouse import write_table

    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(2, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    topic = np.arange(n) % 2
    strength = rng.uniform(1, 3, size=n)
    x = (strength[:, None] * atoms[topic] + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
    names = list(TOPICS)
    texts = []
    for i in range(n):
        words = list(rng.choice(FILLER, size=12)) + list(rng.choice(TOPICS[names[topic[i]]], size=4))
        texts.append(f"Reporter Jane Doe (jane.doe@example.org) wrote {i}: " + " ".join(words))
    ids = [f"u{i:04d}" for i in range(n)]
    units = pd.DataFrame({"experiment_id": "exp1", "unit_id": ids, "text": texts})
    emb = pd.DataFrame({"experiment_id": "exp1", "unit_id": ids, "model": "m", "model_hash": "h1",
                        "vector": [r.tolist() for r in x], "dim": d, "status": "ok"})
    tok_rows = []
    for i in range(0, n, 4):
        for p, w in enumerate(texts[i].split()[-4:]):
            tok_rows.append({"experiment_id": "exp1", "unit_id": ids[i], "model_hash": "h1", "position": p,
                             "token": w, "vector": (x[i] + 0.01 * rng.normal(size=d)).astype(np.float32).tolist()})
    write_table(spark.createDataFrame(units), cfg, "units", partition_by=["experiment_id"])
    write_table(spark.createDataFrame(emb), cfg, "embeddings", partition_by=["experiment_id"])
    write_table(spark.createDataFrame(pd.DataFrame(tok_rows)), cfg, "token_states", partition_by=["experiment_id"])
    return x, ids, topic
