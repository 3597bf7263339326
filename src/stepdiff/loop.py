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

from .guidance import Guidance

__all__ = ["LoopState", "ModelFn", "denoise", "estimate_x0", "scheduler_step_kwargs"]

# model(latent_input, timestep, conditioning) -> model output, same rows as latent_input
ModelFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class LoopState:
    """What the loop carries between steps. Callbacks may replace latents and conditioning."""

    latents: torch.Tensor  # (B, C, h, w) B = prompts x images per prompt
    cond: dict[str, torch.Tensor]  # conditional rows, (B, ...) each
    uncond: dict[str, torch.Tensor]  # unconditional rows, kept even while guidance is off
    guidance_scale: float  # the scale of the last step (the run's guidance object owns the current one)
    step_index: int = -1
    timestep: torch.Tensor | None = None
    denoised: torch.Tensor | None = None  # x0 estimate after the last step
    steps_completed: int = 0
    model_calls: int = 0
    model_rows: int = 0  # batch rows actually computed, summed over model calls
    rows_per_step: list[int] = field(default_factory=list)
    sides: tuple[str, ...] = ()  # the conditioning sides of the model call in progress; () for an extra pass

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


def estimate_x0(
    scheduler, step_index: int, timestep: torch.Tensor, model_input: torch.Tensor, model_output: torch.Tensor,
    flow_matching: bool = False,
) -> torch.Tensor:
    """x0 from the (guided) model output, in the space of the latents the scheduler holds.

    ``model_input`` is the scaled input the model saw (``scheduler.scale_model_input``), which is
    variance-preserving for every discrete scheduler: x_in = alpha * x0 + s * eps. Sigma-space
    schedulers keep latents = x_in / alpha = x0 + sigma * eps; the x0 is the same either way.
    ``flow_matching`` is declared by the model family (SD3), not guessed from the scheduler.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if flow_matching:  # rectified flow: x_t = (1 - sigma) x0 + sigma noise, v = noise - x0
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


def _non_finite(step: int, what: str, tensor: torch.Tensor, guidance: Guidance) -> str:
    bad = int((~torch.isfinite(tensor)).sum())
    causes = []
    if guidance.scale > 30:
        causes.append(f"guidance_scale {guidance.scale:g} is far above the usual 1-20")
    if tensor.dtype in (torch.float16, torch.bfloat16):
        causes.append(f"{tensor.dtype} overflow (try torch_dtype=torch.float32)")
    if what == "the model output" and not causes:
        causes.append("broken model weights (NaN or inf in the checkpoint)")
    causes = causes or ["the scheduler or a callback produced them"]
    return (f"{what} became NaN or inf at step {step} ({bad} of {tensor.numel()} values); likely cause: "
            f"{'; '.join(causes)}. Nothing was decoded. (pipe.check_finite = False turns this check off)")


def denoise(
    state: LoopState,
    timesteps: torch.Tensor,
    scheduler,
    model: ModelFn,
    step_kwargs: dict,
    should_stop: Callable[[], bool],
    guidance: Guidance,
    inference_mode: bool = False,
    flow_matching: bool = False,
    after_step: Callable[[LoopState], None] | None = None,
    check_finite: bool = True,
) -> Iterator[LoopState]:
    """Run the steps; yield the state after each scheduler step.

    ``guidance`` is asked before every model call which conditioning sides to run (its scale may have
    been changed by a callback or another thread since the last step) and after it how to combine
    the outputs. ``should_stop`` is read before every model call.

    ``inference_mode``: run each model call under ``torch.inference_mode`` (no version counters or
    view tracking inside the model, about 3% faster per UNet call on CPU). Its raw output never leaves
    this function: guidance, or a copy when unguided, turns it into an ordinary tensor before the
    scheduler, callbacks or the caller see it.

    ``after_step(state)``: a kind of run's own work after each scheduler step (inpainting puts the
    known region back), before the state is yielded.

    ``check_finite``: stop with ``FloatingPointError`` naming the step and the likely cause as soon as
    the model output or the latents hold NaN or inf, instead of decoding a black image. One reduction
    over the latents per step (see benchmarks/bench_runs.py --only finite for its cost).
    """
    # Batched conditioning per set of sides, built once; kept with the tensors it was built from
    # (references, so their identity stays meaningful) and rebuilt only when a callback replaced one.
    batched: dict[tuple[str, ...], tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]] = {}
    for i, t in enumerate(timesteps):
        if should_stop():
            return
        with torch.no_grad():  # as the classic pipelines' whole __call__; left before the yield (callbacks, caller)
            _step(state, scheduler, model, step_kwargs, guidance, i, t, batched, inference_mode, flow_matching,
                  check_finite)
            if after_step is not None:
                after_step(state)
        yield state


def _step(
    state: LoopState, scheduler, model: ModelFn, step_kwargs: dict, guidance: Guidance, i: int, t: torch.Tensor,
    batched: dict, inference_mode: bool, flow_matching: bool, check_finite: bool,
) -> None:
    """One step: the model call(s) over the sides guidance asks for, then the scheduler step."""
    sides = guidance.batches()  # decided before the model call: uncond rows only when they are used
    state.guidance_scale = guidance.scale
    # Flow-matching schedulers have no input scaling.
    x_in = scheduler.scale_model_input(state.latents, t) if hasattr(scheduler, "scale_model_input") else state.latents
    output, rows = _guided_output(state, model, guidance, i, t, x_in, sides, batched, inference_mode)
    state.model_rows += rows
    state.rows_per_step.append(rows)
    if output.is_inference():
        output = output.clone()  # schedulers may return it as the x0 estimate, which callbacks may edit
    _scheduler_step(state, scheduler, output, i, t, x_in, step_kwargs, guidance, check_finite, flow_matching)


def _conditioning(
    state: LoopState, sides: tuple[str, ...], x_in: torch.Tensor,
    batched: dict[tuple[str, ...], tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model call's input and conditioning: one side as it is, several batched (``batched`` caches them)."""
    if len(sides) == 1:
        return x_in, getattr(state, sides[0])
    model_in = torch.cat([x_in] * len(sides))
    parts = [getattr(state, side) for side in sides]
    sources = tuple(part[k] for k in state.cond for part in parts)
    cached = batched.get(sides)
    if cached is None or len(cached[0]) != len(sources) or any(a is not b for a, b in zip(cached[0], sources)):
        cached = batched[sides] = (sources, {k: torch.cat([part[k] for part in parts]) for k in state.cond})
    return model_in, cached[1]


