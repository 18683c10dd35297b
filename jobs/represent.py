"""spark-submit entry point for the represent stage: `spark-submit jobs/represent.py --config conf/cluster.yaml [--set k=v]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "represent", *sys.argv[1:]]))
