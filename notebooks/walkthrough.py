# Databricks notebook source
# MAGIC %md
# MAGIC # tokens2policy — end-to-end walkthrough
# MAGIC
# MAGIC Runs the whole pipeline, ingest → embed → represent → identify → effects → policy → report, one stage per cell so each can be inspected, then prints the run summary and shows the report. Up-to-date stages are skipped (their inputs and config are unchanged); `force=true` reruns them.
# MAGIC
# MAGIC **Writes:** every stage table, the MLflow runs and the report
# MAGIC
# MAGIC Widgets: `config` (YAML profile), `overrides` (`key=value` separated by `;`), `force` (`true` reruns an
# MAGIC up-to-date stage). Outside Databricks the same parameters come from `T2P_CONFIG`, `T2P_OVERRIDES`,
# MAGIC `T2P_FORCE`, so this file also runs as plain Python: `python notebooks/walkthrough.py`.

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

# MAGIC %md
# MAGIC ## Ingest
# MAGIC Reads the experiment logs (`source` section; the bundled BBC demo by default), validates them, quarantines bad rows with a reason code, assigns cross-fitting folds and merges the `units` table.

# COMMAND ----------

results_ingest = run_notebook_stage("ingest", args)
print(results_ingest)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Embed
# MAGIC Embeds every unit's text with the frozen text model (GPU when the cluster has one) into the `embeddings` and sampled `token_states` tables.

# COMMAND ----------

results_embed = run_notebook_stage("embed", args)
print(results_embed)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Represent
# MAGIC Trains the sparse autoencoder on the embeddings and writes each unit's active neurons (`neurons`), their statistics and labels with redacted top examples.

# COMMAND ----------

results_represent = run_notebook_stage("represent", args)
print(results_represent)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Identify (NEXIS)
# MAGIC NEXIS forward/backward search for the minimal set of direct effect modifiers (Bonferroni Gate 1, relative stopping Gate 2), with the full selection trace and the marginal-screening baseline.

# COMMAND ----------

results_identify = run_notebook_stage("identify", args)
print(results_identify)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Effects
# MAGIC Group average treatment effects (GATEs) with CIs for the selected modifiers, cross-fitted CATE learners and their held-out calibration (BLP, GATES, TOC/Qini).

# COMMAND ----------

results_effects = run_notebook_stage("effects", args)
print(results_effects)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Policy
# MAGIC Learns a targeting policy (depth-limited policy tree on doubly-robust scores) and its held-out value against treat-all, treat-none and random-at-the-same-budget.

# COMMAND ----------

results_policy = run_notebook_stage("policy", args)
print(results_policy)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Report
# MAGIC Writes the self-contained HTML report (plus PNGs) next to the lakehouse and logs it to MLflow.

# COMMAND ----------

results_report = run_notebook_stage("report", args)
print(results_report)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Summary
# MAGIC Selected direct effect modifiers with their labels, GATEs with CIs, the policy value against its baselines,
# MAGIC and the path of the report.

# COMMAND ----------

from tokens2policy.lakehouse import get_spark
from tokens2policy.report.notebook import report_html
from tokens2policy.report.summary import print_summary

all_results = [r for name in ("ingest", "embed", "represent", "identify", "effects", "policy", "report")
               for r in globals()[f"results_{name}"]]
print_summary(get_spark(args.load()), args.load(), all_results)
page = report_html(all_results)
if page is not None and "displayHTML" in globals():
    displayHTML(page)  # noqa: F821  (Databricks only)
