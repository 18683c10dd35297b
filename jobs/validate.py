"""spark-submit entry point for the validation study: `spark-submit jobs/validate.py --config conf/cluster.yaml [--set validate.size=full]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "validate", *sys.argv[1:]]))