def _guided_output(
    state: LoopState, model: ModelFn, guidance: Guidance, i: int, t: torch.Tensor, x_in: torch.Tensor,
    sides: tuple[str, ...], batched: dict, inference_mode: bool,
) -> tuple[torch.Tensor, int]:
    """One step's model call over ``sides`` and the guided output, with the rows computed (a guidance's further
    passes included)."""
    model_in, conditioning = _conditioning(state, sides, x_in, batched)
    state.sides = sides
    with torch.inference_mode(inference_mode):
        output = model(model_in, t, conditioning)
    rows = model_in.shape[0]

    def extra_call(side: str, x_in=x_in, t=t, **model_kwargs) -> torch.Tensor:  # a guidance's further pass
        nonlocal rows
        state.sides = ()
        with torch.inference_mode(inference_mode):
            out = model(x_in, t, {**getattr(state, side), **model_kwargs})
        state.model_calls += 1
        rows += x_in.shape[0]
        return out

    state.model_calls += 1
    outputs = dict(zip(sides, output.chunk(len(sides))))
    output = guidance.refine(i, guidance.combine(outputs), outputs, extra_call)
    return output, rows


def _scheduler_step(
    state: LoopState, scheduler, output: torch.Tensor, i: int, t: torch.Tensor, x_in: torch.Tensor, step_kwargs: dict,
    guidance: Guidance, check_finite: bool, flow_matching: bool,
) -> None:
    """The scheduler step from the guided ``output``: the state's new latents and x0 estimate."""
    if check_finite and not bool(torch.isfinite(output).all()):
        raise FloatingPointError(_non_finite(i, "the model output", output, guidance))
    step = scheduler.step(output, t, state.latents, **step_kwargs, return_dict=True)
    if check_finite and not bool(torch.isfinite(step.prev_sample).all()):
        raise FloatingPointError(_non_finite(i, "the latents", step.prev_sample, guidance))
    reported = getattr(step, "pred_original_sample", None)
    state.denoised = (
        reported if reported is not None else estimate_x0(scheduler, i, t, x_in, output, flow_matching=flow_matching)
    )
    state.latents = step.prev_sample
    state.step_index, state.timestep = i, t
    state.steps_completed = i + 1
