"""The end of a call: decode (for an interrupted run: what ``interrupt_output`` says), build the ``RunRecord``, leave the
classic attributes readable after the call, return the output."""

from __future__ import annotations

import time
from typing import Any

from ..output import RunRecord, StepDiffPipelineOutput
from .run import Run, remembered

__all__ = ["finish_run"]


def finish_run(pipe: Any, run: Run) -> Any:
    """Decode (for an interrupted run: what ``interrupt_output`` says), build the record, return the output."""
    state = run.state
    interrupted = run.interrupted
    stop_reason = run.stop_reason
    finished = run.finished
    final, stop_output = state.latents, None
    if finished is not None:  # interrupt_output="finish": the finishing steps' latents, as a completed run's
        final, stop_output = finished.latents, "finish"
    elif interrupted:
        stop_output = "latents"
        if run.output_type != "latent" and run.interrupt_output == "denoised" and state.denoised is not None:
            final, stop_output = pipe.denoised_for_output(run, state.denoised), "denoised"
    if run.output_type == "latent":
        images: Any = final
    else:
        images = pipe.image_processor.postprocess(pipe.decode_latents(final), output_type=run.output_type)
    pipe.maybe_free_model_hooks()
    record = RunRecord(
        steps_total=run.num_timesteps, steps_completed=state.steps_completed, interrupted=interrupted,
        stop_reason=stop_reason, model_calls=state.model_calls, model_rows=state.model_rows,
        rows_per_step=list(state.rows_per_step), wall_seconds=time.perf_counter() - run.started,
        guidance=run.guidance.mode, cached_calls=run.compute.cached_calls,
        blocks_computed=run.compute.blocks_computed, blocks_skipped=run.compute.blocks_skipped,
        stop_output=stop_output, finish_steps=0 if finished is None else finished.steps_completed,
        finish_model_calls=0 if finished is None else finished.model_calls,
        finish_model_rows=0 if finished is None else finished.model_rows,
    )
    remembered(pipe).update(
        guidance_scale=run.guidance.scale, guidance_rescale=run.guidance_rescale, num_timesteps=run.num_timesteps,
        timesteps=run.timesteps, interrupt=run.interrupt, do_classifier_free_guidance=run.do_classifier_free_guidance,
    )
    if not run.return_dict:
        return (images,)
    return StepDiffPipelineOutput(
        images=images, interrupted=interrupted, steps_completed=state.steps_completed, stop_reason=stop_reason,
        record=record,
    )
