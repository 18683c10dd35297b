"""Design 2's representation reaches the study's Spark tasks as broadcast bytes, not as a path on the driver's disk
(a multi-node cluster's executors, or any cluster when ``data_dir`` is remote, cannot read the driver's files)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.sparse as sp

from tokens2policy.validate.job import study_frame
from tokens2policy.validate.study import build_tasks, run_in_memory
from tokens2policy.validate.text import neuron_topic_f1

NAMES = ("business", "entertainment", "politics", "sport", "tech")


def _store(path, rng, n=600, m=30):
    topics = rng.choice(NAMES, n)
    codes = rng.uniform(0, 1, (n, m)) * (rng.uniform(size=(n, m)) < 0.3)
    codes[:, 7] = (topics == "sport") * rng.uniform(0.5, 1.0, n)
    codes[:, 21] = (topics == "politics") * 1.0
    c = sp.csr_matrix(codes)
    np.savez_compressed(path, data=c.data, indices=c.indices, indptr=c.indptr, shape=np.array(c.shape),
                        topics=topics.astype(str), topic_names=np.array(NAMES),
                        f1=neuron_topic_f1(c, topics, NAMES), metrics=json.dumps({"mean_l0": 1.0}))


def test_tasks_read_the_broadcast_representation_after_the_driver_file_is_gone(spark, make_cfg, tmp_path):
    rep = str(tmp_path / "rep.npz")
    _store(rep, np.random.default_rng(3))
    cfg = make_cfg("validate.cells=[]", "validate.null_outcomes=[]", "validate.calibration=[]", "validate.text=true",
                   "validate.text_n_values=[600]", "validate.text_effects=[1.0]", "validate.repetitions=2",
                   "validate.methods=[nexis_linear]", "validate.text_min_active=5")
    tasks = build_tasks(cfg.validate_, cfg.seed, text_representation=rep)
    assert len(tasks) == 2 and all(t["design"]["representation"] == rep for t in tasks)
    want = run_in_memory(tasks).sort_values(["task_id", "method", "estimand"]).reset_index(drop=True)
    frame = study_frame(spark, tasks, "r", "ci", representations=[rep])   # the bytes are read here, on the driver
    os.rename(rep, rep + ".moved")  # the tasks now cannot open the path their design names
    got = frame.toPandas().sort_values(["task_id", "method", "estimand"]).reset_index(drop=True)
    assert len(got) == len(want) > 0
    assert got["selected"].tolist() == want["selected"].tolist()
    np.testing.assert_allclose(got["iou"].to_numpy(float), want["iou"].to_numpy(float), equal_nan=True)
    # without the broadcast the same tasks fail on the missing file: the test exercises the shipping
    other = str(tmp_path / "never_shipped.npz")
    with pytest.raises(Exception, match="never_shipped.npz"):
        study_frame(spark, [dict(t, design=dict(t["design"], representation=other)) for t in tasks], "r2",
                    "ci").toPandas()
