"""Kubernetes Job entrypoint: the augment stage. Arguments as `skinlesion augment --help`."""

import sys

from skinlesion.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["augment", *sys.argv[1:]]))
