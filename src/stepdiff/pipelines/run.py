"""A run: everything one pipeline call owns, from prepare to finish.

``pipeline.prepare(...)`` (or ``pipeline.steps(...)``) checks the arguments, sets the timesteps on
the run's own scheduler copy, encodes the prompts and makes the initial latents, and returns a
``Run``. Iterating the run executes the denoising loop one step at a time (callbacks between steps)
and yields the loop state after each step; ``run.finish()`` decodes and returns the output.
``pipeline(...)`` is exactly ``prepare`` + iterate + ``finish``.

A run's state (guidance scale, stop flag, cancel token, timesteps, counters, scheduler) never lives
on the pipeline, so one pipeline object can serve several threads at once. The classic spellings
used inside callbacks (``pipeline._interrupt = True``, ``pipeline._guidance_scale``,
``pipeline.num_timesteps``) reach the run that is calling the callback, through a per-thread
binding set only while that run's callbacks execute.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..caching import RunCompute
from ..control import CancelToken
from ..finishing import check_finish_steps, finish_plan, parse_interrupt_output
from ..guidance import ClassifierFreeGuidance, Guidance, check_guidance_scale
from ..loop import LoopState, denoise

__all__ = ["CallInputs", "Run", "RunExtras", "StepState", "current_run", "remembered"]

StepState = LoopState  # what a run yields after each step


@dataclass(slots=True)  # a field missing here is an AttributeError, not a silent new key
class CallInputs:
    """What a call's family, kind and features add to its arguments, checked (their ``check_inputs``) and filled in as
    the run is prepared: one typed field each (None: not this call's)."""

    device: Any = None  # where the run's models run: the pipeline's execution device, looked up once (it walks
    # every module of every component: 6 ms a lookup for a tiny SDXL)
    height: int | None = None  # the call's size, once known (image to image: the picture's)
    width: int | None = None
    image_arg: Any = None  # image to image / inpainting: ``image`` as given
    image: Any = None  # ... preprocessed (a (B, 3, H, W) tensor in [-1, 1], or latents given directly)
    strength: float | None = None
    denoising_start: float | None = None  # SDXL: a refiner run starts here (no new noise: ``add_noise`` False)
    denoising_end: float | None = None  # SDXL: a base run ends here
    add_noise: bool = True
    mask_arg: Any = None  # inpainting: ``mask_image`` as given
    mask: torch.Tensor | None = None  # ... preprocessed
    masked_image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None  # inpainting: the noise the known region is re-noised with
    image_latents: torch.Tensor | None = None  # inpainting: the known image's latents
    control: Any = None  # ControlState
    control_images: list[Any] | None = None  # ControlNet: the control images as given, one per ControlNet
    ip_adapter: Any = None  # IP-Adapter inputs
    mu: float | None = None  # SD3 / Flux: the timestep shift given by the caller
    skip_layer_guidance: Any = None  # SD3: skip-layer guidance settings
    true_cfg_scale: float = 1.0  # Flux: true classifier-free guidance
    negatives: bool = False  # Flux: the call has negative prompts (true CFG may run)


@dataclass(slots=True)
class RunExtras:
    """What the kinds and features of a run keep for their own steps, one typed field each (None: not this run's)."""

    control: Any = None  # ControlState: the ControlNets' scales and windows (controlnet.py)
    ip_adapter: Any = None  # the IP-Adapter inputs, until the run's conditioning is made from them (ip_adapter.py)
    ip_adapter_scales: dict[str, list[float]] | None = None  # this run's IP-Adapter scales, by attention processor
    ip_adapter_size: tuple[int, int] | None = None  # Flux: the picture size its black negative image is made at
    noise: torch.Tensor | None = None  # inpainting: the noise the known region is re-noised with after each step
    image_latents: torch.Tensor | None = None  # inpainting: the known image's latents
    latent_size: tuple[int, int] | None = None  # Flux: (h, w) of the latents its tokens unpack to
    txt_ids: torch.Tensor | None = None  # Flux: the text tokens' position ids
    img_ids: torch.Tensor | None = None  # Flux: the image tokens' position ids
    current_timestep: Any = None  # Flux: the classic ``pipe.current_timestep`` during a model call

_local = threading.local()


def _stack() -> list[Run]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_run(pipeline: Any) -> Run | None:
    """The run of ``pipeline`` whose callback is executing in this thread, if any."""
    for run in reversed(_stack()):
        if run.pipeline is pipeline:
            return run
    return None


def remembered(pipeline: Any) -> dict[str, Any]:
    """What this thread's last finished run of ``pipeline`` left (guidance scale, num_timesteps, ...),
    so that the classic attributes read after a call answer as they do in the classic pipelines."""
    last = getattr(_local, "last", None)
    if last is None:
        last = _local.last = {}
    key = id(pipeline)
    entry = last.get(key)
    if entry is None or entry[0]() is not pipeline:
        import weakref

        try:
            ref = weakref.ref(pipeline)
        except TypeError:
            ref = (lambda p: (lambda: p))(pipeline)
        entry = last[key] = (ref, {})
    return entry[1]


@contextmanager
def _bound(run: Run) -> Iterator[None]:
    stack = _stack()
    stack.append(run)
    try:
        yield
    finally:
        stack.pop()


class Run:
    """One call of a pipeline. Iterate it to run the steps; call ``finish()`` for the output.

    Public controls, safe from any thread: ``guidance_scale`` (read before every step), ``stop()``,
    ``cancel`` (the run's ``CancelToken``). Read-only: ``num_timesteps``, ``timesteps``,
    ``state`` (latents, x0 estimate, counters), ``interrupted``, ``stop_reason``.
    """

    def __init__(
        self, pipeline: Any, *, scheduler: Any, timesteps: torch.Tensor, guidance: Guidance, cancel: CancelToken | None,
        callback: Callable | None, tensor_names: list[str], output_type: str, return_dict: bool,
        interrupt_output: str, step_kwargs: dict, model_kwargs: dict, started: float,
    ) -> None:
        self.pipeline = pipeline
        self.scheduler = scheduler  # this run's own copy: schedulers keep per-call state between steps
        self.timesteps = timesteps
        self.guidance = guidance
        self.cancel = cancel if cancel is not None else CancelToken()
        self.callback = callback
        self.tensor_names = tensor_names
        self.output_type = output_type
        self.return_dict = return_dict
        self.interrupt_output = interrupt_output  # "denoised", "latents", "finish" or "finish:N" (see the property)
        self.step_kwargs = step_kwargs
        self.model_kwargs = model_kwargs  # per-call model arguments (cross_attention_kwargs, ...)
        self.started = started
        self.extras = RunExtras()  # what the kinds and features keep for their own steps, typed
        self.compute = RunCompute()  # step caching policies (stepdiff.caching), their caches and counts
        self.state: LoopState | None = None
        self.after_step: Callable[[LoopState], None] | None = None
        self._interrupt = False
        self._stop_reason: str | None = None
        self._iterated = False
        self._loop_finished = False
        self._output: Any = None
        self._scratch: dict[int, dict] = {}
        self._finishing: tuple[Any, torch.Tensor] | None = None  # (scheduler, timesteps) while finishing steps run
        self.finished: LoopState | None = None  # the finishing steps' state, once they ran

    # ---------------------------------------------------------------- controls

    @property
    def num_timesteps(self) -> int:
        return len(self.timesteps)

    @property
    def guidance_scale(self) -> float:
        return self.guidance.scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        self.guidance.scale = check_guidance_scale(value)

    @property
    def guidance_rescale(self) -> float:
        return getattr(self.guidance, "rescale", 0.0)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return isinstance(self.guidance, ClassifierFreeGuidance) and self.guidance.scale > 1.0

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def interrupt_output(self) -> str:
        """What an interrupted run returns: ``"denoised"`` (the x0 estimate of the step reached), ``"latents"``
        (the noisy latents, the classic library's) or ``"finish"`` (``finish_steps`` more steps on a re-timed
        schedule down to t = 0, see ``stepdiff.finishing``). Settable until ``finish()``; ``"finish:N"`` sets
        ``finish_steps`` too."""
        return self._interrupt_output

    @interrupt_output.setter
    def interrupt_output(self, value: str) -> None:
        self._interrupt_output, steps = parse_interrupt_output(value)
        if value.startswith("finish") or not hasattr(self, "_finish_steps"):
            self._finish_steps = steps

    @property
    def finish_steps(self) -> int:
        """The most finishing steps an interrupted run with ``interrupt_output="finish"`` runs (default 3; fewer
        when fewer steps of the run are left)."""
        return self._finish_steps

    @finish_steps.setter
    def finish_steps(self, value: int) -> None:
        self._finish_steps = check_finish_steps(value)

    @property
    def schedule(self) -> tuple[Any, torch.Tensor]:
        """(scheduler, timesteps) of the steps being run: the run's, or the finishing steps' while they run."""
        return self._finishing if self._finishing is not None else (self.scheduler, self.timesteps)

    def stop(self, reason: str = "stopped by callback") -> None:
        """Stop before the next model call of the run; the image is as ``interrupt_output`` says."""
        self._stop_reason = reason
        self._interrupt = True

    def interrupt_now(self) -> None:
        """The classic ``pipeline._interrupt = True``: stop, keeping any reason already given."""
        self._interrupt = True

    @property
    def stop_reason(self) -> str:
        if self._loop_finished and not self.interrupted:
            return "completed"
        return self._stop_reason or "interrupted"

    @property
    def interrupted(self) -> bool:
        return self.state is not None and self.state.steps_completed < self.num_timesteps

    def scratch(self, owner: object) -> dict:
        """A dict private to ``owner`` (a callback object) for this run: per-run state for shared callbacks."""
        return self._scratch.setdefault(id(owner), {})

    def _should_stop(self) -> bool:
        if self.cancel.cancelled:
            self._stop_reason = self.cancel.reason
            self._interrupt = True
        return self._interrupt

    @contextmanager
    def bound(self) -> Iterator[None]:
        """Route the pipeline's classic per-call attributes to this run, in this thread."""
        with _bound(self):
            yield

    # ----------------------------------------------------------------- stepping

    def __iter__(self) -> Iterator[StepState]:
        if self._iterated:
            raise RuntimeError("a run's steps can be iterated once; prepare a new run")
        self._iterated = True
        return self._steps()

    def _steps(self) -> Iterator[StepState]:
        pipe = self.pipeline
        loop = denoise(
            self.state, self.timesteps, self.scheduler, self._predict, self.step_kwargs,
            should_stop=self._should_stop, guidance=self.guidance,
            inference_mode=pipe.model_calls_in_inference_mode(), flow_matching=pipe.flow_matching,
            after_step=self.after_step, check_finite=pipe.check_finite,
        )
        bar = pipe.progress_bar(total=self.num_timesteps)
        try:
            for state in loop:
                if self.callback is not None:
                    with self.bound():
                        pipe.run_step_callback(self, self.callback, state, self.tensor_names)
                bar.update()
                yield state
            self._loop_finished = True
        finally:
            bar.close()
            self.compute.free()  # caches go with the loop; the blocks are unwrapped once no run uses them

    def _predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
        state = self.state
        with self.pipeline.model_call_context(self), self.compute.call(
            state.steps_completed, state.sides, latent_input.shape[0]
        ):
            return self.pipeline.predict(latent_input, timestep, conditioning, self)

    def run(self) -> Any:
        """Iterate every step, then ``finish()``: what ``pipeline(...)`` does."""
        for _ in self:
            pass
        return self.finish()

    def finish(self) -> Any:
        """Decode and return the output (once; later calls return the same object).

        A run abandoned before its last step (a ``break`` out of the iteration) counts as interrupted
        and returns what ``interrupt_output`` says (``"finish"``: the finishing steps run here first).
        """
        if self._output is not None:
            return self._output
        if self._iterated and not self._loop_finished and not self._interrupt:
            self._stop_reason = self._stop_reason or "stopped by caller"
            self._interrupt = True
        from .callback_io import run_hooks

        self.compute.free()  # also for a run prepared but never iterated
        if self.interrupted and self.interrupt_output == "finish" and self.finished is None:
            self._run_finishing_steps()
        with self.bound():
            run_hooks(self.callback, "on_run_end", self.pipeline)
        self._output = self.pipeline.finish(self)
        return self._output

    @torch.no_grad()
    def _run_finishing_steps(self) -> None:
        """``interrupt_output="finish"``: from the latents of the step reached, ``finish_steps`` steps down to t = 0
        on a fresh scheduler (``stepdiff.finishing``), through the same loop, model calls and ``after_step``
        (inpainting's known region), with the guidance the run had at the stop. No callback runs: the run
        has stopped. ``run.state`` stays the state at the stop; the finishing steps' state is ``run.finished``."""
        pipe, state = self.pipeline, self.state
        done = state.steps_completed
        plan = finish_plan(self.scheduler, self.timesteps, done, self.finish_steps, pipe.flow_matching,
                           device=state.latents.device)
        finished = LoopState(
            latents=state.latents * plan.scale if plan.scale != 1.0 else state.latents,
            cond=state.cond, uncond=state.uncond, guidance_scale=self.guidance.scale,
        )
        self._finishing = (plan.scheduler, plan.timesteps)
        try:
            for _ in () if len(plan.timesteps) == 0 else denoise(
                finished, plan.timesteps, plan.scheduler, self._predict, {}, should_stop=lambda: False,
                guidance=_GuidanceAt(self.guidance, done), inference_mode=pipe.model_calls_in_inference_mode(),
                flow_matching=pipe.flow_matching, after_step=self.after_step, check_finite=pipe.check_finite,
            ):
                pass
        finally:
            self._finishing = None
        self.finished = finished

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started

    def __repr__(self) -> str:
        done = 0 if self.state is None else self.state.steps_completed
        return f"Run({type(self.pipeline).__name__}, step {done}/{self.num_timesteps}, guidance {self.guidance.scale:g})"


class _GuidanceAt(Guidance):
    """The run's guidance, as it was at the stop, for the finishing steps: same scale, same sides (and per-image
    state, e.g. adaptive guidance), and step-dependent refinements (skip-layer guidance) asked about the step
    the run stopped before, whatever finishing step is running."""

    def __init__(self, inner: Guidance, step_index: int) -> None:
        self.inner, self.step_index = inner, step_index
        self.mode = inner.mode

    @property
    def scale(self) -> float:  # type: ignore[override]
        return self.inner.scale

    def batches(self) -> tuple[str, ...]:
        return self.inner.batches()

    def combine(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.combine(outputs)

    def refine(self, step_index, guided, outputs, extra_call):
        return self.inner.refine(self.step_index, guided, outputs, extra_call)
