"""spark-submit entry point for the report stage: `spark-submit jobs/report.py --config conf/cluster.yaml [--set k=v]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "report", *sys.argv[1:]]))
