"""Job history in SQLite (the standard library's ``sqlite3``): one file in the data folder, WAL mode, one writer.

A row per job: its parameters (JSON), state, times, run record (JSON), image name and error. Rows are
written on state changes only (not per step), so the store costs nothing per step. After a crash
(kill -9) the rows are all there; ``recover()`` marks the jobs that were running as interrupted and
returns the queued ones, oldest first, to run again.

Every SQLite failure (a full disk, a read-only or damaged file) is a ``StoreError``: an ``OSError`` whose message
names the file, what failed and the fix. A row whose stored JSON cannot be read is still returned, its unreadable
column None and ``unreadable`` saying why, so that one bad row never hides the others.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["FINAL_STATES", "STATES", "JobStore", "StoreError"]

STATES = ("queued", "running", "finished", "cancelled", "failed", "interrupted")
FINAL_STATES = frozenset({"finished", "cancelled", "failed", "interrupted"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    steps_completed INTEGER NOT NULL DEFAULT 0,
    record TEXT,
    image TEXT,
    error TEXT,
    steering TEXT
);
"""
_INDEX = "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)"
_COLUMNS = ("seq", "id", "state", "params", "created", "started", "finished", "steps_completed", "record", "image",
            "error", "steering")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"


class StoreError(OSError):
    """The job history cannot be opened, read or written; the message names the file and the fix."""


def _fix(e: BaseException) -> str:
    """What to do about a SQLite or OS error on the history file, in words."""
    text = str(e).lower()
    if "full" in text or getattr(e, "errno", None) == 28:
        return "free space on its disk; the studio goes on by itself once there is room"
    if "readonly" in text or "read-only" in text or "permission" in text or "access" in text:
        return "make the file and its folder writable by this user"
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return "it is damaged or not a stepdiff studio database: move it aside (its images stay in the images " \
               "folder beside it) and start again for a new history"
    if "locked" in text or "busy" in text:
        return "another program holds it; stop that program"
    return "check the disk and the file's permissions"


class JobStore:
    """Thread-safe: one connection, one lock (SQLite has one writer anyway; the writes are few and small)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        except sqlite3.Error as e:
            raise self._error("opened", e) from None
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a process crash
                self._db.executescript(_SCHEMA)
                have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
                missing = [c for c in _COLUMNS if c not in have]
                if not missing:
                    self._db.execute(_INDEX)
        except sqlite3.Error as e:
            self._db.close()
            raise self._error("opened", e) from None
        if missing:
            self._db.close()
            raise StoreError(f"the job history {str(self.path)!r} has a jobs table without the column(s) "
                             f"{', '.join(missing)}: it is not a stepdiff studio database; move it aside (or give "
                             "another --data folder) and start again for a new history")

    def _error(self, what: str, e: BaseException) -> StoreError:
        return StoreError(f"the job history {str(self.path)!r} could not be {what} ({type(e).__name__}: {e}); "
                          f"{_fix(e)}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple) -> int:
        with self._lock:
            try:
                return self._db.execute(sql, args).rowcount
            except sqlite3.Error as e:
                raise self._error("written", e) from None

    def _read(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                rows = self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise self._error("read", e) from None
        return [self._decode(dict(zip(_COLUMNS, r))) for r in rows]

    @staticmethod
    def _decode(row: dict[str, Any]) -> dict[str, Any]:
        """The JSON columns as values; one that cannot be read becomes None and ``unreadable`` says why."""
        for key in ("params", "record", "steering"):
            if row.get(key) is not None:
                try:
                    row[key] = json.loads(row[key])
                except (TypeError, ValueError, RecursionError) as e:
                    row[key] = None
                    row.setdefault("unreadable", f"its stored {key} cannot be read ({type(e).__name__}: {e})")
        return row

    # ------------------------------------------------------------------ writes

    def add(self, job_id: str, params: dict[str, Any]) -> int:
        with self._lock:
            try:
                cur = self._db.execute("INSERT INTO jobs (id, state, params, created) VALUES (?, 'queued', ?, ?)",
                                       (job_id, json.dumps(params), time.time()))
            except sqlite3.Error as e:
                raise self._error("written", e) from None
            return int(cur.lastrowid)

    def start(self, job_id: str) -> bool:
        """queued -> running; False when the job is no longer queued (cancelled meanwhile)."""
        return self._write("UPDATE jobs SET state='running', started=? WHERE id=? AND state='queued'",
                           (time.time(), job_id)) == 1

    def cancel_queued(self, job_id: str) -> bool:
        return self._write("UPDATE jobs SET state='cancelled', finished=? WHERE id=? AND state='queued'",
                           (time.time(), job_id)) == 1

    def end(self, job_id: str, state: str, *, steps_completed: int = 0, record: dict | None = None,
            image: str | None = None, error: str | None = None, steering: list | None = None) -> None:
        if state not in FINAL_STATES:
            raise ValueError(f"state must be one of {sorted(FINAL_STATES)}, got {state!r}")
        self._write(
            "UPDATE jobs SET state=?, finished=?, steps_completed=?, record=?, image=?, error=?, steering=? WHERE id=?",
            (state, time.time(), steps_completed, None if record is None else json.dumps(record), image, error,
             None if steering is None else json.dumps(steering), job_id),
        )

    def delete(self, job_id: str) -> bool:
        return self._write("DELETE FROM jobs WHERE id=?", (job_id,)) == 1

    def recover(self, images: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """After a restart: jobs left running become interrupted (keeping an image that was written before the
        crash); returns (those jobs, the queued jobs oldest first)."""
        running = self._read(f"{_SELECT} WHERE state='running' ORDER BY seq")
        for row in running:
            image = f"{row['id']}.png"
            kept = image if (images / image).is_file() else None
            self._write("UPDATE jobs SET state='interrupted', finished=?, image=?, error=? WHERE id=?",
                        (time.time(), kept, "the server stopped while this job ran", row["id"]))
        return running, self._read(f"{_SELECT} WHERE state='queued' ORDER BY seq")

    # ------------------------------------------------------------------ reads

    def get(self, job_id: str) -> dict[str, Any] | None:
        rows = self._read(f"{_SELECT} WHERE id=?", (job_id,))
        return rows[0] if rows else None

    def page(self, limit: int, before: int | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Newest first; ``before`` is the ``seq`` of the last row of the previous page."""
        where, args = [], []
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
        return self._read(sql, (*args, limit))

    def count(self) -> dict[str, int]:
        with self._lock:
            try:
                rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
            except sqlite3.Error as e:
                raise self._error("read", e) from None
        return {str(state): n for state, n in rows}
