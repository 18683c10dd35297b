"""spark-submit entry point for the embed stage: `spark-submit jobs/embed.py --config conf/cluster.yaml [--set k=v]`."""
import sys

from tokens2policy.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "embed", *sys.argv[1:]]))
