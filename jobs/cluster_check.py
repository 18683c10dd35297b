"""spark-submit entry point of the cluster diagnostic: where do tasks run, and from which copy of the package?

    spark-submit --master spark://HOST:7077 --py-files dist/tokens2policy.zip jobs/cluster_check.py \
        --config conf/cluster.yaml [--set k=v ...] [--partitions 8]

Writes the ``cluster_check`` Delta table (one row per partition: executor pid, host, executor id, module file)
and prints a one-line JSON summary (see ``tokens2policy.lakehouse.diagnostics``).
"""
import argparse
import json
import sys

from tokens2policy.config import ConfigError, load_config
from tokens2policy.lakehouse import get_spark
from tokens2policy.lakehouse.diagnostics import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cluster_check")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--partitions", type=int, default=8)
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"cluster_check: error: {exc}", file=sys.stderr)
        return 2
    spark = get_spark(config)
    summary = run(spark, config, partitions=args.partitions)
    print("T2P_CLUSTER_CHECK " + json.dumps(summary, sort_keys=True), flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
