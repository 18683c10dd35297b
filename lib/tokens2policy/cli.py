"""``t2p``: run pipeline stages on a config profile, and see where runs stand.

    t2p setup                                   fetch and cache the Delta jars (run once; the Makefile does it)
    t2p setup --test-jars                       also cache Hadoop's minicluster jars (the test suite's real HDFS)
    t2p setup --s3a                             also cache Hadoop's S3A connector (spark.hadoop_connectors: [s3a])
    t2p setup --horovod                         also compile and install Horovod, the optional SAE training backend
    t2p run STAGE|all --config conf/local.yaml [--set key=value ...] [--force STAGE ...] [--progress MODE]
    t2p status [--config ...] [--set ...]       each stage: last run, seconds, versions, up to date or stale and why
    t2p tables [--config ...] [--set ...]       each table: rows, Delta version, last commit and operation, writer
    t2p show TABLE [--limit N] [--version V]    a table's first rows, cells shortened to read
    t2p score --input PATH_OR_TABLE [--model-uri URI] [--config ...] [--set ...]
                                                the registered policy on new units → the ``scores`` table

User errors (bad config, a missing or empty input table, a GPU required but absent, a stage not built yet, an
unknown table, another pipeline holding the lakehouse's run lock) print one line and exit with status 2.
``--progress`` (or ``T2P_PROGRESS``) sets how long stages show their progress; ``--log-level`` (or
``T2P_LOG_LEVEL``) how much they say (``tokens2policy.logs``). The commands call the Python API
(``tokens2policy.api``), which a notebook can call the same way.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from tokens2policy.api import check_force  # noqa: F401  (re-exported: `t2p run --force` checks names with it)
from tokens2policy.config import ConfigError, load_config
from tokens2policy.logs import LEVELS, configure_logging
from tokens2policy.stages import EXTRA_STAGES, STAGE_NAMES, StageNotBuilt

log = logging.getLogger("tokens2policy.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="t2p",
        description="tokens2policy: from a randomized experiment's logs (text tokens + covariates) to direct effect "
        "modifiers (NEXIS), effects with CIs and a targeting policy — as Spark jobs on Delta tables, tracked in MLflow.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=str.lower, choices=LEVELS, default=None,
                        help="how much to say: debug, info (default; same as the T2P_LOG_LEVEL environment "
                        "variable), warning or error; the run summary and errors are always shown")
    profile = argparse.ArgumentParser(add_help=False)
    profile.add_argument("--config", "-c", default=None, help="YAML profile (default conf/local.yaml)")
    profile.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set data_dir=/tmp/run1 --set identify.alpha=0.01")
    sub = p.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", parents=[common],
                           help="fetch and cache the Delta Lake jars from Maven Central (once per machine)")
    setup.add_argument("--test-jars", action="store_true",
                       help="also cache Hadoop's minicluster jars, with which the test suite starts a real HDFS")
    setup.add_argument("--s3a", action="store_true",
                       help="also cache Hadoop's S3A connector (hadoop-aws + its AWS SDK bundle, ~700 MB) for "
                       "s3a:// storage with spark.hadoop_connectors: [s3a]; the test suite's S3 test needs it")
    setup.add_argument("--horovod", action="store_true",
                       help="also build Horovod 0.28.1 (pytorch + gloo) from source into this Python environment "
                       "for represent.backend=horovod (a few minutes; needs g++)")
    run = sub.add_parser("run", parents=[common, profile], help="run one stage or the whole pipeline")
    run.add_argument("stage", choices=[*STAGE_NAMES, "all", *(s.name for s in EXTRA_STAGES)],
                     help="stage to run, 'all' for the pipeline, or 'validate' for the validation study")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rerun this stage even if it is up to date (repeatable; 'all' for every stage)")
    run.add_argument("--progress", choices=["auto", "bar", "log", "off"], default=None,
                     help="progress of long stages: a bar on a terminal, sparse lines in logs (auto, the default; "
                     "same as the T2P_PROGRESS environment variable), always a bar, always lines, or none")
    sub.add_parser("status", parents=[common, profile],
                   help="each stage: last run, status, seconds, input/output versions, up to date or stale and why")
    sub.add_parser("tables", parents=[common, profile],
                   help="each table: rows, Delta version, last commit and operation, the stage that writes it")
    show = sub.add_parser("show", parents=[common, profile], help="the first rows of a table, cells shortened")
    show.add_argument("table", help="table name (t2p tables lists them)")
    show.add_argument("--limit", "-n", type=int, default=20, help="rows to show (default 20)")
    show.add_argument("--version", type=int, default=None, help="Delta version to read (default: the latest)")
    score = sub.add_parser("score", parents=[common, profile],
                           help="score new units (text + covariates) with the registered policy into 'scores'")
    score.add_argument("--input", "-i", default=None, metavar="PATH_OR_TABLE",
                       help="files (path/URI/glob: delta, parquet, csv, json), a catalog table, or with --kind query "
                       "a Spark SQL query (score.input)")
    score.add_argument("--kind", choices=["delta", "parquet", "csv", "json", "table", "query"], default=None,
                       help="the input's kind (default: from the input: a name is a table, else the extension or "
                       "a Delta log)")
    score.add_argument("--model-uri", default=None,
                       help="policy model to use, e.g. models:/NAME/3 or models:/NAME@champion (default: the version "
                       "the last successful policy stage run registered for each experiment/outcome)")
    score.add_argument("--experiment-id", default=None, help="experiment id when the input has no such column")
    score.add_argument("--outcome", default=None, help="score this outcome's policy only (default: every outcome)")
    return p


def _score(args) -> int:
    from tokens2policy import api

    config = load_config(args.config, args.overrides)
    summary = api.score(args.input, config=config, model_uri=args.model_uri, kind=args.kind,
                        experiment_id=args.experiment_id, outcome=args.outcome)
    reasons = ", ".join(f"{r} ({n})" for r, n in summary["reasons"].items())
    print(f"scored {summary['scored']} of {summary['rows_in']} row(s) into 'scores' (version "
          f"{summary['scores_version']}: {summary['inserted']} new, {summary['updated']} updated, "
          f"{summary['unchanged']} unchanged); quarantined {summary['quarantined']} into 'score_quarantine'"
          + (f": {reasons}" if reasons else ""), flush=True)
    for pair, uri in summary["models"].items():
        print(f"  {pair}: {uri}", flush=True)
    return 0


def _fail(message: str) -> int:
    log.error(message)
    return 2


def _setup(args) -> int:
    from tokens2policy.lakehouse.jars import fetch_delta_jars

    try:
        fetch_delta_jars()
    except RuntimeError as exc:
        return _fail(str(exc))
    if args.test_jars:
        from tokens2policy.lakehouse.jars import fetch_minicluster_jars

        try:
            fetch_minicluster_jars()
        except RuntimeError as exc:  # only the HDFS tests need them: they skip with this reason
            log.warning("%s; the HDFS tests will skip", exc)
    if args.s3a:
        from tokens2policy.lakehouse.jars import fetch_hadoop_jars

        try:
            fetch_hadoop_jars("s3a")
        except RuntimeError as exc:
            return _fail(str(exc))
    if args.horovod:
        from tokens2policy.represent.horovod_install import install_horovod

        try:
            rc = install_horovod()
        except RuntimeError as exc:
            return _fail(str(exc))
        if rc != 0:
            return _fail(f"building Horovod failed (exit {rc}); see the pip output above")
    return 0


def _inspect(args) -> int:
    """``t2p status`` / ``tables`` / ``show``: read-only views, printed as aligned text on stdout."""
    from tokens2policy import api
    from tokens2policy.overview import to_text

    config = load_config(args.config, args.overrides)
    spark = api.session(config)
    if args.command == "status":
        df = api.status(config, spark=spark).drop(columns=["up_to_date"])
        if df["outputs"].eq("").all():  # stage_runs records no output versions (yet): no empty column
            df = df.drop(columns=["outputs"])
        text = to_text(df)
    elif args.command == "tables":
        text = to_text(api.tables(config, spark=spark).drop(columns=["exists"]))
    else:
        df = api.show(args.table, limit=args.limit, version=args.version, config=config, spark=spark)
        version = "" if args.version is None else f" as of version {args.version}"
        text = f"{args.table}{version}: first {len(df)} row(s)\n" + to_text(df)
    print(text, flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configure_logging(args.log_level)
    except ValueError as exc:  # a bad T2P_LOG_LEVEL
        configure_logging("info")
        return _fail(str(exc))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.command == "setup":
        return _setup(args)

    from tokens2policy.lakehouse import MissingTableError
    from tokens2policy.stages import EmptyInputError

    if args.command == "score":
        try:
            return _score(args)
        except (ConfigError, MissingTableError) as exc:
            return _fail(str(exc))

    if args.command in ("status", "tables", "show"):
        try:
            return _inspect(args)
        except (ConfigError, MissingTableError) as exc:
            return _fail(str(exc))

    from tokens2policy import api
    from tokens2policy.lakehouse.lock import LeaseLostError, LockHeldError
    from tokens2policy.progress import progress_mode

    if args.progress:
        os.environ["T2P_PROGRESS"] = args.progress
    try:
        mode = progress_mode()
    except ValueError as exc:
        return _fail(str(exc))
    if mode != "bar":  # MLflow's own upload bars would flood a log
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.isatty():
        sys.stdout.reconfigure(line_buffering=True)  # stage lines interleave in order with progress lines (stderr)
    try:
        config = load_config(args.config, args.overrides)
        check_force(args.force)
        spark = api.session(config)
        results = api.run_with(spark, config, args.stage, force=args.force)  # logs the Spark UI URL first
    except (ConfigError, MissingTableError, StageNotBuilt, EmptyInputError, LockHeldError, LeaseLostError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; the stage is recorded as failed and a rerun resumes there")
        return 130
    if args.stage == "all" or args.stage == "report":
        from tokens2policy.report.summary import print_summary

        print_summary(spark, config, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
