"""Stopping a run from outside the loop: a thread-safe cancel token."""

from __future__ import annotations

import threading

__all__ = ["CancelToken"]


class CancelToken:
    """Cancel a pipeline call from another thread (a UI, a server): ``pipeline(..., cancel=token)``.

    ``cancel()`` makes the run stop before its next model call (the call in flight, if any, finishes).
    A cancelled token stays cancelled: passing it to a new call raises until ``reset()`` is called.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def reset(self) -> None:
        self._event.clear()
        self.reason = "cancelled"

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled})"
