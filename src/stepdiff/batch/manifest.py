"""The manifest of a batch output folder: append-only JSON Lines, one entry per image written.

Why JSON Lines and not Parquet: an entry must be durable the moment its image is, one at a time, for a
run that can be killed at any point. A JSONL append of one line with ``fsync`` is that; a Parquet file is
written whole (its footer indexes the row groups), so a manifest that grows image by image would be many
small part files or a rewrite per image. pandas (``read_json(lines=True)``) and pyarrow
(``pyarrow.json.read_json``) read JSONL directly, and it converts to Parquet in one line for analysis.

Safety:
- one writer: the run holds an exclusive lock on the folder (``.stepdiff-batch.lock``), so two runs
  never interleave, and under Ray the driver alone appends (workers return entries to it);
- each entry is one ``write`` of a whole line on an ``O_APPEND`` descriptor, then ``fsync``;
- a crash can tear only the last line: reading ignores a last line with no newline, and opening for
  append cuts it off first, so a new entry never glues onto a fragment. Its image is simply redone.
- a line in the middle that is not valid JSON is not ours to guess about: reading refuses with its number.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "MANIFEST_NAME", "Manifest", "folder_lock"]

MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".stepdiff-batch.lock"


class Manifest:
    """``folder/manifest.jsonl``: :meth:`read` the entries, :meth:`append` one (durably)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / MANIFEST_NAME
        self._fd: int | None = None
        self.torn = 0  # bytes of a torn last line cut off on open

    def read(self) -> list[dict[str, Any]]:
        """Every complete entry, in order. A torn last line (a crash mid-append) is ignored."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete = lines[:-1]  # the part after the last newline is empty, or a torn entry
        entries = []
        for n, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise ValueError(f"manifest {str(self.path)!r} line {n} is not valid JSON ({e}); it was changed by "
                                 "something other than stepdiff: fix or remove that line, or move the manifest "
                                 "aside to redo its images") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                raise ValueError(f"manifest {str(self.path)!r} line {n} is not a stepdiff entry (no \"key\")")
            entries.append(entry)
        return entries

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last entry of each key (a redone image's newer entry wins)."""
        return {e["key"]: e for e in self.read()}

    def open(self) -> None:
        """Open for appending; a torn last line is cut off first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size:
                tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
                if not tail.endswith(b"\n"):
                    cut = tail.rfind(b"\n")
                    keep = max(0, size - len(tail)) + cut + 1 if cut >= 0 else (0 if size <= len(tail) else None)
                    if keep is None:
                        raise ValueError(f"manifest {str(self.path)!r} ends in a line over 1 MiB long; not a stepdiff manifest")
                    os.ftruncate(fd, keep)
                    os.fsync(fd)
                    self.torn = size - keep
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def append(self, entry: dict[str, Any]) -> None:
        if self._fd is None:
            self.open()
        line = (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # one write in practice; a short write is finished, never left torn
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Manifest:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str = LOCK_NAME, busy: str | None = None):
    """Hold an exclusive lock on a folder (a batch output folder for the run, by default) while in the block; a
    second holder is refused at once with ``OSError(busy)``. The lock is the file ``name`` in the folder, held with
    ``flock``: the system releases it when its process ends, however it ends (``kill -9`` too)."""
    path = Path(folder) / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, one run at a time is the user's care
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(busy or f"--out {str(folder)!r} is in use by another stepdiff batch run; wait for it to "
                                   "finish or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
