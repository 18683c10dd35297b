# Databricks notebook source
# MAGIC %md
# MAGIC # tokens2policy — Policy
# MAGIC
# MAGIC Learns a targeting policy (depth-limited policy tree on doubly-robust scores) and its held-out value against treat-all, treat-none and random-at-the-same-budget.
# MAGIC
# MAGIC **Writes:** policy_rules, policy_value, assignments
# MAGIC
# MAGIC Widgets: `config` (YAML profile), `overrides` (`key=value` separated by `;`), `force` (`true` reruns an
# MAGIC up-to-date stage). Outside Databricks the same parameters come from `T2P_CONFIG`, `T2P_OVERRIDES`,
# MAGIC `T2P_FORCE`, so this file also runs as plain Python: `python notebooks/policy.py`.

# COMMAND ----------

import os
import sys

try:
    import tokens2policy  # noqa: F401  (the wheel on Databricks, the editable install locally)
except ImportError:  # a plain checkout: use the sources next to this notebook
    _here = os.path.dirname(os.path.abspath(globals().get("__file__", os.getcwd() + "/x")))
    sys.path.insert(0, os.path.join(os.path.dirname(_here), "lib"))

from tokens2policy.report.notebook import notebook_args, run_notebook_stage

args = notebook_args(globals())
print(f"config={args.config_path} overrides={args.overrides} force={args.force}")

# COMMAND ----------

results = run_notebook_stage("policy", args)
for r in results:
    print(r)
