"""The embed Spark job end to end: real Spark, Delta and MLflow on a tmp lakehouse."""
import json
import sys

import numpy as np
import pytest
from pyspark.sql import functions as F

from embed_helpers import bbc_paragraphs, content_hash, cosine_rows, write_units
from tokens2policy.embed import job as embed_job
from tokens2policy.embed.models import EncodedBatch, EmbeddingModel, TokenStates
from tokens2policy.lakehouse import read_table, table_version


def _embeddings(spark, cfg):
    return read_table(spark, cfg, "embeddings").toPandas().sort_values(["experiment_id", "unit_id"]).reset_index(drop=True)


def test_vectors_equal_plain_encode_with_dedup_and_statuses(spark, make_cfg, encode_plain):
    cfg = make_cfg("embed.max_text_chars=2000", "embed.token_sample_rate=0")
    texts = bbc_paragraphs(80)
    long_text = " ".join(bbc_paragraphs(10, skip=80))  # > 128 tokens: truncated
    units = texts + texts[:20] + ["", None, "   ", "y" * 2001, long_text]
    write_units(spark, cfg, units)

    summary = embed_job.run(spark, cfg)
    emb = _embeddings(spark, cfg)
    assert len(emb) == len(units) and not emb.duplicated(["experiment_id", "unit_id"]).any()  # no gaps, no dups
    assert (emb["content_hash"] == [content_hash(t) for t in units]).all()
    # identical texts are embedded once: one model call per distinct content hash
    assert summary["n_texts_embedded"] == len({content_hash(t) for t in units})
    assert summary["n_units_embedded"] == len(units)

    expected_status = ["ok"] * 100 + ["empty", "empty", "empty", "too_long", "truncated"]
    assert emb["status"].tolist() == expected_status
    assert emb.loc[100:103, "vector"].isna().all()
    has_vec = emb["status"].isin(["ok", "truncated"]).to_numpy()
    got = np.stack(emb.loc[has_vec, "vector"].to_numpy())
    ref = encode_plain([u for u, keep in zip(units, has_vec) if keep], max_tokens=cfg.embed.max_tokens)
    assert cosine_rows(got, ref).min() >= 0.9999
    assert (emb.loc[has_vec, "dim"] == 384).all() and emb["model_hash"].nunique() == 1
    assert emb.loc[104, "n_tokens"] == cfg.embed.max_tokens - 2
    dup = emb.iloc[:20]["vector"].tolist(), emb.iloc[80:100]["vector"].tolist()
    assert all(np.array_equal(a, b) for a, b in zip(*dup))

    # a rerun with nothing missing embeds nothing and commits nothing
    v_emb = table_version(spark, cfg, "embeddings")
    again = embed_job.run(spark, cfg)
    assert again["n_units_embedded"] == 0 and again["n_texts_embedded"] == 0
    assert table_version(spark, cfg, "embeddings") == v_emb


def _fail_on_unit(unit_id):
    """Wrap a DataFrame so the Spark task holding ``unit_id`` fails while it is being written."""

    def wrap(df):
        boom = F.when(F.col("unit_id") == unit_id, F.raise_error(F.lit("injected failure while writing")))
        return df.where(boom.otherwise(F.lit(True)))

    return wrap


@pytest.mark.slow  # five job runs: ~1 min on an idle 2-core machine
def test_resume_after_failure_mid_write_and_incremental_run(spark, make_cfg, encode_plain, monkeypatch):
    cfg = make_cfg("embed.token_sample_rate=0.3", "embed.partitions=4")
    first, new = bbc_paragraphs(60), bbc_paragraphs(40, skip=60)
    write_units(spark, cfg, first)
    embed_job.run(spark, cfg)
    v_before = table_version(spark, cfg, "embeddings")

    # new units arrive (one repeats an old text: it must reuse the stored vector); the job dies mid-write
    units = first + new + [first[0]]
    write_units(spark, cfg, units)
    real_write = embed_job.write_table

    def failing_write(df, cfg_, name, **kw):
        if name == "embeddings":
            df = _fail_on_unit(85)(df)
        return real_write(df, cfg_, name, **kw)

    monkeypatch.setattr(embed_job, "write_table", failing_write)
    with pytest.raises(Exception, match="injected failure"):
        embed_job.run(spark, cfg)
    monkeypatch.setattr(embed_job, "write_table", real_write)
    # no partial rows: the failed write never committed, whatever files its finished tasks left behind
    assert table_version(spark, cfg, "embeddings") == v_before
    assert read_table(spark, cfg, "embeddings").count() == 60

    summary = embed_job.run(spark, cfg)
    assert summary["n_units_embedded"] == 41  # the 40 new units plus the repeated text's unit
    assert summary["n_texts_embedded"] == 40  # the repeated text was not embedded again
    emb = _embeddings(spark, cfg)
    assert len(emb) == 101 and not emb.duplicated(["unit_id"]).any()
    ref = encode_plain(units)
    assert cosine_rows(np.stack(emb["vector"].to_numpy()), ref).min() >= 0.9999
    # token states: committed once by the failed run, not duplicated by the rerun
    tok = read_table(spark, cfg, "token_states").toPandas()
    assert not tok.duplicated(["unit_id", "position"]).any()
    assert embed_job.run(spark, cfg)["n_units_embedded"] == 0

    # ingest updated two texts (one to a brand-new text, one to a text already embedded): both rows are replaced
    units[3], units[70] = bbc_paragraphs(1, skip=100)[0], units[5]
    write_units(spark, cfg, units)
    summary = embed_job.run(spark, cfg)
    assert summary["n_units_changed"] == 2 and summary["n_units_embedded"] == 2
    # the new text is embedded; unit 70's text only if its token states must be redone (it is sampled)
    sampled_70 = read_table(spark, cfg, "units").where(embed_job.sample_mask(cfg.seed, 0.3) & (F.col("unit_id") == 70))
    assert summary["n_texts_embedded"] == 1 + sampled_70.count()
    emb = _embeddings(spark, cfg)
    assert len(emb) == 101 and not emb.duplicated(["unit_id"]).any()
    assert (emb["content_hash"] == [content_hash(t) for t in units]).all()
    assert cosine_rows(np.stack(emb["vector"].to_numpy()), encode_plain(units)).min() >= 0.9999


