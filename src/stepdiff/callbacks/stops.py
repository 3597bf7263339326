"""Callbacks that end a run early (the image is the last x0 estimate, clean) or fail it fast: at a step, on
convergence, on a timeout, on NaN latents."""

from __future__ import annotations

import math
import numbers
import time
from typing import Any

import torch

from .base import PipelineCallback, _per_run

__all__ = ["NaNGuard", "StopAtStep", "StopOnConvergence", "Timeout"]


class StopAtStep(PipelineCallback):
    """Stop after the cutoff step (``cutoff_step_index`` or ``cutoff_step_ratio``); the image is clean."""

    tensor_inputs: list[str] = []  # noqa: RUF012

    def callback_fn(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        if step_index >= self.cutoff_step(pipeline):
            pipeline.stop(f"stopped at step {step_index}")
        return callback_kwargs


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class StopOnConvergence:
    """Stop once the x0 estimate has changed less than ``tolerance`` for ``patience`` steps in a row.

    The change of a step is the RMS difference between consecutive x0 estimates divided by the RMS
    of the previous one, taken as the largest over the batch, so every image must have settled.

    The defaults (0.05, 3) are the measured setting: on the shipped model with Euler they save 27% of
    25 steps for 0.9 points of adherence. Use a deterministic ODE sampler such as Euler; DDIM's x0
    estimate keeps drifting a few percent per step until the end, so stopping on it costs adherence.
    """

    tensor_inputs: list[str] = ["denoised"]  # noqa: RUF012

    def __init__(self, tolerance: float = 0.05, patience: int = 3, min_steps: int = 0) -> None:
        self.tolerance = _positive("tolerance", tolerance)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
            raise ValueError(f"min_steps must be an int >= 0, got {min_steps!r}")
        self.patience, self.min_steps = patience, min_steps
        self.changes: list[float] = []  # the changes of the latest run that started

    def on_run_start(self, pipeline: Any) -> None:
        state = _per_run(pipeline, self)
        state.update(changes=[], previous=None, calm=0)
        self.changes = state["changes"]

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        state = _per_run(pipeline, self)
        if "changes" not in state:
            self.on_run_start(pipeline)
        x0 = callback_kwargs["denoised"].float()
        previous = state["previous"]
        if previous is not None:
            dims = tuple(range(1, x0.ndim))
            diff = (x0 - previous).pow(2).mean(dims).sqrt()
            scale = previous.pow(2).mean(dims).sqrt().clamp_min(1e-8)
            change = float((diff / scale).max())
            state["changes"].append(change)
            state["calm"] = state["calm"] + 1 if change < self.tolerance else 0
            if state["calm"] >= self.patience and step_index + 1 >= self.min_steps:
                pipeline.stop(f"converged: x0 changed < {self.tolerance:g} for {self.patience} steps")
        state["previous"] = x0
        return None


class Timeout:
    """Stop once ``seconds`` have passed since the run started; the image is the last x0 estimate."""

    tensor_inputs: list[str] = []  # noqa: RUF012

    def __init__(self, seconds: float) -> None:
        self.seconds = _positive("seconds", seconds)

    def on_run_start(self, pipeline: Any) -> None:
        _per_run(pipeline, self)["started"] = time.monotonic()

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        started = _per_run(pipeline, self).setdefault("started", time.monotonic())
        if time.monotonic() - started >= self.seconds:
            pipeline.stop(f"timeout after {self.seconds:g} s")
        return None


class NaNGuard:
    """Fail fast, naming the step, when the latents become NaN or infinite."""

    tensor_inputs: list[str] = ["latents"]  # noqa: RUF012

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        latents = callback_kwargs["latents"]
        if not torch.isfinite(latents).all():
            bad = int((~torch.isfinite(latents)).sum())
            raise FloatingPointError(
                f"latents became NaN or inf at step {step_index} ({bad} of {latents.numel()} values); "
                "try float32, a lower guidance scale, or another scheduler"
            )
        return None
