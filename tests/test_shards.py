"""The TFRecord schema (skinlesion/shards.py): an example is the same bytes in every process,
so that a rerun's shards, and the fingerprints of the stages that read them, are the same."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from skinlesion import shards

_ENCODE = (
    "import hashlib; from skinlesion import shards\n"
    "ex = shards.Example(b'jpeg bytes' * 50, 3, 'ISIC_0024306', 'HAM_0000118')\n"
    "print(hashlib.sha256(shards.encode(ex)).hexdigest())\n"
)


def test_an_example_is_the_same_bytes_whatever_the_hash_seed() -> None:
    """Protobuf orders a map's entries by hash unless asked not to: processes with other
    hash seeds wrote other bytes for the same example (and prepare's shards differed)."""
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "TF_CPP_MIN_LOG_LEVEL": "3"}
        out = subprocess.run(
            [sys.executable, "-c", _ENCODE], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        digests.add(out.stdout.strip())
    assert len(digests) == 1
    ex = shards.Example(b"jpeg bytes" * 50, 3, "ISIC_0024306", "HAM_0000118")
    assert digests == {hashlib.sha256(shards.encode(ex)).hexdigest()}
    assert shards.decode(shards.encode(ex)) == ex
