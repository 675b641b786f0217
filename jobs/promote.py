"""Kubernetes Job entrypoint: the promote stage. Arguments as `skinlesion promote --help`."""

import sys

from skinlesion.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["promote", *sys.argv[1:]]))
