"""The callback protocol: ``callback(pipeline, step_index, timestep, callback_kwargs) -> dict | None``, the base
class of the official callbacks (with its cutoff step), running several in order, and the per-run state and
guidance scale a callback reads and sets."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import callbacks as _classic

from ..guidance import step_of

__all__ = ["MultiPipelineCallbacks", "PipelineCallback", "StepCallback"]

StepCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], "dict[str, torch.Tensor] | None"]

_UNSET: Any = object()


def _check_ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"cutoff_step_ratio must be a real number in [0, 1], got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"cutoff_step_ratio must be a real number in [0, 1], got {value!r}")
    return value


def _check_index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"cutoff_step_index must be a non-negative int, got {value!r}")
    return int(value)


class PipelineCallback(_classic.PipelineCallback):
    """Base class of the official callbacks.

    Exactly one of ``cutoff_step_ratio`` (a real number in [0, 1]) and ``cutoff_step_index`` (a
    non-negative int) is set. Giving only ``cutoff_step_index`` is enough; the classic spelling
    ``cutoff_step_ratio=None, cutoff_step_index=10`` also works. The cutoff step is the index, or
    ``int(pipeline.num_timesteps * ratio)``; the callback's change applies from the step after it.

    Subclasses set ``tensor_inputs`` and implement ``callback_fn``. The config is serialisable
    (``callback.config``, ``save_config``), as in the classic library.
    """

    tensor_inputs: list[str] = []  # noqa: RUF012 - class-level declaration, as in the classic API

    def __init__(self, cutoff_step_ratio: float | None = _UNSET, cutoff_step_index: int | None = None) -> None:
        # Skip the classic __init__: its validation rejects the ints 0 and 1 and accepts bools.
        if cutoff_step_ratio is _UNSET:
            cutoff_step_ratio = None if cutoff_step_index is not None else 1.0
        if (cutoff_step_ratio is None) == (cutoff_step_index is None):
            raise ValueError(
                "exactly one of cutoff_step_ratio and cutoff_step_index must be set, got "
                f"cutoff_step_ratio={cutoff_step_ratio!r}, cutoff_step_index={cutoff_step_index!r}"
            )
        ratio = None if cutoff_step_ratio is None else _check_ratio(cutoff_step_ratio)
        index = None if cutoff_step_index is None else _check_index(cutoff_step_index)
        self.register_to_config(cutoff_step_ratio=ratio, cutoff_step_index=index)

    def cutoff_step(self, pipeline: Any) -> int:
        return self.cutoff_step_of(pipeline.num_timesteps)

    def cutoff_step_of(self, num_steps: int) -> int:
        """The cutoff step of a run of ``num_steps`` model steps: the index, or ``step_of(num_steps, ratio)``."""
        if self.config.cutoff_step_index is not None:
            return self.config.cutoff_step_index
        return step_of(num_steps, self.config.cutoff_step_ratio)

    def callback_fn(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement callback_fn")

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        return self.callback_fn(pipeline, step_index, timestep, callback_kwargs)

    def __repr__(self) -> str:
        cfg = self.config
        return f"{type(self).__name__}(cutoff_step_ratio={cfg.cutoff_step_ratio}, cutoff_step_index={cfg.cutoff_step_index})"


class MultiPipelineCallbacks(_classic.MultiPipelineCallbacks):
    """Runs callbacks in order; ``tensor_inputs`` is the union of theirs, without duplicates."""

    def __init__(self, callbacks: Sequence[StepCallback]) -> None:
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"MultiPipelineCallbacks takes callables, got {cb!r} ({type(cb).__name__})")
        self.callbacks = list(callbacks)

    @property
    def tensor_inputs(self) -> list[str]:
        names: list[str] = []
        for cb in self.callbacks:
            for name in getattr(cb, "tensor_inputs", []):
                if name not in names:
                    names.append(name)
        return names

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        for cb in self.callbacks:
            result = cb(pipeline, step_index, timestep, callback_kwargs)
            if result is not None:  # None means "no change"
                callback_kwargs = result
        return callback_kwargs


def _cfg_scale(pipeline: Any) -> float:
    """The classifier-free guidance scale of the current run: the run's own where there is one (on Flux that is
    ``true_cfg_scale``; its ``guidance_scale`` is the distilled embedding), else the classic attribute."""
    run = getattr(pipeline, "current_run", None)
    return run.guidance_scale if run is not None else pipeline.guidance_scale


def _set_cfg_scale(pipeline: Any, value: float) -> None:
    run = getattr(pipeline, "current_run", None)
    if run is not None:
        run.guidance_scale = value
    else:
        pipeline.guidance_scale = value


def _per_run(pipeline: Any, owner: object) -> dict:
    """State a callback keeps for one run: private to the run when the pipeline has runs (stepdiff), so one
    callback object can serve runs in several threads at once; the callback's own dict otherwise."""
    run = getattr(pipeline, "current_run", None)
    return run.scratch(owner) if run is not None else owner.__dict__.setdefault("_state", {})
