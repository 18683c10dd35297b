"""spark-submit entry point for the policy stage: `spark-submit jobs/policy.py --config conf/cluster.yaml [--set k=v]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "policy", *sys.argv[1:]]))
