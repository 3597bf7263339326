"""The event stream: every subscriber keeps one slot per job for step events, which the newest overwrites.

Worker and preview threads ``publish``; each WebSocket connection is a ``Subscriber`` drained by its own
coroutine. Lifecycle events (queued, started, finished, cancelled, failed, interrupted) are kept in
order; a step event replaces the job's previous step event that the client has not read yet, so a slow
client gets the latest frame, never a backlog, and never slows a run (publishing only takes a lock and
schedules a wake-up on the event loop). A subscriber that falls more than ``max_pending`` lifecycle
events behind is dropped (its socket is closed; the page resynchronises from the HTTP API).

Each WebSocket coroutine reports what writing a step event to its client took (``sent``); ``delivery_seconds`` is
then what one step event costs to deliver to every client, with or without a frame. The preview thread charges that
to the job's preview budget, so the frames get sparser as clients are added (``previews.StreamBudget``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import threading
from collections import OrderedDict, deque
from typing import Any

__all__ = ["EventHub", "Subscriber", "is_framed_step"]

_RECENT_SENDS = 32  # writes whose times make the estimate of one write


def is_framed_step(text: str) -> tuple[bool, bool]:
    """(a step event, with a frame) of an event's JSON text as ``EventHub.publish`` wrote it."""
    step = text.startswith('{"type": "step"')
    return step, step and '"frame": "data:' in text


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
        self._sends: dict[bool, deque[float]] = {True: deque(maxlen=_RECENT_SENDS), False: deque(maxlen=_RECENT_SENDS)}

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    @property
    def listening(self) -> bool:
        return bool(self._subscribers)

    @property
    def count(self) -> int:
        return len(self._subscribers)

    def sent(self, seconds: float, framed: bool) -> None:
        """From a WebSocket coroutine: writing one step event (``framed``: with a frame) to its client took
        ``seconds``."""
        with self._lock:
            self._sends[framed].append(max(float(seconds), 0.0))

    def delivery_seconds(self, framed: bool) -> float:
        """What delivering one step event (``framed``: with a frame) to every client now listening costs: the
        number of clients times the recent mean time of one write (0 before any was measured)."""
        with self._lock:
            recent = list(self._sends[framed])
        return len(self._subscribers) * statistics.fmean(recent) if recent else 0.0

    def audience(self) -> dict[str, Any]:
        """The clients listening and what delivering a step event to them costs (sent to a Ray actor's preview
        thread, whose budget charges it)."""
        return {"clients": self.count, "framed": self.delivery_seconds(True), "plain": self.delivery_seconds(False)}

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
