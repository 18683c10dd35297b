"""spark-submit entry point for the identify stage: `spark-submit jobs/identify.py --config conf/cluster.yaml [--set k=v]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "identify", *sys.argv[1:]]))
