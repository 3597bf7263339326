"""The event stream: every subscriber keeps one slot per job for step events, which the newest overwrites.

Worker and preview threads ``publish``; each WebSocket connection is a ``Subscriber`` drained by its own
coroutine. Lifecycle events (queued, started, finished, cancelled, failed, interrupted) are kept in
order; a step event replaces the job's previous step event that the client has not read yet, so a slow
client gets the latest frame, never a backlog, and never slows a run (publishing only takes a lock and
schedules a wake-up on the event loop). A subscriber that falls more than ``max_pending`` lifecycle
events behind is dropped (its socket is closed; the page resynchronises from the HTTP API).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import OrderedDict
from typing import Any

__all__ = ["EventHub", "Subscriber"]


class Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending: int = 1000) -> None:
        self.loop = loop
        self.wake = asyncio.Event()
        self.max_pending = max_pending
        self.pending: OrderedDict[Any, str] = OrderedDict()
        self.overflowed = False
        self.dropped_steps = 0  # step events overwritten before this client read them
        self._scheduled = False
        self._keys = itertools.count()

    def _offer(self, event: dict[str, Any], text: str) -> bool:
        """Called under the hub's lock. Returns whether the event loop must be woken."""
        if event["type"] == "step":
            key = ("step", event["job"])
            if key in self.pending:
                self.dropped_steps += 1
            self.pending[key] = text  # a replaced key keeps its place: before this job's later events
        else:
            if len(self.pending) >= self.max_pending:
                self.overflowed = True
            self.pending[next(self._keys)] = text
        if self._scheduled:
            return False
        self._scheduled = True
        return True

    def take(self, lock: threading.Lock) -> list[str]:
        with lock:
            out = list(self.pending.values())
            self.pending.clear()
            self._scheduled = False
            self.wake.clear()
        return out


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    @property
    def listening(self) -> bool:
        return bool(self._subscribers)

    @property
    def count(self) -> int:
        return len(self._subscribers)

    def subscribe(self, loop: asyncio.AbstractEventLoop, max_pending: int = 1000) -> Subscriber:
        sub = Subscriber(loop, max_pending)
        with self._lock:
            self._subscribers = [*self._subscribers, sub]
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s is not sub]

    def publish(self, event: dict[str, Any]) -> None:
        """From any thread. The event is serialised once, whatever the number of subscribers."""
        subscribers = self._subscribers
        if not subscribers:
            return
        text = json.dumps(event)
        wake = []
        with self._lock:
            for sub in subscribers:
                if sub._offer(event, text):
                    wake.append(sub)
        for sub in wake:
            try:
                sub.loop.call_soon_threadsafe(sub.wake.set)
            except RuntimeError:  # its event loop is closed: the connection is gone
                self.unsubscribe(sub)
