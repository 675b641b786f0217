"""Local scratch (skinlesion/scratch.py): a stage whose scratch filesystem fills up (a real,
size-limited tmpfs: a true ENOSPC) stops with one line naming the directory, commits
nothing, and a rerun with space commits."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skinlesion import scratch
from skinlesion.errors import EXIT_FAILURE
from skinlesion.manifest import MANIFEST
from skinlesion.storage import FileStore
from skinlesion.synthetic import write_sample_data

TMPFS_SIZE = "96k"  # less than the 70 images' shards (about 2 KB each at 64 px)


def _private_mount() -> list[str] | None:
    """An `unshare` prefix giving the command a private mount namespace in which it may
    mount a tmpfs (root: a mount namespace; else a user namespace too); None if refused."""
    as_user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    cmd = ["unshare", *as_user, "--mount"]
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run([*cmd, "true"], capture_output=True)
    return cmd if probe.returncode == 0 else None


def _prepare(raw: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "skinlesion", "prepare", "--raw", str(raw), "--out", str(out),
        "--image-size", "64", "--shard-size", "24", "--workers", "1",
    ]  # fmt: skip


def test_a_write_error_is_scratch_full_only_when_its_filesystem_is(tmp_path: Path) -> None:
    """ENOSPC while the scratch filesystem has room is someone else's (e.g. the store's)."""
    roomy = OSError(errno.ENOSPC, "No space left on device")
    assert not scratch._is_full(roomy, tmp_path)
    assert not scratch._is_full(ValueError("bad"), tmp_path)
    scratch.configure(tmp_path)
    try:
        with pytest.raises(OSError) as info, scratch.scratch_dir("t-") as work:
            assert work.parent == tmp_path
            raise roomy
        assert info.value is roomy
    finally:
        scratch.configure(None)


@pytest.mark.slow
def test_full_scratch_is_one_line_naming_it_and_a_rerun_with_space_commits(
    tmp_path: Path,
) -> None:
    unshare = _private_mount()
    if unshare is None:
        pytest.skip("needs `unshare` (util-linux) allowed to make a mount namespace")
    raw = tmp_path / "raw" / "HAM10000"
    write_sample_data(FileStore(raw), images=70, seed=0, workers=1)
    out = tmp_path / "out"
    small = tmp_path / "scratch"
    small.mkdir()
    env = {**os.environ, scratch.ENV: str(small), "TF_CPP_MIN_LOG_LEVEL": "2"}
    mount = f'mount -t tmpfs -o size={TMPFS_SIZE} skinlesion-scratch "$0" && exec "$@"'
    full = subprocess.run(
        [*unshare, "sh", "-c", mount, str(small), *_prepare(raw, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert full.returncode == EXIT_FAILURE, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"skinlesion prepare: error: local scratch {small} is full"), last
    assert "no space left on device" in last and "SKINLESION_SCRATCH" in last
    assert "Traceback" not in full.stderr
    assert not out.exists() or not any(out.rglob("*")), "something was written to the store"

    # The same scratch directory, now on the roomy filesystem underneath.
    again = subprocess.run(_prepare(raw, out), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / MANIFEST).is_file()
