"""What a pipeline call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers.utils import BaseOutput

__all__ = ["RunRecord", "StepDiffPipelineOutput"]


@dataclass
class RunRecord:
    """What the run did: steps, model calls and batch rows actually computed, interrupt, wall time."""

    steps_total: int
    steps_completed: int
    interrupted: bool
    stop_reason: str  # "completed", or why the run stopped early
    model_calls: int
    model_rows: int
    rows_per_step: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    guidance: str = "cfg"  # "cfg", or "distilled" (guidance-distilled denoisers: no unconditional rows to cut)
    cached_calls: int = 0  # model calls in which a compute policy reused cached work (stepdiff.caching)
    blocks_computed: int = 0  # the cached blocks or layers that ran, summed over model calls
    blocks_skipped: int = 0  # ... and those that returned cached work instead
    # What an interrupted run returned (None for a completed run): "denoised" (the x0 estimate of the step
    # reached), "latents" (its noisy latents) or "finish" (finishing steps down to t = 0, see stepdiff.finishing).
    stop_output: str | None = None
    finish_steps: int = 0  # the finishing steps that ran ...
    finish_model_calls: int = 0  # ... their model calls (not in model_calls, which counts the run's own)
    finish_model_rows: int = 0  # ... and their batch rows (not in model_rows)

    @property
    def full_model_calls(self) -> int:
        """Model calls that ran the whole denoiser."""
        return self.model_calls - self.cached_calls

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps_total": self.steps_total,
            "steps_completed": self.steps_completed,
            "interrupted": self.interrupted,
            "stop_reason": self.stop_reason,
            "model_calls": self.model_calls,
            "model_rows": self.model_rows,
            "rows_per_step": list(self.rows_per_step),
            "wall_seconds": round(self.wall_seconds, 4),
            "guidance": self.guidance,
            "cached_calls": self.cached_calls,
            "blocks_computed": self.blocks_computed,
            "blocks_skipped": self.blocks_skipped,
            "stop_output": self.stop_output,
            "finish_steps": self.finish_steps,
            "finish_model_calls": self.finish_model_calls,
            "finish_model_rows": self.finish_model_rows,
        }


@dataclass
class StepDiffPipelineOutput(BaseOutput):
    """``images`` as asked by ``output_type``; ``output[0]`` is the images, as in the classic library."""

    images: Any
    interrupted: bool = False
    steps_completed: int = 0
    stop_reason: str = "completed"
    record: RunRecord | None = None
