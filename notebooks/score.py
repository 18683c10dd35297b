# Databricks notebook source
# MAGIC %md
# MAGIC # tokens2policy — Score new units
# MAGIC
# MAGIC Applies the registered targeting policy (text + covariates → recommendation, CATE with its CI, the rule that fired) to new units at scale through `mlflow.pyfunc.spark_udf` (docs/score.md).
# MAGIC
# MAGIC **Reads:** `score.input` (files, a table or a query; columns mapped by the `source` section) · **Writes:** scores, score_quarantine
# MAGIC
# MAGIC Widgets: `config` (YAML profile), `overrides` (`key=value` separated by `;`, e.g.
# MAGIC `score.input=main.t2p.new_units; score.model_uri=models:/NAME@champion`), `force` (unused: scoring always runs;
# MAGIC an unchanged input commits nothing). Outside Databricks the same parameters come from `T2P_CONFIG`,
# MAGIC `T2P_OVERRIDES`, so this file also runs as plain Python: `python notebooks/score.py`.

# COMMAND ----------

import os
import sys

try:
    import tokens2policy  # noqa: F401  (the wheel on Databricks, the editable install locally)
except ImportError:  # a plain checkout: use the sources next to this notebook
    _here = os.path.dirname(os.path.abspath(globals().get("__file__", os.getcwd() + "/x")))
    sys.path.insert(0, os.path.join(os.path.dirname(_here), "lib"))

from tokens2policy import api
from tokens2policy.report.notebook import notebook_args

args = notebook_args(globals())
print(f"config={args.config_path} overrides={args.overrides}")

# COMMAND ----------

summary = api.score(config=args.load())
print(summary)
