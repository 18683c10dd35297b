"""spark-submit entry point for scoring new units with the registered policy:
`spark-submit jobs/score.py --config conf/cluster.yaml --input s3a://bucket/new_units/ [--set k=v]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
