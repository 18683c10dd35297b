"""spark-submit entry point for the whole pipeline: `spark-submit jobs/pipeline.py --config conf/cluster.yaml`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "all", *sys.argv[1:]]))
