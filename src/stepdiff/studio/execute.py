"""One studio job on one pipeline: prepare the run the job asks for, step it under its steering, finish it into
images with their metadata. The same code runs in the server's worker threads and on a Ray actor (``ray_workers``):
the caller picks the pipeline (``pool``) and says what to do after each step (``on_step``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..control import CancelToken
from .spec import JobSpec
from .steering import GuidancePlan

__all__ = ["SHUTDOWN_REASON", "JobInputs", "JobResult", "execute", "image_names", "make_plan"]

SHUTDOWN_REASON = "server shutdown"


@dataclass
class JobInputs:
    """A job's pictures, read from its uploads (RGB init and control, L mask)."""

    init: Any = None
    mask: Any = None
    control: Any = None
    ip_image: Any = None  # RGB: the IP-Adapter's image


@dataclass
class JobResult:
    steps_completed: int
    record: dict[str, Any]
    images: list[Any] = field(default_factory=list)  # PIL images; none when stopped before the first step
    metadata: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (parameters, record) per image


def image_names(job_id: str, count: int) -> list[str]:
    """``ID.png`` for the first image, ``ID-2.png`` ... for the others."""
    return [f"{job_id}.png"] + [f"{job_id}-{k}.png" for k in range(2, count + 1)]


def make_plan(spec: JobSpec, policies: list[Any]) -> GuidancePlan:
    return GuidancePlan(spec.guidance, spec.run_steps, spec.cfg_cutoff, spec.guidance_interval, policies=policies,
                        control_scale=spec.control_scale if spec.control is not None else None,
                        ip_adapter_scale=spec.ip_adapter_scale if spec.ip_adapter_image is not None else None)


def run_arguments(spec: JobSpec, inputs: JobInputs) -> dict[str, Any]:
    """The pipeline call's arguments for the job's kind, as ``stepdiff generate`` passes them."""
    kind = spec.kind
    extra: dict[str, Any] = {}
    if kind != "text2image":
        extra = {"image": inputs.init, "strength": spec.strength}
    if kind == "inpaint":
        extra["mask_image"] = inputs.mask
    if kind != "image2image":  # image to image takes the picture's size
        extra.update(width=spec.width, height=spec.height)
    if inputs.control is not None:
        extra["control_image" if kind == "image2image" else "image"] = inputs.control
        if kind == "image2image":
            extra["image"] = inputs.init
        extra.update(controlnet_conditioning_scale=spec.control_scale, control_guidance_end=spec.control_end)
    if inputs.ip_image is not None:  # its scale is the run's, set by the plan before the first step
        extra["ip_adapter_image"] = inputs.ip_image
    return extra


def execute(pipe: Any, spec: JobSpec, inputs: JobInputs, token: CancelToken, plan: GuidancePlan, policies: list[Any],
            *, job_id: str, model: str | Path, on_start: Callable[[Any], None] | None = None,
            on_step: Callable[[Any, Any], None] | None = None,
            steering: Callable[[], list[dict[str, Any]]] = list) -> JobResult:
    """Run the job on ``pipe`` (a view of its kind, ``pool.PipelinePool.view``): ``on_start(run)`` once prepared,
    ``on_step(run, state)`` after each step (the plan has set the next step's values by then). A cancelled job
    finishes its picture in up to 3 more steps; one stopped by a server shutdown (``token.reason``) or before its
    first step keeps the x0 estimate of the step reached."""
    with plan.lock:
        first = plan.scale_at(0)
    generators = [torch.Generator().manual_seed(spec.seed + i) for i in range(spec.num_images)]
    run = pipe.steps(
        prompt=spec.prompt, negative_prompt=spec.negative_prompt, num_inference_steps=spec.steps,
        guidance_scale=first, num_images_per_prompt=spec.num_images,
        generator=generators[0] if spec.num_images == 1 else generators, cancel=token,
        callback_on_step_end=policies or None, interrupt_output="finish", **run_arguments(spec, inputs),
    )
    with plan.lock:
        plan.total = run.num_timesteps
        plan.apply(run, 0)
    if on_start is not None:
        on_start(run)
    total = run.num_timesteps
    for state in run:
        with plan.lock:
            if state.step_index + 1 < total:
                plan.apply(run, state.step_index + 1)
        if on_step is not None:
            on_step(run, state)
    if token.cancelled and (token.reason == SHUTDOWN_REASON or run.state.steps_completed == 0):
        run.interrupt_output = "denoised"
    out = run.finish()
    record = out.record.to_dict()
    if out.steps_completed == 0:
        return JobResult(0, record)
    images, metadata = _finished_images(spec, inputs, run, out, policies, job_id, model, steering())
    return JobResult(out.steps_completed, record, images, metadata)


def _finished_images(spec: JobSpec, inputs: JobInputs, run: Any, out: Any, policies: list[Any], job_id: str,
                     model: str | Path, steering: list[dict[str, Any]]) -> tuple[list[Any], list[tuple[str, dict]]]:
    """The run's images (an inpainting job's unmasked pixels pasted back, as ``--keep-unmasked``) and each one's
    metadata: that of ``stepdiff generate``, plus the job id and its steering."""
    from ..caching import describe
    from ..metadata import ImageSettings, image_metadata

    images = list(out.images)
    keep = feather = None
    if spec.kind == "inpaint":
        from ..images import KEEP_UNMASKED_FEATHER, keep_unmasked

        keep, feather = True, KEEP_UNMASKED_FEATHER
        images = keep_unmasked(inputs.init, images, inputs.mask, feather=feather)
    extra: dict[str, Any] = {"job_id": job_id, "guidance_interval": spec.to_dict()["guidance_interval"],
                             "steering": steering}
    if spec.control is not None:
        extra.update(control=spec.control, control_scale=spec.control_scale, control_end=spec.control_end)
    if spec.ip_adapter_image is not None:
        extra.update(ip_adapter_image=spec.ip_adapter_image, ip_adapter_scale=spec.ip_adapter_scale)
    if spec.loras:
        extra["loras"] = spec.loras
    metadata = []
    for i, image in enumerate(images):
        settings = ImageSettings(
            prompt=spec.prompt, negative_prompt=spec.negative_prompt, seed=spec.seed + i, steps=spec.steps,
            guidance_scale=spec.guidance, model=str(model), cfg_cutoff_ratio=spec.cfg_cutoff,
            cache=describe(policies) or None, strength=spec.strength, init_image=spec.init_image, mask=spec.mask,
            keep_unmasked=keep, keep_unmasked_feather=feather,
        )
        metadata.append(image_metadata(settings, image, run.scheduler, out, extra))
    return images, metadata
