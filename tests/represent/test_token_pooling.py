"""represent.encode=tokens_maxpool: the Spark max-pool of token-state codes against an in-memory max-pool."""
import numpy as np
import pandas as pd

from tokens2policy.represent.sae import SparseAutoencoder, rows_to_csr


def test_spark_maxpool_of_token_codes_equals_in_memory_maxpool(spark):
    from tokens2policy.represent.job import encode_frame, pool_token_codes

    rng = np.random.default_rng(0)
    d, m = 8, 16
    # two experiments share unit ids: the pooling must key on (experiment_id, unit_id)
    units = [(e, u) for e in ("e1", "e2") for u in range(6)]
    x_doc = rng.normal(size=(len(units), d)).astype(np.float32)
    n_tok = {key: int(rng.integers(1, 5)) for key in units[::2]}  # every other unit has sampled token states
    tok_rows = [(e, u, rng.normal(size=d).astype(np.float32)) for (e, u), n in n_tok.items() for _ in range(n)]
    tok_rows.append(("e3", 0, rng.normal(size=d).astype(np.float32)))  # a token of a unit without a document: ignored
    x_tok = np.stack([v for *_, v in tok_rows])
    sae = SparseAutoencoder(n_latents=m, k=3, epochs=3, batch_size=16, seed=0, num_threads=1).fit(
        np.vstack([x_doc, x_tok]))

    docs = spark.createDataFrame(pd.DataFrame({"experiment_id": [e for e, _ in units], "unit_id": [u for _, u in units],
                                               "vector": [r.tolist() for r in x_doc]}))
    toks = spark.createDataFrame(pd.DataFrame({"experiment_id": [e for e, _, _ in tok_rows],
                                               "unit_id": [u for _, u, _ in tok_rows],
                                               "vector": [v.tolist() for *_, v in tok_rows]}))
    doc_codes = encode_frame(spark, docs, sae).select("experiment_id", "unit_id", "indices", "values")
    out = pool_token_codes(spark, toks, doc_codes, sae).orderBy("experiment_id", "unit_id").toPandas()

    assert list(zip(out["experiment_id"], out["unit_id"])) == units  # every unit once, none dropped, none added
    assert all(np.all(np.diff(i) > 0) for i in out["indices"])  # ascending neuron ids, no duplicates
    got = rows_to_csr(out["indices"].tolist(), out["values"].tolist(), m).toarray()
    tok_codes = sae.encode(x_tok).toarray()
    doc_dense = sae.encode(x_doc).toarray()
    for row, key in enumerate(units):
        mine = [i for i, (e, u, _) in enumerate(tok_rows) if (e, u) == key]
        want = tok_codes[mine].max(axis=0) if mine else doc_dense[row]
        np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-7, err_msg=str(key))
        assert out["pooled_tokens"][row] == len(mine)
    # pooling over several tokens activates more neurons than one code may (up to k per token)
    assert max(len(i) for i, n in zip(out["indices"], out["pooled_tokens"]) if n > 1) > 3
