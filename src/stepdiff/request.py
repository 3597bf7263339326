"""One generation request, checked the same way for every caller: CLI generate, batch rows and studio jobs.

Each field has one validator, ``check_<field>(value, name)``, that returns the value in its type or raises
``FieldError(field, value, allowed)``. ``name`` is the caller's spelling of the field: ``--guidance`` for the CLI,
``guidance_scale`` for a batch row, ``guidance`` for a studio job; so the message names what the user typed.
:meth:`GenerationRequest.validate` runs them all and the rules between fields. Each caller adapts a ``FieldError``
to its own way of saying no: the CLI exits 2 with one line, a batch row names its line, the studio answers HTTP 422
with the field. Text from a CSV cell is turned into numbers by the batch reader first; the validators take values.

Then the request builds what a run needs: the pipeline call's keyword arguments (:meth:`call_kwargs`), the
guidance callbacks (:meth:`guidance_callbacks`) and each image's metadata (:meth:`image_settings`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

from .limits import DEFAULT_GUIDANCE, MAX_CONTROL_SCALE, MAX_GUIDANCE, MAX_SEED, MAX_STEPS
from .validators import (  # noqa: F401  (re-exported: the validators' public home was this module)
    _SATURATES,
    MAX_SIDE,
    FieldError,
    SizeRule,
    _integer,
    _is_unicode,
    _number,
    _real,
    _show,
    _text,
    check_cfg_cutoff,
    check_cfg_cutoff_step,
    check_control_end,
    check_control_scale,
    check_guidance,
    check_guidance_interval,
    check_negative_prompt,
    check_num_images,
    check_number,
    check_prompt,
    check_scheduler,
    check_seed,
    check_side,
    check_size,
    check_steps,
    check_strength,
    default_strength,
    parse_interval,
)

__all__ = [
    "DEFAULT_GUIDANCE",
    "MAX_CONTROL_SCALE",
    "MAX_GUIDANCE",
    "MAX_SEED",
    "MAX_STEPS",
    "FieldError",
    "GenerationRequest",
    "SizeRule",
    "check_cfg_cutoff",
    "check_cfg_cutoff_step",
    "check_control_end",
    "check_control_scale",
    "check_guidance",
    "check_guidance_interval",
    "check_negative_prompt",
    "check_num_images",
    "check_number",
    "check_prompt",
    "check_scheduler",
    "check_seed",
    "check_side",
    "check_size",
    "check_steps",
    "check_strength",
    "default_strength",
    "parse_interval",
]

# ------------------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class GenerationRequest:
    """What one generation asks for. ``None``: left out (the model's or the kind's default).

    Pictures (``init_image``, ``mask_image``, ``control_image``) are PIL images, or whatever the caller resolves
    them from later (the studio's upload ids); sizes are compared only between pictures.
    """

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 25
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    cfg_cutoff: float | None = None
    cfg_cutoff_step: int | None = None
    guidance_interval: tuple[float, float] | None = None
    scheduler: str | None = None
    karras: bool = False
    num_images: int = 1
    init_image: Any = None
    strength: float | None = None
    mask_image: Any = None
    control_image: Any = None
    control_scale: float | None = None
    control_end: float | None = None

    def validate(self, names: Mapping[str, str] | None = None, *, max_steps: int = MAX_STEPS,
                 size: SizeRule | None = None, allow_empty_prompt: bool = False,
                 max_images: int | None = None) -> GenerationRequest:
        """Every field checked; returns the request with values in their types and the kind's defaults (strength).
        ``names`` maps a field to the caller's spelling of it (``{"seed": "--seed"}``)."""
        name = _Names(names)
        checks: dict[str, Callable[[Any, str], Any]] = {
            "prompt": partial(check_prompt, allow_empty=allow_empty_prompt), "negative_prompt": check_negative_prompt,
            "seed": check_seed, "steps": partial(check_steps, max_steps=max_steps),
            "width": partial(check_side, rule=size), "height": partial(check_side, rule=size),
            "guidance_scale": check_guidance, "cfg_cutoff": check_cfg_cutoff, "cfg_cutoff_step": check_cfg_cutoff_step,
            "guidance_interval": parse_interval, "scheduler": check_scheduler,
            "num_images": partial(check_num_images, most=max_images), "strength": check_strength,
            "control_scale": check_control_scale, "control_end": check_control_end,
        }
        values = {f: check(getattr(self, f), name(f)) for f, check in checks.items() if getattr(self, f) is not None}
        request = replace(self, **values)
        request._check_guidance_shaping(name)
        request._check_seeds(name)
        request._check_pictures(name, size)
        return request._check_control(name)._with_strength(name)

    # The rules between fields, each apart so that every function stays short.

    def _check_guidance_shaping(self, name: _Names) -> None:
        given = [f for f in ("cfg_cutoff", "cfg_cutoff_step", "guidance_interval") if getattr(self, f) is not None]
        if len(given) > 1:
            one = ", ".join(name(f) for f in ("cfg_cutoff", "cfg_cutoff_step")) + f" and {name('guidance_interval')}"
            raise FieldError(name(given[1]), getattr(self, given[1]), f"left out when {name(given[0])} is given",
                             f"give one of {one}, not {' and '.join(name(f) for f in given)}")

    def _check_seeds(self, name: _Names) -> None:
        if self.seed + self.num_images - 1 > MAX_SEED:  # image k has seed + k
            raise FieldError(name("num_images"), self.num_images, f"at most {MAX_SEED - self.seed + 1} with "
                             f"{name('seed')} {self.seed} (image k has seed + k - 1, at most 2**64-1)",
                             f"{name('seed')} {self.seed} with {name('num_images')} {self.num_images} runs past the "
                             "largest seed, 2**64-1")

    def _check_pictures(self, name: _Names, size: SizeRule | None) -> None:
        init = name("init_image")
        for f in ("mask_image", "strength"):
            if getattr(self, f) is not None and self.init_image is None:
                raise FieldError(name(f), getattr(self, f), f"left out without {init}",
                                 f"{name(f)} needs {init} (the picture to start from)")
        picture = _size_of(self.init_image)
        if picture is None:
            return
        mask = _size_of(self.mask_image)
        if mask is not None and mask != picture:
            raise FieldError(name("mask_image"), f"{mask[0]}x{mask[1]}", f"{picture[0]}x{picture[1]}, as {init}",
                             f"{name('mask_image')} is {mask[0]}x{mask[1]} but {init} is {picture[0]}x{picture[1]}; "
                             "they must be the same size")
        asked = (self.width, self.height)
        if asked != (None, None) and asked != picture:
            raise FieldError(name("size"), f"{asked[0]}x{asked[1]}", f"left out with {init}",
                             f"{name('size')} {asked[0]}x{asked[1]} differs from {init}'s {picture[0]}x{picture[1]}; "
                             f"leave {name('size')} out (the picture's size is used) or resize the picture")
        if size is not None:
            for side, v in zip(("width", "height"), picture):
                check_side(v, f"{init} {side}", size)

    def _check_control(self, name: _Names) -> GenerationRequest:
        control = name("control_image")
        if self.control_image is None:
            for f in ("control_scale", "control_end"):
                if getattr(self, f) is not None:
                    raise FieldError(name(f), getattr(self, f), f"left out without {control}",
                                     f"{name(f)} needs {control} (the control picture)")
            return self
        if self.mask_image is not None:
            raise FieldError(control, "(a picture)", f"left out with {name('mask_image')}",
                             f"{control} with {name('mask_image')} (ControlNet inpainting) is not supported; use one "
                             "or the other")
        picture, output = _size_of(self.control_image), self.output_size
        if picture is not None and output is not None and picture != output:
            raise FieldError(control, f"{picture[0]}x{picture[1]}", f"{output[0]}x{output[1]}, the output size",
                             f"{control} is {picture[0]}x{picture[1]} but the output is {output[0]}x{output[1]}; give "
                             "a control picture of the output size")
        return replace(self, control_scale=1.0 if self.control_scale is None else self.control_scale,
                       control_end=1.0 if self.control_end is None else self.control_end)

    def _with_strength(self, name: _Names) -> GenerationRequest:
        if self.init_image is None:
            return self
        strength = default_strength(self.mask_image) if self.strength is None else self.strength
        if int(self.steps * strength) < 1:
            raise FieldError(name("strength"), strength, f"at least 1/steps = {1 / self.steps:g} with {name('steps')} "
                             f"{self.steps}",
                             f"{name('strength')} {strength} with {name('steps')} {self.steps} leaves no denoising step "
                             f"(int({self.steps} x {strength}) = 0); raise {name('strength')} or {name('steps')}")
        return replace(self, strength=strength)

    # What the request builds.

    @property
    def kind(self) -> str:
        """text2image, image2image or inpaint (a ControlNet rides on any of the first two)."""
        if self.init_image is None:
            return "text2image"
        return "image2image" if self.mask_image is None else "inpaint"

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(width, height): the init image's, else the asked size; None while the model's default is unknown."""
        picture = _size_of(self.init_image)
        if picture is not None:
            return picture
        return None if self.width is None or self.height is None else (self.width, self.height)

    @property
    def run_steps(self) -> int:
        """Denoising steps that run: image to image runs int(steps * strength) of them, as the classic pipelines."""
        if self.init_image is None or self.strength is None:
            return self.steps
        return max(1, min(self.steps, int(self.steps * self.strength)))

    def with_model_defaults(self, default_guidance: float = DEFAULT_GUIDANCE,
                            native_size: int | None = None) -> GenerationRequest:
        """The model's defaults for what was left out: its guidance scale and (with ``native_size``) its size."""
        request = self
        if self.guidance_scale is None:
            request = replace(request, guidance_scale=float(default_guidance))
        if native_size is not None and self.init_image is None:
            request = replace(request, width=self.width or native_size, height=self.height or native_size)
        return request

    def guidance_callbacks(self) -> list[Any]:
        """The callbacks that shape guidance over the steps: a CFG cutoff (ratio or step) or a guidance interval."""
        from .callbacks import CFGCutoffCallback, GuidanceIntervalCallback

        callbacks: list[Any] = []
        if self.cfg_cutoff is not None:
            callbacks.append(CFGCutoffCallback(cutoff_step_ratio=self.cfg_cutoff))
        if self.cfg_cutoff_step is not None:
            callbacks.append(CFGCutoffCallback(cutoff_step_index=self.cfg_cutoff_step))
        if self.guidance_interval is not None:
            start, end = self.guidance_interval
            callbacks.append(GuidanceIntervalCallback(start_ratio=start, end_ratio=end))
        return callbacks

    def generators(self, device: str = "cpu") -> list[Any]:
        """One ``torch.Generator`` per image: image k is seeded with seed + k."""
        import torch

        return [torch.Generator(device).manual_seed(self.seed + i) for i in range(self.num_images)]

    def call_kwargs(self, device: str = "cpu") -> dict[str, Any]:
        """The pipeline call's keyword arguments (after :meth:`with_model_defaults`), callbacks left to the caller."""
        kwargs: dict[str, Any] = {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "num_inference_steps": self.steps,
            "guidance_scale": DEFAULT_GUIDANCE if self.guidance_scale is None else self.guidance_scale,
            "num_images_per_prompt": self.num_images, "generator": self.generators(device),
        }
        kind = self.kind
        if kind != "text2image":
            kwargs.update(image=self.init_image, strength=self.strength)
        if kind == "inpaint":
            kwargs["mask_image"] = self.mask_image
        size = self.output_size
        if kind != "image2image" and size is not None:  # image to image takes the picture's size
            kwargs.update(width=size[0], height=size[1])
        if self.control_image is not None:
            kwargs["control_image" if kind == "image2image" else "image"] = self.control_image
            kwargs.update(controlnet_conditioning_scale=1.0 if self.control_scale is None else self.control_scale,
                          control_guidance_end=1.0 if self.control_end is None else self.control_end)
        return kwargs

    def image_settings(self, model: str, index: int = 0, **more: Any) -> Any:
        """The metadata of image ``index`` (its own seed); ``more``: the caller's fields (init image path, cache...)."""
        from .metadata import ImageSettings

        return ImageSettings(
            prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed + index, steps=self.steps,
            guidance_scale=DEFAULT_GUIDANCE if self.guidance_scale is None else self.guidance_scale, model=model,
            cfg_cutoff_ratio=self.cfg_cutoff, cfg_cutoff_step=self.cfg_cutoff_step, strength=self.strength,
            **more,
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class _Names:
    """A field's name as the caller spells it."""

    def __init__(self, names: Mapping[str, str] | None) -> None:
        self.names = names or {}

    def __call__(self, field: str) -> str:
        return self.names.get(field, field)


def _size_of(picture: Any) -> tuple[int, int] | None:
    size = getattr(picture, "size", None)
    return (int(size[0]), int(size[1])) if isinstance(size, tuple) and len(size) == 2 else None
