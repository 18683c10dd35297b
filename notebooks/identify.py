# Databricks notebook source
# MAGIC %md
# MAGIC # tokens2policy — Identify (NEXIS)
# MAGIC
# MAGIC NEXIS forward/backward search for the minimal set of direct effect modifiers (Bonferroni Gate 1, relative stopping Gate 2), with the full selection trace and the marginal-screening baseline.
# MAGIC
# MAGIC **Writes:** modifiers, selection_trace, marginal_screen
# MAGIC
# MAGIC Widgets: `config` (YAML profile), `overrides` (`key=value` separated by `;`), `force` (`true` reruns an
# MAGIC up-to-date stage). Outside Databricks the same parameters come from `T2P_CONFIG`, `T2P_OVERRIDES`,
# MAGIC `T2P_FORCE`, so this file also runs as plain Python: `python notebooks/identify.py`.

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

results = run_notebook_stage("identify", args)
for r in results:
    print(r)
