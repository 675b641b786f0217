"""Kubernetes Job entrypoint: the controller that chains the stage Jobs of one run."""

import sys

from skinlesion.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["controller", *sys.argv[1:]]))
