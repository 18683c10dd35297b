"""The bundled demo experiment: real BBC News text, reproducible from its seed, and its effect recoverable."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from tokens2policy.config import DemoConfig
from tokens2policy.ingest.demo import broken_rows, drivers_frame, load_bbc_articles, log_schema, simulate_units


def diff_in_means(y: np.ndarray, t: np.ndarray):
    """Neyman difference in means and its standard error."""
    y1, y0 = y[t == 1], y[t == 0]
    return y1.mean() - y0.mean(), math.sqrt(y1.var(ddof=1) / len(y1) + y0.var(ddof=1) / len(y0))


def modifier_contrast(df: pd.DataFrame, topic: str):
    """Effect in the topic minus effect elsewhere: estimate, SE (independent subgroups) and the sample truth."""
    inside = (df["topic"] == topic).to_numpy()
    y, t = df["engagement"].to_numpy(), df["treatment"].to_numpy()
    (e1, s1), (e0, s0) = diff_in_means(y[inside], t[inside]), diff_in_means(y[~inside], t[~inside])
    truth = df.loc[inside, "true_cate"].mean() - df.loc[~inside, "true_cate"].mean()
    return e1 - e0, math.hypot(s1, s0), truth


def test_articles_are_the_real_bbc_corpus():
    a = load_bbc_articles()
    assert len(a) == 2225 and a["article_id"].is_unique
    assert Counter(a["topic"]) == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    assert a["text"].str.len().min() > 100
    assert not a["text"].str.contains("\ufffd").any()  # the one cp1252 article is decoded, not garbled
    assert a["text"].str.contains("£").any()


def test_generator_is_reproducible_from_its_seed():
    articles = load_bbc_articles()
    a = simulate_units(DemoConfig(n_units=500, seed=3), articles)
    b = simulate_units(DemoConfig(n_units=500, seed=3), articles)
    c = simulate_units(DemoConfig(n_units=500, seed=4), articles)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["engagement"], c["engagement"])
    demo = DemoConfig(n_units=500, seed=3)
    assert repr(broken_rows(demo, a, articles)) == repr(broken_rows(demo, b, articles))  # repr: NaN != NaN
    assert a["treatment"].sum() == 250  # complete randomization: exactly n * treated_share
    assert a["article_id"].nunique() < 500  # readers share articles


def test_true_cate_follows_the_configured_modifiers():
    demo = DemoConfig(n_units=2000, base_effect=0.4, effect_scale=2.0, modifiers={"sport": 1.5, "tech": 0.25})
    df = simulate_units(demo, load_bbc_articles())
    cate = df.groupby("topic")["true_cate"].unique()
    assert {k: list(v) for k, v in cate.items()} == {"business": [0.4], "entertainment": [0.4], "politics": [0.4],
                                                      "sport": [3.4], "tech": [0.9]}
    drivers = drivers_frame(demo)
    mods = drivers[drivers.role == "effect_modifier"].set_index("term")["coefficient"].to_dict()
    assert mods == {"topic=sport": 3.0, "topic=tech": 0.5}


def test_difference_in_means_recovers_the_topic_modifiers_at_the_default_seed():
    df = simulate_units(DemoConfig(n_units=2000), load_bbc_articles())
    for topic in ("sport", "politics", "tech"):
        est, se, truth = modifier_contrast(df, topic)
        assert abs(est - truth) < 1.96 * se, (topic, est, truth, se)
    for topic in ("sport", "politics"):
        assert abs(modifier_contrast(df, topic)[0]) > 1.96 * modifier_contrast(df, topic)[1]  # detectable at n=2,000


def test_difference_in_means_intervals_have_nominal_coverage_across_seeds():
    """Over 100 seeds the 95% interval covers the true modifier contrast ~95% of the time (binomial sd 2.2%)."""
    articles = load_bbc_articles()
    z = {"sport": [], "politics": []}
    for seed in range(100):
        df = simulate_units(DemoConfig(n_units=2000, seed=1000 + seed), articles)
        for topic in z:
            est, se, truth = modifier_contrast(df, topic)
            z[topic].append((est - truth) / se)
    for topic, values in z.items():
        values = np.asarray(values)
        assert 0.88 <= np.mean(np.abs(values) < 1.96) <= 1.0, topic
        assert abs(values.mean()) < 0.3 and 0.75 < values.std() < 1.25, topic  # unbiased, honest SE


def test_without_modifiers_the_contrast_is_null():
    df = simulate_units(DemoConfig(n_units=2000, effect_scale=0.0), load_bbc_articles())
    assert set(df["true_cate"]) == {0.5}
    est, se, truth = modifier_contrast(df, "sport")
    assert truth == 0.0 and abs(est) < 1.96 * se


@pytest.mark.slow  # a full demo ingest: ~40 s on an idle 2-core machine, minutes on a busy one
def test_demo_through_the_ingest_job(spark, make_cfg):
    """The demo end to end: logs in Delta, every broken row quarantined with its reason, truth aligned with units."""
    from tokens2policy.ingest import job
    from tokens2policy.lakehouse import read_table

    cfg = make_cfg("demo.n_units=2000")
    run = job.run(spark, cfg)
    articles = load_bbc_articles()
    clean = simulate_units(cfg.demo, articles)
    expected = Counter(reason for _, reason in broken_rows(cfg.demo, clean, articles))
    assert run["rows_in"] == 2000 + sum(expected.values())
    assert run["reasons"] == dict(expected) and run["accepted"] == 2000
    units = read_table(spark, cfg, "units").toPandas()
    truth = read_table(spark, cfg, "demo_truth").toPandas()
    assert set(units["unit_id"]) == set(truth["unit_id"])
    df = units.merge(truth[["unit_id", "topic", "true_cate", "article_id"]], on="unit_id")
    # the units hold exactly the simulated values and the article's real text
    sim = clean.set_index("unit_id").loc[df["unit_id"]]
    np.testing.assert_allclose(df["engagement"].to_numpy(), sim["engagement"].to_numpy())
    texts = dict(zip(articles["article_id"], articles["text"]))
    assert (df["text"] == df["article_id"].map(texts)).all()
    assert df["cluster"].nunique() == cfg.demo.n_clusters
    est, se, truth_diff = modifier_contrast(df, "sport")
    assert abs(est - truth_diff) < 1.96 * se and est > 1.96 * se
    assert run["balance"][cfg.demo.experiment_id]["treated_share"] == 0.5 and run["warnings"] == []
    # the schema ingest's preflight maps the demo by is the one the logs are written with
    source = read_table(spark, cfg, "demo_source").schema
    assert [(f.name, f.dataType) for f in source.fields] == [(f.name, f.dataType) for f in log_schema().fields]


def test_preflight_maps_the_demo_without_writing_it(make_cfg):
    """The demo is generated by the stage itself (once), not by its preflight; a mapping the demo's logs cannot
    satisfy is still the one-line ConfigError before anything is written."""
    from tokens2policy.config import ConfigError
    from tokens2policy.ingest import job

    cfg = make_cfg("demo.n_units=200")
    job.preflight(None, cfg)  # no Spark work at all
    with pytest.raises(ConfigError, match="'clicks' \\(source.outcome_cols\\) not found in demo:"):
        job.preflight(None, make_cfg("source.outcome_cols=[clicks]"))
    assert not (cfg.data_path / "lakehouse").exists()
