"""``t2p``: run pipeline stages on a config profile.

    t2p setup                                   fetch and cache the Delta jars (run once; the Makefile does it)
    t2p run STAGE|all --config conf/local.yaml [--set key=value ...] [--force STAGE ...]

User errors (bad config, a missing table, a stage not built yet) print one line and exit with status 2.
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
    sub.add_parser("setup", help="fetch and cache the Delta Lake jars from Maven Central (once per machine)")
    run = sub.add_parser("run", help="run one stage or the whole pipeline")
    run.add_argument("stage", choices=[*STAGE_NAMES, "all", *(s.name for s in EXTRA_STAGES)],
                     help="stage to run, 'all' for the pipeline, or 'validate' for the validation study")
    run.add_argument("--config", "-c", default=None, help="YAML profile (default conf/local.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set data_dir=/tmp/run1 --set identify.alpha=0.01")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rerun this stage even if it is up to date (repeatable; 'all' for every stage)")
    return p


def _fail(message: str) -> int:
    print(f"t2p: error: {message}", file=sys.stderr)
    return 2


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
        return 0

    from tokens2policy.lakehouse import MissingTableError, get_spark
    from tokens2policy.stages import run_stages

    try:
        config = load_config(args.config, args.overrides)
        for name in args.force:
            if name not in (*STAGE_NAMES, "all"):
                raise ConfigError(f"--force {name}: unknown stage; choose one of {', '.join(STAGE_NAMES)}")
        names = list(STAGE_NAMES) if args.stage == "all" else [args.stage]
        stages = STAGES + tuple(s for s in EXTRA_STAGES if s.name in names)
        spark = get_spark(config)
        ui = spark.sparkContext.uiWebUrl
        print(f"[t2p] Spark {spark.version} master={spark.sparkContext.master} UI: {ui or 'disabled'}")
        print(f"[t2p] data_dir={config.data_path}")
        results = run_stages(spark, config, names, force=args.force, stages=stages)
    except (ConfigError, MissingTableError, StageNotBuilt) as exc:
        return _fail(str(exc))
    if args.stage == "all" or args.stage == "report":
        from tokens2policy.report.summary import print_summary

        print_summary(spark, config, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
