"""ControlNet on the shared loop: a feature object a family's pipeline class holds (SD, SDXL).

The control images are per-row conditioning: ``controlnet_cond_0``, ``controlnet_cond_1``, ... sit in
the conditional and the unconditional dicts of the run, next to the text embeddings, so they follow
every guidance decision of the loop (a CFG cutoff, an interval, a schedule) at any batch size. There
is nothing to slice, which is what the classic pipelines' callbacks get wrong.

A per-row flag ``control_rows`` (1 on conditional rows, 0 on unconditional rows) rides along too:
``guess_mode`` runs the ControlNets on the conditional rows only and gives the unconditional rows
zero residuals, as the classic pipeline does, whatever rows the loop batched this step.

Everything per call lives on the run (``run.extras.control``): the conditioning scales, which a
callback may change (``pipeline.controlnet_conditioning_scale = 0.5`` applies from the next step, to
that run only), the ``control_guidance_start`` / ``control_guidance_end`` window and ``guess_mode``.
A ControlNet whose window does not cover a step is not run on that step at all.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor

from ..guidance import control_window
from .controlnet_models import _nets, as_controlnet, check_controlnet_fits
from .images import _image_size, _preprocess
from .parts import MISSING, Part, has_part, marker
from .run import CallInputs, Run, current_run, remembered

__all__ = ["ControlNetFeature", "ControlNetRun", "ControlState", "as_controlnet", "check_controlnet_fits"]

_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _per_net(name: str, value: object, n: int) -> list[float]:
    """One value per ControlNet: a number (the same for all) or a list of n numbers."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values but there are {n} ControlNets; give one per ControlNet")
        return [_real(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [_real(name, value)] * n


@dataclass
class ControlState:
    """What one run knows about its ControlNets (``run.extras.control``)."""

    scales: list[float]  # controlnet_conditioning_scale, one per ControlNet; callbacks may change them
    start: list[float]
    end: list[float]
    guess_mode: bool
    keys: list[str]  # the conditioning key of each ControlNet's image
    # Steps the windows are fractions of: the schedule before SDXL's denoising_end cuts it, as the classic pipelines.
    num_steps: int = 0

    def scales_at(self, step: int) -> list[float]:
        """Each ControlNet's scale on ``step``: 0 outside its [start, end] window (the classic ``controlnet_keep``)."""
        keep = [float(control_window(step, self.num_steps, s, e)) for s, e in zip(self.start, self.end)]
        return [scale * k for scale, k in zip(self.scales, keep)]


def _scale_property() -> property:
    """``pipeline.controlnet_conditioning_scale``: in a callback, the current run's scale(s); set there, it applies
    from the next step of that run only. Outside a run: what this thread's last run ended with."""

    def get(self: Any) -> Any:
        run = current_run(self)
        if run is None:
            return remembered(self).get("controlnet_conditioning_scale", 1.0)
        control = run.extras.control
        return control.scales[0] if len(control.scales) == 1 else list(control.scales)

    def set_(self: Any, value: Any) -> None:
        run = current_run(self)
        if run is None:
            raise AttributeError(
                "controlnet_conditioning_scale is a per-call argument: pass it to the call, or set it from a step "
                "callback to change the current run"
            )
        control = run.extras.control
        control.scales = _per_net("controlnet_conditioning_scale", value, len(control.scales))

    return property(get, set_, doc=get.__doc__)


class ControlNetFeature(Part):
    """ControlNet(s) steer the family's UNet through residuals computed, per model call, from per-row conditioning.

    ``image_name``: the classic argument (and callback tensor) name of the control images: ``image``, or
    ``control_image`` where ``image`` is the init image (image-to-image, inpainting); there the control images are
    the callback tensor ``image`` too, so that the official ControlNet callbacks, which ask for ``image``, work.
    """

    components: ClassVar[tuple[str, ...]] = ("controlnet",)

    def __init__(self, image_name: str = "image") -> None:
        self._control_image_name = image_name
        self._control_tensor_names = (image_name,) if image_name == "image" else (image_name, "image")

    def pipeline_attributes(self) -> dict[str, Any]:
        return {"controlnet_conditioning_scale": _scale_property(), "control_image_processor": _processor_property(),
                "control_nets": control_nets, "_control_image_name": self._control_image_name}

    def control_nets(self, pipe: Any) -> list[ControlNetModel]:
        return _nets(pipe.controlnet)

    # ------------------------------------------------------------ checks

    def _control_images(self, image: object, n: int) -> list[object]:
        name = self._control_image_name
        if image is None:
            raise ValueError(f"{name} (the control image) is required: a PIL image, numpy array or tensor"
                             + ("" if n == 1 else f", one per ControlNet ({n})"))
        if n == 1:
            return [image]
        if not isinstance(image, (list, tuple)):
            raise TypeError(f"with {n} ControlNets, {name} must be a list of {n} control images, got {type(image).__name__}")
        if image and isinstance(image[0], (list, tuple)):  # the classic nested form: one list per prompt
            image = [list(t) for t in zip(*image)]
        if len(image) != n:
            raise ValueError(f"{name} has {len(image)} control images but there are {n} ControlNets; give one per ControlNet")
        return list(image)

    def _preprocess_control(self, pipe: Any, k: int, image: object, height, width, n: int) -> torch.Tensor:
        name = self._control_image_name if n == 1 else f"{self._control_image_name}[{k}]"
        items = image if isinstance(image, list) else [image]
        if not items or not all(isinstance(i, _IMAGE_TYPES) for i in items):
            kinds = sorted({type(i).__name__ for i in items}) or ["an empty list"]
            raise TypeError(
                f"{name} must be a PIL image, a numpy array, a torch tensor or a list of them, got {', '.join(kinds)}"
            )
        try:
            tensor = pipe.control_image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name} could not be read as a control image: {e}") from None
        channels = self.control_nets(pipe)[k].config.conditioning_channels
        if tensor.ndim != 4 or tensor.shape[1] != channels:
            raise ValueError(
                f"{name} has {tensor.shape[1] if tensor.ndim == 4 else '?'} channels (shape {tuple(tensor.shape)}) but the "
                f"ControlNet takes {channels}; pass an RGB picture (PIL images of any mode are converted)"
            )
        return tensor

    def check_inputs(self, pipe: Any, args: dict[str, Any], kind: CallInputs) -> None:
        nets = self.control_nets(pipe)
        n = len(nets)
        images = self._control_images(args.pop(self._control_image_name, None), n)
        scale = args.pop("controlnet_conditioning_scale", 1.0)
        if n == 1 and isinstance(scale, (list, tuple)) and len(scale) != 1:
            raise ValueError(f"controlnet_conditioning_scale must be a number with one ControlNet, got {scale!r}")
        scales = _per_net("controlnet_conditioning_scale", scale, n)
        start, end = args.pop("control_guidance_start", 0.0), args.pop("control_guidance_end", 1.0)
        if not isinstance(start, (list, tuple)) and isinstance(end, (list, tuple)):
            start = [start] * len(end)
        if not isinstance(end, (list, tuple)) and isinstance(start, (list, tuple)):
            end = [end] * len(start)
        starts = _per_net("control_guidance_start", start, n)
        ends = _per_net("control_guidance_end", end, n)
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(
                    f"control_guidance_start ({s}) and control_guidance_end ({e}) must satisfy 0 <= start < end <= 1"
                )
        guess_mode = args.pop("guess_mode", False)
        if not isinstance(guess_mode, bool):
            raise TypeError(f"guess_mode must be True or False, got {guess_mode!r}")
        guess_mode = guess_mode or bool(nets[0].config.global_pool_conditions)
        height, width = args.get("height"), args.get("width")
        tensors = [self._preprocess_control(pipe, k, img, height, width, n) for k, img in enumerate(images)]
        sizes = {tuple(t.shape[-2:]) for t in tensors}
        if len(sizes) > 1:
            raise ValueError(
                f"the control images have different sizes {sorted(sizes)}; give them one size, or pass height and width "
                "to resize them all"
            )
        (h, w), = sizes
        if height is None and width is None:
            for dim, value in (("height", h), ("width", w)):
                try:
                    pipe._check_size(dim, value)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{self._control_image_name} is {w}x{h} (width x height), which this model cannot "
                                     f"generate at: {e}; pass a larger control image or height and width") from None
            kind.height, kind.width = h, w
        kind.control = ControlState(
            scales=scales, start=starts, end=ends, guess_mode=guess_mode, keys=[f"controlnet_cond_{k}" for k in range(n)],
        )
        kind.control_images = tensors

    def check_with_kind(self, pipe: Any, args: dict[str, Any], kind: CallInputs) -> None:
        """Image-to-image and inpainting with ControlNets: the init ``image`` and the control images get one size, as
        the classic pipelines (both resized to ``height`` / ``width`` when given; otherwise they must already agree,
        where the classic pipelines crash in the ControlNet)."""
        if not pipe.kind.takes_image:
            return
        height, width = args.get("height"), args.get("width")
        sized = kind.image is not None  # image-to-image has read the image (and its size) already; inpainting reads it later
        if height is not None or width is not None:
            if sized:
                kind.image = _preprocess(pipe.image_processor, "image", kind.image_arg, height=height, width=width)
            return
        h, w = kind.control_images[0].shape[-2:]
        if sized:
            image_h, image_w = kind.height, kind.width
        else:
            image = kind.image_arg
            first = image[0] if isinstance(image, list) else image
            size = _image_size(image)
            if size is None or (isinstance(first, torch.Tensor) and first.ndim == 4 and first.shape[1] == pipe.latent_channels()):
                return  # latents given as the image, or no size to tell: reading it later checks the rest
            f = pipe.vae_scale_factor  # as the classic image processor: rounded down to whole latent pixels
            image_h, image_w = (int(s) // f * f for s in size)
        if (image_h, image_w) != (h, w):
            raise ValueError(
                f"{self._control_image_name} is {w}x{h} but image is {image_w}x{image_h} (width x height); "
                "give them one size, or pass height and width to resize both"
            )

    def check_batch(self, pipe: Any, kind: CallInputs, batch_size: int) -> None:
        batches = [t.shape[0] for t in kind.control_images]
        for k, b in enumerate(batches):
            if b not in (1, batch_size):
                name = self._control_image_name if len(batches) == 1 else f"{self._control_image_name}[{k}]"
                raise ValueError(
                    f"{name} holds {b} control images but the call has {batch_size} prompts; give 1 (used for every prompt) "
                    f"or one per prompt"
                )

    # ---------------------------------------------------------- the run

    def schedule(self, pipe: Any, run: Run, steps: torch.Tensor, kind: CallInputs) -> None:
        kind.control.num_steps = len(steps)  # before SDXL's denoising_end cuts the schedule

    def start(self, pipe: Any, run: Run, kind: CallInputs) -> None:
        run.extras.control = kind.control  # before on_run_start, so callbacks can set the first step's scale

    def add_conditioning(self, pipe: Any, run: Run, kind: CallInputs, dtype, device, generator) -> None:
        state = run.state
        rows = state.latents.shape[0]
        for net, key, image in zip(self.control_nets(pipe), kind.control.keys, kind.control_images):
            repeat_by = rows if image.shape[0] == 1 else rows // image.shape[0]  # as the classic prepare_image
            image = image.repeat_interleave(repeat_by, dim=0).to(device=device, dtype=net.dtype)
            state.cond[key] = state.uncond[key] = image  # the same control image for both sides
        state.cond["control_rows"] = torch.ones(rows, device=device, dtype=dtype)
        state.uncond["control_rows"] = torch.zeros(rows, device=device, dtype=dtype)

    def model_extras(self, pipe: Any, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict,
                     run: Run) -> dict[str, Any]:
        """The ControlNet residuals for the rows of this model call, as UNet keyword arguments."""
        control: ControlState = run.extras.control
        scales = control.scales_at(run.state.steps_completed)
        rows = None
        if control.guess_mode:  # the ControlNets see the conditional rows only; the others get zero residuals
            on = conditioning["control_rows"] > 0
            rows = None if bool(on.all()) else on
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        family_inputs = getattr(pipe, "controlnet_inputs", None)  # SDXL: added_cond_kwargs
        for net, key, scale in zip(self.control_nets(pipe), control.keys, scales):
            if scale == 0.0:  # outside its window (or scale 0): adds nothing, so it is not run
                continue
            sub = conditioning if rows is None else {k: v[rows] for k, v in conditioning.items()}
            d, m = net(
                latent_input if rows is None else latent_input[rows], timestep,
                encoder_hidden_states=sub["encoder_hidden_states"], controlnet_cond=sub[key], conditioning_scale=scale,
                guess_mode=control.guess_mode, return_dict=False, **(family_inputs(sub) if family_inputs else {}),
            )
            if rows is not None:
                d = [_scatter(x, rows) for x in d]
                m = _scatter(m, rows)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    # ---------------------------------------------------------- callbacks

    def callback_tensor(self, pipe: Any, state: Any, name: str) -> Any:
        if name in self._control_tensor_names:
            images = [state.cond[k] for k in state.cond if k.startswith("controlnet_cond_")]
            return images[0] if len(images) == 1 else images
        return MISSING

    def apply_callback_result(self, pipe: Any, state: Any, result: object, step: int) -> object:
        for name in self._control_tensor_names:
            if isinstance(result, dict) and name in result:
                result = dict(result)
                self._set_control_images(state, name, result.pop(name), step)
        return result

    def _set_control_images(self, state, name: str, value: object, step: int) -> None:
        keys = [k for k in state.cond if k.startswith("controlnet_cond_")]
        values = [value] if len(keys) == 1 and isinstance(value, torch.Tensor) else value
        if not isinstance(values, (list, tuple)) or len(values) != len(keys):
            raise ValueError(
                f"callback_on_step_end returned {name!r} as {type(value).__name__} at step {step}; expected "
                + ("a tensor" if len(keys) == 1 else f"a list of {len(keys)} tensors")
            )
        checked = []
        for k, (key, v) in enumerate(zip(keys, values)):
            current = state.cond[key]
            which = "" if len(keys) == 1 else f" (control image {k} of {len(keys)})"
            if not isinstance(v, torch.Tensor) or v.shape != current.shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"callback_on_step_end returned {name!r} with shape {got} at step {step}{which}; expected "
                    f"{tuple(current.shape)} (one control image per image of the batch; nothing to slice)"
                )
            if v.dtype != current.dtype or v.device != current.device:
                raise ValueError(
                    f"callback_on_step_end returned {name!r} as {v.dtype} on {v.device} at step {step}{which}; "
                    f"expected {current.dtype} on {current.device}"
                )
            checked.append((key, v))
        for key, v in checked:  # all checked first: a refused list changes none of the images
            state.cond[key] = state.uncond[key] = v

    def finish(self, pipe: Any, run: Run) -> None:
        scales = run.extras.control.scales
        remembered(pipe)["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else list(scales)


def control_nets(pipe: Any) -> list[ControlNetModel]:
    """The pipeline's ControlNets, one list (a ``MultiControlNetModel``'s nets)."""
    return _nets(pipe.controlnet)


def _processor_property() -> property:
    def get(pipe: Any) -> VaeImageProcessor:
        proc = pipe.__dict__.get("_control_image_processor")
        if proc is None:
            proc = pipe.__dict__["_control_image_processor"] = VaeImageProcessor(
                vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False
            )
        return proc

    return property(get)


# The former mixin's name: ``issubclass(cls, ControlNetRun)`` holds for a pipeline class with ControlNets.
ControlNetRun = marker("ControlNetRun", "A pipeline class with a ControlNetFeature.",
                       lambda cls: has_part(cls, ControlNetFeature), __name__)


def _scatter(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    full = values.new_zeros((rows.shape[0], *values.shape[1:]))
    full[rows] = values
    return full
