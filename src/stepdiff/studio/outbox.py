"""The Ray actor's stand-in for the studio's ``EventHub`` (``stepdiff serve --ray``)."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["Outbox"]


class Outbox:
    """The actor's stand-in for the ``EventHub``: its preview thread publishes here and the studio takes the events
    (``poll``). A step event replaces the pending one of its job; if that one had a frame and the new one has none,
    the new one carries it (as ``Previewer.offer``), so a frame is never lost between two polls."""

    def __init__(self) -> None:
        self.listening = False  # set from the studio's hub at every poll (``hear``)
        self._delivery = {True: 0.0, False: 0.0}
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._steps: dict[str, dict[str, Any]] = {}

    def hear(self, audience: Any) -> None:
        """The studio's ``EventHub.audience()`` (or a bool: listening, delivery not measured)."""
        if isinstance(audience, dict):
            self.listening = audience["clients"] > 0
            self._delivery = {True: audience["framed"], False: audience["plain"]}
        else:
            self.listening = bool(audience)

    def delivery_seconds(self, framed: bool) -> float:
        """The studio's cost of delivering a step event to its clients, as of the latest poll (the relay through Ray
        is not counted)."""
        return self._delivery[framed]

    def publish(self, event: dict[str, Any]) -> None:
        with self._lock:
            if event.get("type") != "step":
                self._events.append(event)
                return
            old = self._steps.get(event["job"])
            if old is not None and old.get("frame") and not event.get("frame"):
                event = {**event, "frame": old["frame"], "frame_step": old["frame_step"]}
            self._steps[event["job"]] = event

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            out = self._events + list(self._steps.values())
            self._events, self._steps = [], {}
        return out
