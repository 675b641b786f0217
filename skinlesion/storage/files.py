"""A store in a local directory (`file:///path`), with atomic writes and conditional writes."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from skinlesion import faults
from skinlesion.errors import InputError, StoreError
from skinlesion.keys import safe_key
from skinlesion.storage.base import (
    Done,
    Download,
    ObjectInfo,
    Upload,
    child_key,
    in_order,
    sha256_bytes,
    sha256_file,
)


class FileStore:
    """A directory. `root` is a real path (may hold spaces, '%', any letter); `uri` is
    its `file://` URI, percent-encoded once, which `open_store` decodes once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.uri = self.root.as_uri()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root} is a file, not a directory (a store is a directory)")

    def child(self, *parts: str) -> FileStore:
        sub = FileStore(self.root / child_key(parts))
        if not sub.root.is_relative_to(self.root):
            raise InputError(f"{self.uri}/{child_key(parts)} leads out of the store (a symlink)")
        return sub

    def _path(self, key: str) -> Path:
        """The file of `key`; a key whose path leads out of the root (through a symlink
        in the tree) is refused: a store never reads or writes outside its directory."""
        path = self.root / safe_key(key)
        if not path.resolve().is_relative_to(self.root):
            raise InputError(f"{self.uri}/{key} leads out of the store (a symlink): refused")
        return path

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise InputError(f"not found: {self.uri}/{key}") from None

    def put_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: readers never see half a file
        return sha256_bytes(data)

    def get_file(self, key: str, dest: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise InputError(f"not found: {self.uri}/{key}")
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def put_file(self, src: str | Path, key: str) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(src, tmp)
        digest = sha256_file(tmp)
        if digest != sha256_file(src):
            os.unlink(tmp)
            raise StoreError(f"checksum mismatch writing {self.uri}/{key}")
        os.replace(tmp, path)
        faults.point("upload")
        return digest

    def put_files(self, items: Sequence[Upload], done: Done[Upload] | None = None) -> list[str]:
        """`put_file` of every (source, key), in order (local copies: no latency to hide)."""
        return in_order(lambda item: self.put_file(*item), items, done)

    def get_files(self, items: Sequence[Download], done: Done[Download] | None = None) -> None:
        in_order(lambda item: self.get_file(*item), items, done)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / safe_key(prefix) if prefix else self.root
        if not base.is_dir():  # a file named `prefix` is not listed: same as S3
            return []
        if not self._inside(base):
            raise InputError(f"{self.uri}/{prefix} leads out of the store (a symlink): refused")
        out = []
        for dirpath, dirnames, filenames in os.walk(base):  # never into symlinked directories
            folder = Path(dirpath)
            for name in filenames:
                path = folder / name
                if name.startswith(".tmp-"):
                    continue
                # The walk never enters a symlinked directory, so only a symlinked file can
                # lead out: resolve just those (a resolve per file is most of a listing).
                if path.is_symlink() and not self._inside(path):
                    # listed, so that reading it names the refusal
                    out.append(ObjectInfo(path.relative_to(self.root).as_posix(), 0))
                    continue
                try:
                    st = path.stat()
                except OSError:  # a dangling link, or gone since the walk
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append(ObjectInfo(path.relative_to(self.root).as_posix(), st.st_size))
            dirnames.sort()
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    # Conditional writes (run locks): atomic against other processes on this filesystem.

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` holding `data` unless it exists; True when this call created it."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)  # atomic, and fails when the name exists: whole file or none
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def swap_bytes(self, key: str, expected: bytes, data: bytes | None) -> bool:
        """Replace `key` with `data` (delete it when None) only if it holds `expected`.

        Serialised by an flock on the key's directory (released by the kernel if the
        process dies); creation through `put_bytes_if_absent` cannot clash with it.
        """
        import fcntl

        path = self._path(key)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            if current != expected:
                return False
            if data is None:
                path.unlink()
            else:
                self.put_bytes(key, data)
            return True
        finally:
            os.close(dir_fd)  # also drops the flock
