"""Kubernetes Job entrypoint: the evaluate stage. Arguments as `skinlesion evaluate --help`."""

import sys

from skinlesion.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
