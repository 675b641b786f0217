"""Kubernetes Job entrypoint: the prepare stage. Arguments as `skinlesion prepare --help`."""

import sys

from skinlesion.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
