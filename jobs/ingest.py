"""spark-submit entry point for the ingest stage: `spark-submit jobs/ingest.py --config conf/cluster.yaml [--set k=v]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "ingest", *sys.argv[1:]]))