def test_token_states_sampling_rate_and_values(spark, make_cfg, st_model):
    rate, n = 0.25, 200
    # fp32 (the default; explicit here): the states are compared with the fp32 reference at 1e-4
    cfg = make_cfg(f"embed.token_sample_rate={rate}", "embed.token_states_per_unit=16", "embed.precision=fp32")
    texts = bbc_paragraphs(n)
    write_units(spark, cfg, texts)
    embed_job.run(spark, cfg)
    tok = read_table(spark, cfg, "token_states").toPandas()
    emb = _embeddings(spark, cfg)
    sampled = sorted(tok["unit_id"].unique())
    # Bernoulli(rate) per unit: the count lies within 4 binomial SDs of n * rate
    sd = np.sqrt(n * rate * (1 - rate))
    assert abs(len(sampled) - n * rate) <= 4 * sd
    # and the sample is the job's own deterministic mask, not an accident of which tasks ran
    units = read_table(spark, cfg, "units")
    mask = sorted(r.unit_id for r in units.where(embed_job.sample_mask(cfg.seed, rate)).select("unit_id").collect())
    assert sampled == mask
    for uid, grp in list(tok.groupby("unit_id"))[:3]:
        n_tok = int(emb.loc[emb.unit_id == uid, "n_tokens"].iloc[0])
        assert len(grp) == min(n_tok, 16) and grp["position"].is_unique and grp["position"].max() < n_tok
        ref = st_model.encode([texts[uid]], output_value="token_embeddings")[0].numpy()[1:-1]
        ids = st_model.tokenizer(texts[uid], add_special_tokens=False)["input_ids"]
        grp = grp.sort_values("position")
        pos = grp["position"].to_numpy()
        assert grp["token"].tolist() == [st_model.tokenizer.convert_ids_to_tokens(ids)[p] for p in pos]
        assert np.abs(np.stack(grp["vector"].to_numpy()) - ref[pos]).max() < 1e-4


def test_model_loaded_once_per_python_worker(spark, make_cfg, tmp_path):
    log = tmp_path / "loads.jsonl"
    # a max_batch_size no other test uses: the workers' caches cannot already hold this spec
    cfg = make_cfg("embed.partitions=6", f"embed.load_log={log}", "embed.max_batch_size=257",
                   "embed.token_sample_rate=0")
    write_units(spark, cfg, bbc_paragraphs(120))
    embed_job.run(spark, cfg)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    pids = [e["pid"] for e in events]
    assert len(pids) == len(set(pids))  # no worker loaded it twice
    assert 1 <= len(pids) < 6  # 6 tasks, fewer loads: reused workers kept the model


class CharCountModel(EmbeddingModel):
    """A toy non-transformer 'modality' through the plug-in interface: letter counts a..z."""

    modality = "toy"
    dim = 26

    def encode(self, inputs, want_states=None):
        vecs, status, states = [], [], []
        for i, t in enumerate(inputs):
            t = (t or "").lower()
            v = np.array([t.count(c) for c in "abcdefghijklmnopqrstuvwxyz"], dtype=np.float32)
            vecs.append(v if t.strip() else None)
            status.append("ok" if t.strip() else "empty")
            want = want_states is not None and want_states[i] and t.strip()
            states.append(TokenStates(np.arange(2, dtype=np.int32), ["p0", "p1"], np.stack([v, v])) if want else None)
        return EncodedBatch(vecs, status, [len(t) for t in inputs], states)


def char_count_loader(spec):
    return CharCountModel()


def test_plugin_model_runs_through_the_same_spark_plumbing(spark, make_cfg):
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship the test module's classes to workers
    try:
        cfg = make_cfg("embed.token_sample_rate=1")
        texts = ["Abc abc", "zzz", "", "Hello world"]
        write_units(spark, cfg, texts)
        summary = embed_job.run(spark, cfg, loader=char_count_loader)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    emb = _embeddings(spark, cfg)
    expected = CharCountModel().encode(texts)
    assert emb["status"].tolist() == expected.status and summary["n_token_rows"] == 6
    for got, exp in zip(emb["vector"], expected.vectors):
        assert (got is None and exp is None) or np.array_equal(got, exp)
