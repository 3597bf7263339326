"""Finishing an interrupted run: a few last steps on a re-timed schedule from where the run stopped to t = 0.

``interrupt_output="finish"`` (or ``"finish:N"``) makes an interrupted run go on from its current latents
for a few more steps (3 by default) instead of decoding the x0 estimate of the step it reached. The
steps run on a fresh scheduler set to a short custom schedule:

- the noise levels still ahead of the run (its own schedule from the step reached to its last step,
  then 0) are resampled to ``N`` steps, keeping the first (where the latents are now) and the last
  (noise level 0); with ``N`` or fewer levels left, all of them are used;
- the steps are deterministic Euler steps: a fresh ``EulerDiscreteScheduler`` made from the run's
  scheduler config with ``sigmas=`` (for the variance-preserving schedulers, DDIM, DPM-Solver, UniPC,
  ..., the latents are rescaled once into sigma space, where Euler is exactly DDIM with eta 0), or
  for flow matching (SD3) a fresh ``FlowMatchEulerDiscreteScheduler`` with ``sigmas=`` and ``timesteps=``
  and its shift turned off (the levels are already shifted). Whatever the run's sampler (DDIM
  does not take a custom schedule; ancestral and SDE samplers add noise), the finish adds none.

The timesteps the model sees are the run's own where the levels are the run's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI checks --stop-output before loading anything
    import torch

__all__ = ["DEFAULT_FINISH_STEPS", "INTERRUPT_OUTPUTS", "FinishPlan", "check_finish_steps", "finish_plan",
           "parse_interrupt_output"]

DEFAULT_FINISH_STEPS = 3
INTERRUPT_OUTPUTS = ("denoised", "latents", "finish", "finish:N")
_ALLOWED = "'denoised', 'latents', 'finish' (3 finishing steps) or 'finish:N' (N finishing steps, an int >= 1)"


def parse_interrupt_output(value: object, name: str = "interrupt_output") -> tuple[str, int]:
    """``(policy, finishing steps)`` from an ``interrupt_output`` value; ValueError naming ``name`` otherwise."""
    if isinstance(value, str):
        if value in ("denoised", "latents"):
            return value, DEFAULT_FINISH_STEPS
        if value == "finish":
            return "finish", DEFAULT_FINISH_STEPS
        if value.startswith("finish:"):
            n = value[len("finish:"):]
            if n.isascii() and n.isdigit() and int(n) >= 1:
                return "finish", int(n)
    raise ValueError(f"{name} must be one of {_ALLOWED}, got {value!r}")


def check_finish_steps(value: object, name: str = "finish_steps") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass
class FinishPlan:
    """A fresh scheduler set to the finishing schedule, its timesteps, and the factor that takes the run's
    latents into that scheduler's space (1 unless the run's scheduler is variance-preserving)."""

    scheduler: Any
    timesteps: torch.Tensor
    scale: float
    sigmas: list[float]


def _levels(scheduler: Any, timesteps: torch.Tensor, done: int) -> list[tuple[float | None, float]]:
    """(timestep or None, sigma) of each noise level the run would still pass through, strictly decreasing:
    where the latents are now, then after each remaining step, and last noise level 0 (no timestep)."""
    import torch

    remaining = len(timesteps) - done
    sigmas = getattr(scheduler, "sigmas", None)
    levels: list[tuple[float | None, float]] = []
    if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1:
        index = scheduler.step_index if getattr(scheduler, "step_index", None) is not None else (
            getattr(scheduler, "begin_index", None) or 0)
        for j in range(remaining):  # (clamped: diffusers starts a schedule of repeated timesteps one index late)
            levels.append((float(timesteps[done + j]), float(sigmas[min(index + j, len(sigmas) - 1)])))
        interpol = getattr(scheduler, "sigmas_interpol", None)
        if interpol is not None and getattr(scheduler, "sample", None) is not None:
            # KDPM2 between its two half steps: the latents sit at the interpolated level, whose timestep
            # the finishing scheduler works out from the sigma
            levels[0] = (None, float(interpol[index]))
    else:  # DDIM, DDPM, PNDM, LCM, ...: the level of a timestep from the training schedule
        acp = scheduler.alphas_cumprod
        for j in range(remaining):
            t = float(timesteps[done + j])
            a = max(float(acp[round(t)]), 2.0**-24)  # zero-terminal-SNR schedules end at 0
            levels.append((t, math.sqrt((1.0 - a) / a)))
    deduped: list[tuple[float | None, float]] = []
    for level in [*levels, (None, 0.0)]:  # PNDM repeats a timestep, Heun repeats sigmas: one entry per level
        if not deduped or level[1] < deduped[-1][1]:
            deduped.append(level)
    return deduped


def finish_plan(scheduler: Any, timesteps: torch.Tensor, done: int, steps: int, flow_matching: bool,
                device: torch.device | str | None = None) -> FinishPlan:
    """The finishing schedule for a run whose ``scheduler`` has run ``done`` of its ``timesteps``."""
    import torch
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    levels = _levels(scheduler, timesteps, done)
    last = len(levels) - 1
    if last == 0:  # the latents are already at noise level 0: nothing to finish
        return FinishPlan(None, torch.empty(0), 1.0, [0.0])
    count = min(steps, last)
    picks = sorted({round(i * last / count) for i in range(count + 1)})
    chosen = [levels[i] for i in picks]
    sigmas = [s for _, s in chosen]
    config = scheduler.config
    if flow_matching:
        fresh = FlowMatchEulerDiscreteScheduler.from_config(
            config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
            use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=False,
        )
        train = fresh.config.num_train_timesteps
        fresh.set_timesteps(sigmas=sigmas[:-1], timesteps=[s * train if t is None else t for t, s in chosen[:-1]],
                            device=device)
        return FinishPlan(fresh, fresh.timesteps, 1.0, sigmas)
    fresh = EulerDiscreteScheduler.from_config(
        config, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        final_sigmas_type="zero", timestep_type="discrete", interpolation_type="linear",
    )
    fresh.set_timesteps(sigmas=sigmas, device=device)
    # Where a level is one of the run's own, the model sees the run's own timestep (Euler would work it
    # out again from the sigma, a few 1e-5 away).
    own = [float(fresh.timesteps[i]) if t is None else t for i, (t, _) in enumerate(chosen[:-1])]
    fresh.timesteps = torch.tensor(own, dtype=fresh.timesteps.dtype, device=fresh.timesteps.device)
    variance_preserving = float(getattr(scheduler, "init_noise_sigma", 1.0)) <= 1.0
    scale = math.sqrt(sigmas[0] ** 2 + 1.0) if variance_preserving else 1.0
    return FinishPlan(fresh, fresh.timesteps, scale, sigmas)
