"""Official step callbacks: ``callback(pipeline, step_index, timestep, callback_kwargs) -> dict``.

Same class names and constructor contract as the classic library (``diffusers.callbacks``), with
its defects fixed: CFG cutoff works for every batch size (the loop keeps conditional and
unconditional rows apart, so nothing is sliced), and a callback may return ``None`` for "no change".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import callbacks as _classic

__all__ = [
    "CFGCutoffCallback",
    "MultiPipelineCallbacks",
    "PipelineCallback",
    "SD3CFGCutoffCallback",
    "SDCFGCutoffCallback",
    "SDXLCFGCutoffCallback",
    "StepCallback",
]

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
        if self.config.cutoff_step_index is not None:
            return self.config.cutoff_step_index
        return int(pipeline.num_timesteps * self.config.cutoff_step_ratio)

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


class CFGCutoffCallback(PipelineCallback):
    """Switch classifier-free guidance off after the cutoff step, on every stepdiff pipeline.

    After the cutoff the model computes only the conditional rows; the unconditional conditioning is
    kept, so a later callback can turn guidance back on. Works for any batch size.
    """

    tensor_inputs: list[str] = []  # noqa: RUF012

    def callback_fn(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        if step_index == self.cutoff_step(pipeline):
            pipeline.guidance_scale = 0.0
        return callback_kwargs


class SDCFGCutoffCallback(CFGCutoffCallback):
    """CFG cutoff for Stable Diffusion 1.x/2.x (the classic name; same behaviour as CFGCutoffCallback)."""

    tensor_inputs = ["prompt_embeds"]  # noqa: RUF012


class SDXLCFGCutoffCallback(CFGCutoffCallback):
    """CFG cutoff for Stable Diffusion XL (the classic name; same behaviour as CFGCutoffCallback)."""

    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]  # noqa: RUF012


class SD3CFGCutoffCallback(CFGCutoffCallback):
    """CFG cutoff for Stable Diffusion 3 (the classic name; same behaviour as CFGCutoffCallback)."""

    tensor_inputs = ["prompt_embeds", "pooled_prompt_embeds"]  # noqa: RUF012


_CLASSIC_EQUIVALENTS: dict[type, type[CFGCutoffCallback]] = {
    _classic.SDCFGCutoffCallback: SDCFGCutoffCallback,
    _classic.SDXLCFGCutoffCallback: SDXLCFGCutoffCallback,
    _classic.SD3CFGCutoffCallback: SD3CFGCutoffCallback,
}


def adapt_classic(callback: Any) -> Any:
    """Swap the classic library's CFG-cutoff objects for their batch-safe stepdiff twins.

    The classic ones slice ``prompt_embeds[-1:]``, which drops prompts when the batch is larger than
    one; here the loop stops computing the unconditional rows itself, so no slicing is needed.
    Their config (cutoff ratio or index) and ``tensor_inputs`` carry over unchanged.
    """
    for classic_type, ours in _CLASSIC_EQUIVALENTS.items():
        if type(callback) is classic_type:
            cfg = callback.config
            return ours(cutoff_step_ratio=cfg.cutoff_step_ratio, cutoff_step_index=cfg.cutoff_step_index)
    if type(callback) is _classic.MultiPipelineCallbacks:
        return MultiPipelineCallbacks([adapt_classic(cb) for cb in callback.callbacks])
    return callback
