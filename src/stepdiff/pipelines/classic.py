"""The classic per-call attributes (``pipeline._interrupt``, ``pipeline.num_timesteps``, ...) routed to the run whose
callback is executing in this thread (``stepdiff.pipelines.run``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .run import Run, current_run, remembered

__all__ = ["routed", "set_guidance", "set_interrupt"]


def routed(
    name: str, doc: str, setter: Callable[[Run, Any], None] | None = None, default: Any = None,
    check: Callable[[Any], Any] | None = None,
) -> property:
    """A classic per-call attribute, routed to the run whose callback is executing in this thread.

    Outside a callback it reads the last run this thread finished on this pipeline (as the classic
    pipelines leave their attributes after a call); writes there change nothing a later run sees.
    """

    def get(self: Any) -> Any:
        run = current_run(self)
        if run is not None:
            return getattr(run, name)
        return remembered(self).get(name, default)

    def set_(self: Any, value: Any) -> None:
        run = current_run(self)
        if run is None or setter is None:
            if setter is None and run is not None:
                raise AttributeError(f"{name} is read-only during a run")
            remembered(self)[name] = value if check is None else check(value)
            return
        setter(run, value)

    return property(get, set_, doc=doc)


def set_interrupt(run: Run, value: Any) -> None:
    if value:
        run.interrupt_now()
    else:
        run._interrupt = False


def set_guidance(run: Run, value: Any) -> None:
    run.guidance_scale = value
