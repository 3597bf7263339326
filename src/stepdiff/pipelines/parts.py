"""The parts a pipeline class is composed of: one kind of run and a few features, objects, not base classes.

A pipeline class is a family class (SD, SDXL, SD3, Flux: prompts -> conditioning, one model call) with two class
attributes::

    class StableDiffusionControlNetInpaintPipeline(StableDiffusionControlNetPipeline):
        kind = InpaintKind()                                   # where the run starts, its first latents
        features = (IPAdapterFeature(), ControlNetFeature("control_image"))

``prepare`` (``pipelines/base.py``) calls the parts' hooks in one fixed order, each hook once per part, features
first (in their tuple's order), then the kind:

 1. ``check_inputs(pipe, args, call)``      pop and check the part's arguments into ``call`` (``CallInputs``)
 2. ``check_with_kind(pipe, args, call)``   features, once the kind has read its inputs (ControlNet: one size)
 3. ``check_batch(pipe, call, batch_size)`` once the number of prompts is known
 4. ``check_rows(pipe, call, rows, batch_size, per_prompt)``  once size and number of images are known
 5. timesteps: ``kind.truncate_start`` -> features' ``schedule`` (they see the steps before SDXL's
    ``denoising_end`` cut) -> the family's ``truncate_end``
 6. ``start(pipe, run, call)``              the run exists and has its timesteps; before ``on_run_start`` callbacks
 7. ``kind.initial_latents(...)``           after the prompts are encoded
 8. ``add_conditioning(pipe, run, call, dtype, device, generator)``  per-row conditioning (after the family's own)

and during the steps: ``model_call_context`` (around each model call), ``added_cond`` / ``model_extras`` (extra
denoiser arguments from the rows of one call), ``kind.extend_model_input`` (extra input channels),
``callback_tensor`` / ``apply_callback_result`` (callback tensors a part owns), and ``finish`` after decoding.

A part may also give the pipeline class the classic attributes it stands for (``mask_processor``,
``controlnet_conditioning_scale``, ...): ``pipeline_attributes()``, installed on the class when it is defined.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from .run import CallInputs, Run

__all__ = ["MISSING", "Kind", "Part", "TextToImageKind", "diffusers_method", "marker"]

MISSING = object()  # a callback tensor a part does not own


class Part:
    """A feature of a run (ControlNet, IP-Adapter); every hook does nothing unless a part says otherwise."""

    components: ClassVar[tuple[str, ...]] = ()  # components every call needs (ControlNet: controlnet)

    def pipeline_attributes(self) -> dict[str, Any]:
        """Classic attributes this part adds to the pipeline class (name -> value)."""
        return {}

    def check_inputs(self, pipe: Any, args: dict[str, Any], call: CallInputs) -> None:
        """Pop and check this part's arguments into ``call``."""

    def check_with_kind(self, pipe: Any, args: dict[str, Any], call: CallInputs) -> None:
        """Once the kind has read its inputs (features only)."""

    def check_batch(self, pipe: Any, call: CallInputs, batch_size: int) -> None:
        """Once the number of prompts is known."""

    def check_rows(self, pipe: Any, call: CallInputs, rows: int, batch_size: int, per_prompt: int) -> None:
        """Once the call's size and number of images are known, before any model work."""

    def schedule(self, pipe: Any, run: Run, steps: torch.Tensor, call: CallInputs) -> None:
        """The timesteps from the kind's start, before the family's end cut (SDXL ``denoising_end``)."""

    def start(self, pipe: Any, run: Run, call: CallInputs) -> None:
        """The run has its timesteps; its callbacks' ``on_run_start`` comes next."""

    def add_conditioning(self, pipe: Any, run: Run, call: CallInputs, dtype, device, generator) -> None:
        """Per-row conditioning this part adds to ``run.state.cond`` / ``run.state.uncond``."""

    def model_call_context(self, pipe: Any, run: Run) -> contextlib.AbstractContextManager:
        """Held around every model call of ``run``."""
        return contextlib.nullcontext()

    def added_cond(self, pipe: Any, conditioning: dict) -> dict[str, Any]:
        """Extra ``added_cond_kwargs`` of the denoiser from the rows of one model call."""
        return {}

    def model_extras(self, pipe: Any, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict,
                     run: Run) -> dict[str, Any]:
        """Extra denoiser keyword arguments for one model call (ControlNet residuals)."""
        return {}

    def callback_tensor(self, pipe: Any, state: Any, name: str) -> Any:
        """The callback tensor ``name`` if this part owns it, else ``MISSING``."""
        return MISSING

    def apply_callback_result(self, pipe: Any, state: Any, result: object, step: int) -> object:
        """Take what this part owns out of a callback's result (applied to ``state``); return the rest."""
        return result

    def finish(self, pipe: Any, run: Run) -> None:
        """After the output is made."""


class Kind(Part):
    """A kind of run: where it starts in the schedule, its first latents, extra denoiser input channels."""

    name: ClassVar[str] = "text2image"  # the registry's kind
    takes_image: ClassVar[bool] = False  # an init image (needs the VAE even for latent output)

    def latent_channels(self, pipe: Any) -> int | None:
        """The latent channels, when the kind knows better than the family (inpainting: the VAE's)."""
        return None

    def truncate_start(self, pipe: Any, run: Run, steps: torch.Tensor, num_inference_steps: int,
                       call: CallInputs) -> torch.Tensor:
        return steps

    def initial_latents(self, pipe: Any, run: Run, rows: int, height: int, width: int, dtype, device, generator,
                        latents: torch.Tensor | None, call: CallInputs) -> torch.Tensor:
        """Text-to-image: the family's noise (or the caller's ``latents``)."""
        return pipe.initial_latents(run, rows, height, width, dtype, device, generator, latents, call)

    def extend_model_input(self, pipe: Any, latent_input: torch.Tensor, conditioning: dict) -> torch.Tensor:
        return latent_input


class TextToImageKind(Kind):
    """Start from noise at the first timestep."""


def diffusers_method(pipe: Any, name: str) -> Callable:
    """The ``name`` method the pipeline inherits from diffusers (its loader mixins), bound to ``pipe``: what a part's
    classic method wraps (``set_ip_adapter_scale``)."""
    for klass in type(pipe).__mro__:
        if not klass.__module__.startswith("stepdiff") and name in vars(klass):
            return vars(klass)[name].__get__(pipe, type(pipe))
    raise AttributeError(name)


def marker(name: str, doc: str, test: Callable[[type], bool], module: str) -> type:
    """A former mixin's name, kept importable: ``issubclass(cls, marker)`` holds when ``test(cls)`` does (a pipeline
    class composed with that kind or feature). It is no base class of any pipeline."""

    def hook(cls: type, other: type) -> Any:
        return True if test(other) else NotImplemented

    return abc.ABCMeta(name, (abc.ABC,), {"__doc__": doc, "__subclasshook__": classmethod(hook),
                                          "__module__": module})


def has_part(cls: type, part_type: type) -> bool:
    parts = (getattr(cls, "kind", None), *(getattr(cls, "features", ()) or ()))
    return any(isinstance(p, part_type) for p in parts)


@contextlib.contextmanager
def entered(contexts: list[contextlib.AbstractContextManager]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield
