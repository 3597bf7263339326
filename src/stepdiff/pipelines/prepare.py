"""``prepare``: one call's arguments checked and its run started, asking the family, the features and the kind in
the order ``pipelines/parts.py`` documents (1. checks, 2. the run and its timesteps, 3. encode, 4. latents)."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from ..loop import LoopState, scheduler_step_kwargs
from .callback_io import run_hooks
from .checks import CallPlan, check_call, check_components, check_embedding_widths, check_scheduler
from .conditioning import text_lora_scale
from .run import CallInputs, Run

__all__ = ["prepare_run"]


def prepare_run(pipe: Any, args: dict[str, Any], scheduler: Any = None) -> Run:
    """``pipe.prepare(args)``: check everything, set the timesteps, encode, make the initial latents."""
    started = time.perf_counter()
    args = dict(args)
    # 1. Check every argument before any model work.
    check_scheduler(scheduler)
    check_components(pipe, args)
    call = CallInputs()
    pipe.check_family_inputs(args, call)
    for part in pipe.parts():
        part.check_inputs(pipe, args, call)
    for part in pipe.features:
        part.check_with_kind(pipe, args, call)
    batch_size, encode_kwargs = pipe.check_prompts(args)
    for part in pipe.parts():
        part.check_batch(pipe, call, batch_size)
    check_embedding_widths(pipe, encode_kwargs)
    plan = check_call(pipe, args, call, batch_size)
    for part in pipe.parts():
        part.check_rows(pipe, call, plan.rows, batch_size, plan.num_images_per_prompt)

    # 2. The run, with its own scheduler and guidance; timesteps; then callbacks check their settings
    # against this run (schedule lengths, tables) and may set the first step's guidance.
    run = _new_run(pipe, args, plan, call, scheduler, started)
    call.device = pipe._execution_device
    try:
        run.timesteps = pipe.set_timesteps(run, plan.num_inference_steps, plan.timesteps, plan.sigmas, call)
        if len(run.timesteps) == 0:
            raise ValueError("this call has no denoising step to run (check strength / denoising_start)")
        for part in pipe.parts():
            part.start(pipe, run, call)
        run.guidance.start(len(run.timesteps))
        with run.bound():
            run_hooks(run.callback, "on_run_start", pipe)
        _start_state(pipe, run, call, plan, encode_kwargs)
    except BaseException:
        run.compute.free()  # a refused or failed start leaves no block of the model wrapped
        raise
    return run

def _new_run(pipe: Any, args: dict[str, Any], plan: CallPlan, call: CallInputs, scheduler: Any, started: float) -> Run:
    scheduler = copy.deepcopy(pipe.scheduler if scheduler is None else scheduler)
    return Run(
        pipe, scheduler=scheduler, timesteps=torch.empty(0),
        guidance=pipe.make_guidance(plan.guidance_scale, plan.guidance_rescale, call),
        cancel=plan.cancel, callback=plan.callback, tensor_names=plan.tensor_names, output_type=plan.output_type,
        return_dict=args.pop("return_dict", True), interrupt_output=plan.interrupt_output,
        step_kwargs=scheduler_step_kwargs(scheduler, plan.generator, plan.eta), model_kwargs=pipe.model_kwargs(args),
        started=started,
    )

def _start_state(pipe: Any, run: Run, call: CallInputs, plan: CallPlan, encode_kwargs: dict[str, Any]) -> None:
    device = call.device
    # 3. Encode prompts: conditional and unconditional rows, kept apart.
    with text_lora_scale(pipe, run.model_kwargs):
        conditioning = pipe.encode(
            device=device, num_images_per_prompt=plan.num_images_per_prompt, height=call.height, width=call.width,
            **encode_kwargs,
        )
    dtype = next(iter(conditioning.cond.values())).dtype
    # 4. Initial latents (noise, or the image's latents noised to the first timestep); per-row conditioning.
    latents = pipe.kind.initial_latents(
        pipe, run, plan.rows, call.height, call.width, dtype, device, plan.generator, plan.latents, call
    )
    run.state = LoopState(
        latents=latents, cond=conditioning.cond, uncond=conditioning.uncond, guidance_scale=run.guidance.scale,
    )
    pipe.add_model_conditioning(run, dtype, device)
    for part in pipe.parts():
        part.add_conditioning(pipe, run, call, dtype, device, plan.generator)

