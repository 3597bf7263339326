"""THE denoising loop, written once for every model family.

Per step: guidance decision -> model call (cond rows, plus uncond rows only when guidance is on)
-> guidance -> scheduler step -> x0 estimate ("denoised") -> yield. The loop is a generator: the
caller (the pipeline's ``__call__``) runs callbacks between steps and may replace ``latents`` and
the conditioning on the yielded state; the loop reads them back when it resumes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

__all__ = ["LoopState", "ModelFn", "denoise", "estimate_x0", "scheduler_step_kwargs"]

# model(latent_input, timestep, conditioning) -> model output, same rows as latent_input
ModelFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class LoopState:
    """What the loop carries between steps. Callbacks may replace latents and conditioning."""

    latents: torch.Tensor  # (B, C, h, w) B = prompts x images per prompt
    cond: dict[str, torch.Tensor]  # conditional rows, (B, ...) each
    uncond: dict[str, torch.Tensor]  # unconditional rows, kept even while guidance is off
    guidance_scale: float
    guidance_rescale: float = 0.0
    step_index: int = -1
    timestep: torch.Tensor | None = None
    denoised: torch.Tensor | None = None  # x0 estimate after the last step
    steps_completed: int = 0
    model_calls: int = 0
    model_rows: int = 0  # batch rows actually computed, summed over model calls
    rows_per_step: list[int] = field(default_factory=list)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0


def scheduler_step_kwargs(scheduler, generator, eta: float) -> dict:
    """eta and generator, for the schedulers whose ``step`` takes them (DDIM, ancestral samplers)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _is_flow_matching(scheduler) -> bool:
    return "prediction_type" not in scheduler.config and hasattr(scheduler, "sigmas") and "shift" in scheduler.config


def estimate_x0(
    scheduler, step_index: int, timestep: torch.Tensor, model_input: torch.Tensor, model_output: torch.Tensor
) -> torch.Tensor:
    """x0 from the (guided) model output, in the space of the latents the scheduler holds.

    ``model_input`` is the scaled input the model saw (``scheduler.scale_model_input``), which is
    variance-preserving for every discrete scheduler: x_in = alpha * x0 + s * eps. Sigma-space
    schedulers keep latents = x_in / alpha = x0 + sigma * eps; the x0 is the same either way.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if _is_flow_matching(scheduler):  # rectified flow: x_t = (1 - sigma) x0 + sigma noise, v = noise - x0
        sigma = sigmas[step_index].to(model_input.device, model_input.dtype)
        return model_input - sigma * model_output
    if sigmas is not None and len(sigmas) > step_index:
        sigma = float(sigmas[step_index])
        alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
        s = sigma * alpha
    else:
        acp = float(scheduler.alphas_cumprod[int(timestep)])
        alpha, s = math.sqrt(acp), math.sqrt(1.0 - acp)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type == "epsilon":
        return (model_input - s * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * model_input - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r} in scheduler config")


def denoise(
    state: LoopState,
    timesteps: torch.Tensor,
    scheduler,
    model: ModelFn,
    step_kwargs: dict,
    should_stop: Callable[[], bool],
    guidance_scale: Callable[[], float],
    inference_mode: bool = False,
) -> Iterator[LoopState]:
    """Run the steps; yield the state after each scheduler step.

    ``guidance_scale`` and ``should_stop`` are read before every model call, so a callback or another
    thread can change guidance or stop the run between any two steps.

    ``inference_mode``: run each model call under ``torch.inference_mode`` (no version counters or
    view tracking inside the model, about 3% faster per UNet call on CPU). Its raw output never leaves
    this function: guidance, or a copy when unguided, turns it into an ordinary tensor before the
    scheduler, callbacks or the caller see it.
    """
    # [uncond; cond] conditioning, built once; kept with the tensors it was built from (references, so
    # their identity stays meaningful) and rebuilt only when a callback has replaced one of them.
    batched: tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]] | None = None
    for i, t in enumerate(timesteps):
        if should_stop():
            return
        state.guidance_scale = g = guidance_scale()
        # Flow-matching schedulers have no input scaling.
        x_in = scheduler.scale_model_input(state.latents, t) if hasattr(scheduler, "scale_model_input") else state.latents
        if g > 1.0:  # guidance decided before the model call: uncond rows only when they are used
            model_in = torch.cat([x_in, x_in])
            sources = tuple(v for k in state.cond for v in (state.uncond[k], state.cond[k]))
            if batched is None or len(batched[0]) != len(sources) or any(a is not b for a, b in zip(batched[0], sources)):
                batched = (sources, {k: torch.cat([state.uncond[k], state.cond[k]]) for k in state.cond})
            conditioning = batched[1]
        else:
            model_in, conditioning = x_in, state.cond
        with torch.inference_mode(inference_mode):
            output = model(model_in, t, conditioning)
        state.model_calls += 1
        state.model_rows += model_in.shape[0]
        state.rows_per_step.append(model_in.shape[0])
        if g > 1.0:
            out_uncond, out_cond = output.chunk(2)
            output = out_uncond + g * (out_cond - out_uncond)
            if state.guidance_rescale > 0.0:  # Lin et al. 2023, "Common Diffusion Noise Schedules..."
                output = rescale_noise_cfg(output, out_cond, guidance_rescale=state.guidance_rescale)
        elif output.is_inference():
            output = output.clone()  # schedulers may return it as the x0 estimate, which callbacks may edit
        step = scheduler.step(output, t, state.latents, **step_kwargs, return_dict=True)
        reported = getattr(step, "pred_original_sample", None)
        state.denoised = reported if reported is not None else estimate_x0(scheduler, i, t, x_in, output)
        state.latents = step.prev_sample
        state.step_index, state.timestep = i, t
        state.steps_completed = i + 1
        yield state
