"""``t2p``: run pipeline stages on a config profile.

    t2p setup                                   fetch and cache the Delta jars (run once; the Makefile does it)
    t2p setup --horovod                         also compile and install Horovod, the optional SAE training backend
    t2p run STAGE|all --config conf/local.yaml [--set key=value ...] [--force STAGE ...] [--progress MODE]

User errors (bad config, a missing or empty input table, a GPU required but absent, a stage not built yet, another
pipeline holding the lakehouse's run lock) print one line and exit with status 2. ``--progress`` (or
``T2P_PROGRESS``) sets how long stages show their progress.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from tokens2policy.config import ConfigError, load_config
from tokens2policy.stages import EXTRA_STAGES, STAGE_NAMES, STAGES, StageNotBuilt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="t2p",
        description="tokens2policy: from a randomized experiment's logs (text tokens + covariates) to direct effect "
        "modifiers (NEXIS), effects with CIs and a targeting policy — as Spark jobs on Delta tables, tracked in MLflow.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="fetch and cache the Delta Lake jars from Maven Central (once per machine)")
    setup.add_argument("--horovod", action="store_true",
                       help="also build Horovod 0.28.1 (pytorch + gloo) from source into this Python environment "
                       "for represent.backend=horovod (a few minutes; needs g++)")
    run = sub.add_parser("run", help="run one stage or the whole pipeline")
    run.add_argument("stage", choices=[*STAGE_NAMES, "all", *(s.name for s in EXTRA_STAGES)],
                     help="stage to run, 'all' for the pipeline, or 'validate' for the validation study")
    run.add_argument("--config", "-c", default=None, help="YAML profile (default conf/local.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set data_dir=/tmp/run1 --set identify.alpha=0.01")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rerun this stage even if it is up to date (repeatable; 'all' for every stage)")
    run.add_argument("--progress", choices=["auto", "bar", "log", "off"], default=None,
                     help="progress of long stages: a bar on a terminal, sparse lines in logs (auto, the default; "
                     "same as the T2P_PROGRESS environment variable), always a bar, always lines, or none")
    return p


def _fail(message: str) -> int:
    print(f"t2p: error: {message}", file=sys.stderr)
    return 2


def check_force(names: List[str]) -> None:
    """Every ``--force`` name is a stage (pipeline or extra, e.g. validate) or ``all``; else one ConfigError line."""
    known = (*STAGE_NAMES, *(s.name for s in EXTRA_STAGES))
    for name in names:
        if name not in (*known, "all"):
            raise ConfigError(f"--force {name}: unknown stage; choose one of {', '.join(known)} or all")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.command == "setup":
        from tokens2policy.lakehouse.jars import fetch_delta_jars

        try:
            fetch_delta_jars()
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

    from tokens2policy.lakehouse import MissingTableError, get_spark
    from tokens2policy.lakehouse.lock import LeaseLostError, LockHeldError
    from tokens2policy.stages import EmptyInputError, run_stages

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
        names = list(STAGE_NAMES) if args.stage == "all" else [args.stage]
        stages = STAGES + tuple(s for s in EXTRA_STAGES if s.name in names)
        spark = get_spark(config)
        print(f"[t2p] data_dir={config.data_path}")
        results = run_stages(spark, config, names, force=args.force, stages=stages)  # prints the Spark UI URL first
    except (ConfigError, MissingTableError, StageNotBuilt, EmptyInputError, LockHeldError, LeaseLostError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("t2p: interrupted; the stage is recorded as failed and a rerun resumes there", file=sys.stderr)
        return 130
    if args.stage == "all" or args.stage == "report":
        from tokens2policy.report.summary import print_summary

        print_summary(spark, config, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
