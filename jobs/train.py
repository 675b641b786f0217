"""Kubernetes Job entrypoint: the train stage. Arguments as `skinlesion train --help`."""

import sys

from skinlesion.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
