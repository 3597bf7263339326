"""Every pipeline's classic constructor signature, from one table.

diffusers' ``from_pretrained`` reads ``inspect.signature(cls.__init__)`` to know a class's components and config
keyword arguments, so each class keeps its classic class's ``__init__`` parameters: the same names, in the same
order (tests/test_signature_table.py checks every registered class against the installed diffusers). Each
component's annotation is written once (``COMPONENTS``), each config argument's annotation and default once
(``CONFIG``), and each constructor is one line of ``INITS``: its classic order, ``name?`` for an optional component
(default ``None``), and annotations that differ from ``COMPONENTS``.

``classic_init(name)`` builds the ``__init__`` as ``signatures.classic_call`` builds ``__call__``: real named
parameters, and a body that hands them on by name to the class's plain method,
``self._init_components({"vae": vae, ...}, {"requires_safety_checker": requires_safety_checker})``, where each
family's constructor logic lives (``register_components``, and what the family adds before it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .signatures import compile_method

__all__ = ["COMPONENTS", "CONFIG", "INITS", "Components", "classic_init", "register_components"]

# Each component's annotation (as source text); ``Components.annotations`` overrides it for one class.
COMPONENTS: dict[str, str] = {
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
    "text_encoder_3": "Any",
    "tokenizer": "CLIPTokenizer",
    "tokenizer_2": "CLIPTokenizer",
    "tokenizer_3": "Any",
    "unet": "UNet2DConditionModel",
    "transformer": "SD3Transformer2DModel",
    "controlnet": "ControlNetModel | MultiControlNetModel | list[ControlNetModel] | tuple[ControlNetModel, ...]",
    "scheduler": "KarrasDiffusionSchedulers",
    "safety_checker": "Any",
    "feature_extractor": "Any",
    "image_encoder": "Any",
}
# Each config keyword argument's annotation and default. Safety checkers are loaded if present but never run, so
# stepdiff's classes do not require one.
CONFIG: dict[str, tuple[str, Any]] = {
    "requires_safety_checker": ("bool", False),
    "requires_aesthetics_score": ("bool", False),
    "force_zeros_for_empty_prompt": ("bool", True),
    "add_watermarker": ("bool | None", None),
}

_MISSING = object()  # a required component


@dataclass(frozen=True)
class Components:
    """One class's ``__init__``: its classic order (``name?``: an optional component, default ``None``), and
    annotations that differ from ``COMPONENTS``."""

    order: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    def parameters(self) -> list[tuple[str, str, Any, bool]]:
        """``(name, annotation, default, is_config)`` in order; a required component's default is ``_MISSING``."""
        out = []
        for word in self.order.split():
            name, is_config = word.rstrip("?"), word in CONFIG
            annotation, default = CONFIG[name] if is_config else (COMPONENTS[name], None if word[-1] == "?" else _MISSING)
            out.append((name, self.annotations.get(name, annotation), default, is_config))
        return out


_SD = "vae text_encoder tokenizer unet {}scheduler safety_checker? feature_extractor? image_encoder? requires_safety_checker"
_SDXL = "vae text_encoder text_encoder_2 tokenizer tokenizer_2 unet {}scheduler"
_SDXL_CONFIG = "force_zeros_for_empty_prompt add_watermarker"
_FLOW = {"scheduler": "FlowMatchEulerDiscreteScheduler"}

INITS: dict[str, Components] = {
    "StableDiffusionPipeline": Components(_SD.format("")),
    "StableDiffusionControlNetPipeline": Components(_SD.format("controlnet ")),
    "StableDiffusionXLPipeline": Components(f"{_SDXL.format('')} image_encoder? feature_extractor? {_SDXL_CONFIG}"),
    # The refiner-capable image-to-image and inpainting classes: ``requires_aesthetics_score`` too.
    "StableDiffusionXLImg2ImgPipeline": Components(
        f"{_SDXL.format('')} image_encoder? feature_extractor? requires_aesthetics_score {_SDXL_CONFIG}"),
    "StableDiffusionXLControlNetPipeline": Components(
        f"{_SDXL.format('controlnet ')} {_SDXL_CONFIG} feature_extractor? image_encoder?"),
    "StableDiffusionXLControlNetImg2ImgPipeline": Components(
        f"{_SDXL.format('controlnet ')} requires_aesthetics_score {_SDXL_CONFIG} feature_extractor? image_encoder?"),
    "StableDiffusion3Pipeline": Components(
        "transformer scheduler vae text_encoder tokenizer text_encoder_2 tokenizer_2 text_encoder_3? tokenizer_3?"
        " image_encoder? feature_extractor?", {**_FLOW, "text_encoder": "CLIPTextModelWithProjection"}),
    "FluxPipeline": Components(
        "scheduler vae text_encoder tokenizer text_encoder_2 tokenizer_2 transformer image_encoder? feature_extractor?",
        {**_FLOW, "text_encoder_2": "Any", "tokenizer_2": "Any", "transformer": "FluxTransformer2DModel"}),
}

# What the annotations name, for ``typing.get_type_hints`` on the generated functions.
_ANNOTATION_NAMES = {
    "Any": Any, "AutoencoderKL": AutoencoderKL, "CLIPTextModel": CLIPTextModel, "CLIPTokenizer": CLIPTokenizer,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection, "UNet2DConditionModel": UNet2DConditionModel,
    "SD3Transformer2DModel": SD3Transformer2DModel, "FluxTransformer2DModel": FluxTransformer2DModel,
    "ControlNetModel": ControlNetModel, "MultiControlNetModel": MultiControlNetModel,
    "KarrasDiffusionSchedulers": KarrasDiffusionSchedulers,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
}


def _source(parameters: list[tuple[str, str, Any, bool]]) -> str:
    """``def __init__(self, vae: AutoencoderKL, ...) -> None: self._init_components({...}, {...})``."""
    lines = ["def __init__(", "    self,"]
    for name, annotation, default, _ in parameters:
        lines.append(f"    {name}: {annotation}," if default is _MISSING else f"    {name}: {annotation} = _default_{name},")
    lines += [") -> None:", "    self._init_components("]
    for config in (False, True):
        lines.append("        {" + ", ".join(f'"{n}": {n}' for n, _, _, c in parameters if c is config) + "},")
    lines += ["    )", ""]
    return "\n".join(lines)


def classic_init(class_name: str, module: str | None = None) -> Callable[..., Any]:
    """The ``__init__`` of ``class_name``, from its ``INITS`` entry, for ``module`` (by default the caller's):
    ``__init__ = classic_init("StableDiffusionPipeline")``."""
    parameters = INITS[class_name].parameters()
    module = sys._getframe(1).f_globals.get("__name__", __name__) if module is None else module
    namespace = {"__name__": module, **_ANNOTATION_NAMES, **{f"_default_{n}": d for n, _, d, _ in parameters}}
    doc = f"Takes the components and config arguments of the classic {class_name}, in its order."
    return compile_method(class_name, _source(parameters), namespace, doc)


def register_components(pipeline: Any, modules: dict[str, Any], config: dict[str, Any]) -> None:
    """The classic constructors' work, what every family's ``_init_components`` ends with: the components as
    modules and the config arguments in the config (``model_index.json``)."""
    DiffusionPipeline.__init__(pipeline)
    pipeline.register_modules(**modules)
    if config:
        pipeline.register_to_config(**config)
