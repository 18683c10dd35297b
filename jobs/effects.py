"""spark-submit entry point for the effects stage: `spark-submit jobs/effects.py --config conf/cluster.yaml [--set k=v]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "effects", *sys.argv[1:]]))
