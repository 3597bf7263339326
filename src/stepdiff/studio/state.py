"""What the studio holds about a job while it is queued or running, and the exceptions of its engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..control import CancelToken
from .spec import JobSpec

__all__ = ["JobNotFound", "QueueFull", "WrongState"]


class _Closing(Exception):
    """The server closes while a storage write keeps failing: the job is left as the database has it (a row still
    marked running is marked interrupted at the next start)."""


class _Dropped(Exception):
    """The user cancelled a job whose picture was waiting to be written: it ends without it."""


class QueueFull(RuntimeError):
    pass


class JobNotFound(LookupError):
    pass


class WrongState(RuntimeError):
    pass


@dataclass
class _Live:
    """A job the server holds in memory: queued or running."""

    id: str
    spec: JobSpec
    token: CancelToken = field(default_factory=CancelToken)
    plan: Any = None  # its GuidancePlan, once it runs
    run: Any = None
    steps_completed: int = 0
    model_rows: int = 0
    steering: list[dict[str, Any]] = field(default_factory=list)
    calls_at_cancel: int | None = None
    waiting: str | None = None  # why its picture or its row is not written yet (a full disk), while that lasts
    started: bool = False
    actor: Any = None  # the Ray actor running it (serve --ray)
    model_calls: int = 0  # model calls so far (Ray: the actor reports them with each step)
    last_event: float = float("-inf")  # when its latest step event was offered (perf_counter)
