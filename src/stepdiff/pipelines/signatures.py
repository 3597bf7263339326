"""Every pipeline's classic ``__call__`` signature, from one table.

Drop-in use needs each class's own classic signature: the same names in the same order with the same defaults, so a
positional caller of the classic class binds the same way (tests/test_signatures.py checks every class against the
installed diffusers). Each parameter's annotation and usual default are written once (``PARAMETERS``, ``DEFAULTS``),
runs of parameters that travel together once (``GROUPS``), and each class is one entry of ``SIGNATURES``: its classic
order, the defaults its classic class picks, its docstring. stepdiff's own ``cancel`` and ``interrupt_output`` come
last in every class.

``classic_call(name)`` builds the class's ``__call__`` the way ``dataclasses`` builds ``__init__``: it writes Python
source with the real named parameters, ``exec``s it with the defaults passed in through the namespace (never
written out as text), and registers the source with ``linecache``. So ``inspect.signature``, ``help()``, positional
binding, misspelt-keyword ``TypeError``s, tracebacks, ``inspect.getsource`` and Jupyter completion see the real
parameters. The body binds by name, ``return self._call({"prompt": prompt, ...})``, with no ``locals()``.
The annotations are the source text of the table, kept as strings as everywhere in the package
(``from __future__ import annotations``); ``typing.get_type_hints`` resolves them.

What static type checkers see: ``__call__ = classic_call("...")`` is an attribute of type ``Callable[..., Any]``, so
mypy and pyright accept any arguments and return ``Any`` (like a dataclass's ``__init__`` without its plugin): no
false errors, no checking either. Tools that import the code see everything: ``stubgen --inspect-mode`` writes
complete stubs, and ``python -m stepdiff.pipelines.signatures [ClassName ...]`` prints them straight from this table.
"""

from __future__ import annotations
import __future__

import linecache
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..control import CancelToken

__all__ = [
    "DEFAULTS", "GROUPS", "OURS", "PARAMETERS", "SIGNATURES", "Signature", "classic_call", "compile_method", "stub",
]

# Each parameter's annotation (as source text), by annotation.
_ANNOTATED = {
    "str | list[str] | None": "prompt prompt_2 prompt_3 negative_prompt negative_prompt_2 negative_prompt_3",
    "Any": "image mask_image control_image ip_adapter_image negative_ip_adapter_image callback_on_step_end",
    "torch.Tensor | None": "latents masked_image_latents prompt_embeds negative_prompt_embeds pooled_prompt_embeds"
                           " negative_pooled_prompt_embeds",
    "list[torch.Tensor] | None": "ip_adapter_image_embeds negative_ip_adapter_image_embeds",
    "torch.Generator | list[torch.Generator] | None": "generator",
    "int": "num_inference_steps num_images_per_prompt max_sequence_length",
    "int | None": "height width padding_mask_crop clip_skip",
    "list[int] | None": "timesteps skip_guidance_layers",
    "list[float] | None": "sigmas",
    "float": "strength guidance_scale true_cfg_scale eta guidance_rescale aesthetic_score negative_aesthetic_score"
             " skip_layer_guidance_scale skip_layer_guidance_stop skip_layer_guidance_start",
    "float | None": "denoising_start denoising_end mu",
    "float | list[float]": "controlnet_conditioning_scale control_guidance_start control_guidance_end",
    "bool": "return_dict guess_mode",
    "str": "output_type interrupt_output",
    "dict[str, Any] | None": "cross_attention_kwargs joint_attention_kwargs",
    "tuple[int, int] | None": "original_size target_size negative_original_size negative_target_size",
    "tuple[int, int]": "crops_coords_top_left negative_crops_coords_top_left",
    "list[str] | None": "callback_on_step_end_tensor_inputs",
    "CancelToken | None": "cancel",
}
PARAMETERS: dict[str, str] = {name: annotation for annotation, names in _ANNOTATED.items() for name in names.split()}

# The default of every parameter that has the same one in every class; a ``None``-able one without is ``None``.
DEFAULTS: dict[str, Any] = dict(
    num_images_per_prompt=1, eta=0.0, output_type="pil", return_dict=True, guidance_rescale=0.0, true_cfg_scale=1.0,
    crops_coords_top_left=(0, 0), negative_crops_coords_top_left=(0, 0), aesthetic_score=6.0,
    negative_aesthetic_score=2.5, controlnet_conditioning_scale=1.0, guess_mode=False, control_guidance_start=0.0,
    control_guidance_end=1.0, skip_layer_guidance_scale=2.8, skip_layer_guidance_stop=0.2,
    skip_layer_guidance_start=0.01, interrupt_output="denoised",
)

# Runs of parameters that stand together in the classic signatures; an entry's capitalised word expands to its run.
GROUPS = {
    "SCHEDULE": "num_inference_steps timesteps sigmas",
    "PROMPTS_2": "prompt prompt_2",
    "PROMPTS_3": "prompt prompt_2 prompt_3",
    "NEGATIVE_2": "negative_prompt negative_prompt_2",
    "NEGATIVE_3": "negative_prompt negative_prompt_2 negative_prompt_3",
    "MASK": "mask_image masked_image_latents",
    "EMBEDS": "prompt_embeds negative_prompt_embeds",
    "POOLED": "pooled_prompt_embeds negative_pooled_prompt_embeds",
    "IP_ADAPTER": "ip_adapter_image ip_adapter_image_embeds",
    "OUTPUT": "output_type return_dict",
    "CONTROLNET": "controlnet_conditioning_scale guess_mode control_guidance_start control_guidance_end",
    "MICRO": "original_size crops_coords_top_left target_size",  # SDXL size conditioning
    "NEGATIVE_MICRO": "negative_original_size negative_crops_coords_top_left negative_target_size",
    "AESTHETIC": "aesthetic_score negative_aesthetic_score",
    "CALLBACKS": "callback_on_step_end callback_on_step_end_tensor_inputs",
    "SLG": "skip_guidance_layers skip_layer_guidance_scale skip_layer_guidance_stop skip_layer_guidance_start",
    # The middles of the UNet families and the tail of Flux, after the guidance scale.
    "SD_MIDDLE": "negative_prompt num_images_per_prompt eta generator latents EMBEDS IP_ADAPTER OUTPUT",
    "SDXL_MIDDLE": "NEGATIVE_2 num_images_per_prompt eta generator latents EMBEDS POOLED IP_ADAPTER OUTPUT",
    "SD3_MIDDLE": "NEGATIVE_3 num_images_per_prompt generator latents EMBEDS POOLED OUTPUT joint_attention_kwargs"
                  " clip_skip CALLBACKS max_sequence_length",
    "FLUX_TAIL": "num_images_per_prompt generator latents prompt_embeds pooled_prompt_embeds IP_ADAPTER"
                 " negative_ip_adapter_image negative_ip_adapter_image_embeds negative_prompt_embeds"
                 " negative_pooled_prompt_embeds OUTPUT joint_attention_kwargs CALLBACKS max_sequence_length",
    "FLUX_PROMPTS": "prompt prompt_2 negative_prompt negative_prompt_2 true_cfg_scale",
}
OURS = "cancel interrupt_output"  # stepdiff's own, after every classic argument


@dataclass(frozen=True)
class Signature:
    """One class's ``__call__``: its classic order (``GROUPS`` words expand), the defaults its classic class picks
    (over ``DEFAULTS``), its docstring, and annotations that differ from ``PARAMETERS``."""

    order: str
    defaults: Mapping[str, Any]
    doc: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        words, names = f"{self.order} {OURS}".split(), []
        while words:
            word = words.pop(0)
            if word in GROUPS:
                words[:0] = GROUPS[word].split()
            elif word in PARAMETERS and word not in names:
                names.append(word)
            else:
                raise ValueError(f"{word!r} is {'repeated' if word in names else 'not a parameter or group'}")
        return names

    def parameters(self) -> list[tuple[str, str, Any]]:
        """``(name, annotation, default)`` in order."""
        out = []
        for name in self.names():
            annotation = self.annotations.get(name, PARAMETERS[name])
            if name in self.defaults or name in DEFAULTS:
                default = self.defaults[name] if name in self.defaults else DEFAULTS[name]
            elif annotation == "Any" or annotation.endswith("| None"):
                default = None
            else:
                raise ValueError(f"{name!r} needs a default")
            out.append((name, annotation, default))
        return out


_SD = {"num_inference_steps": 50, "guidance_scale": 7.5}
_SDXL = {"num_inference_steps": 50, "guidance_scale": 5.0}
_SD3 = {"num_inference_steps": 28, "guidance_scale": 7.0, "max_sequence_length": 256}
_FLUX = {"num_inference_steps": 28, "guidance_scale": 3.5, "max_sequence_length": 512}
_STEPS_OR_NONE = {"num_inference_steps": "int | None"}  # the classic image-to-image and inpainting classes say so

_SD_DOC = """Generate images. Arguments and defaults follow the classic StableDiffusionPipeline.

``callback_on_step_end(pipeline, step_index, timestep, callback_kwargs) -> dict | None`` runs after
every step with the tensors named in ``callback_on_step_end_tensor_inputs`` (default
``["latents"]``; allowed: ``_callback_tensor_inputs``). ``cancel``: a ``CancelToken`` another
thread may trigger. ``interrupt_output``: what an interrupted run decodes, ``"denoised"`` (the last
x0 estimate, a clean image; default), ``"latents"`` (the classic behaviour) or ``"finish"`` /
``"finish:N"`` (3 / N more steps on a re-timed schedule down to t = 0; ``stepdiff.finishing``).
Returns a ``StepDiffPipelineOutput``.
"""
_CONTROLNET_DOC = """Generate images following the control ``image``; see ``StableDiffusionPipeline.__call__`` for callbacks.

``controlnet_conditioning_scale``: the weight of each ControlNet's residuals (a number, or one per ControlNet);
``control_guidance_start`` / ``control_guidance_end``: the fraction of the steps each ControlNet acts on;
``guess_mode``: the ControlNets see only the conditional rows (no prompt needed to follow the image).
"""
_FLUX_DOC = """Generate images. Arguments and defaults follow the classic FluxPipeline: ``guidance_scale`` is the
distilled guidance (guidance-distilled transformers), ``true_cfg_scale`` > 1 with a ``negative_prompt`` runs
true classifier-free guidance. See ``StableDiffusionPipeline.__call__`` for the callback protocol; returns a
``StepDiffPipelineOutput``."""
_FAMILY_DOC = """Generate images. Arguments and defaults follow the classic {}.

See ``StableDiffusionPipeline.__call__`` for the callback protocol; returns a ``StepDiffPipelineOutput``.
"""
_IMG2IMG_DOC = "Generate images from ``image`` and a prompt; see ``{}.__call__`` for {}."
_INPAINT_DOC = "Inpaint ``image`` under ``mask_image``; see ``{}.__call__`` for {}."
_CONTROL_IMG2IMG_DOC = "Generate images from ``image`` and a prompt, following ``control_image``."
_CONTROL_INPAINT_DOC = """Inpaint ``image`` under ``mask_image`` following ``control_image``; see
``{}.__call__`` for the ControlNet arguments and callbacks."""

SIGNATURES: dict[str, Signature] = {
    "StableDiffusionPipeline": Signature(
        "prompt height width SCHEDULE guidance_scale SD_MIDDLE cross_attention_kwargs guidance_rescale clip_skip"
        " CALLBACKS", _SD, _SD_DOC),
    "StableDiffusionImg2ImgPipeline": Signature(
        "prompt image strength SCHEDULE guidance_scale negative_prompt num_images_per_prompt eta generator EMBEDS"
        " IP_ADAPTER OUTPUT cross_attention_kwargs clip_skip CALLBACKS",
        {**_SD, "strength": 0.8}, _IMG2IMG_DOC.format("StableDiffusionPipeline", "callbacks"), _STEPS_OR_NONE),
    "StableDiffusionInpaintPipeline": Signature(
        "prompt image MASK height width padding_mask_crop strength SCHEDULE guidance_scale SD_MIDDLE"
        " cross_attention_kwargs clip_skip CALLBACKS",
        {**_SD, "strength": 1.0}, _INPAINT_DOC.format("StableDiffusionPipeline", "callbacks"), _STEPS_OR_NONE),
    "StableDiffusionControlNetPipeline": Signature(
        "prompt image height width SCHEDULE guidance_scale SD_MIDDLE cross_attention_kwargs CONTROLNET clip_skip"
        " CALLBACKS", _SD, _CONTROLNET_DOC),
    "StableDiffusionControlNetImg2ImgPipeline": Signature(
        "prompt image control_image height width strength num_inference_steps guidance_scale SD_MIDDLE"
        " cross_attention_kwargs CONTROLNET clip_skip CALLBACKS",
        {**_SD, "strength": 0.8, "controlnet_conditioning_scale": 0.8}, _CONTROL_IMG2IMG_DOC),
    "StableDiffusionControlNetInpaintPipeline": Signature(
        "prompt image mask_image control_image height width padding_mask_crop strength num_inference_steps"
        " guidance_scale SD_MIDDLE cross_attention_kwargs CONTROLNET clip_skip CALLBACKS",
        {**_SD, "strength": 1.0, "controlnet_conditioning_scale": 0.5},
        _CONTROL_INPAINT_DOC.format("StableDiffusionControlNetPipeline")),
    "StableDiffusionXLPipeline": Signature(
        "PROMPTS_2 height width SCHEDULE denoising_end guidance_scale SDXL_MIDDLE cross_attention_kwargs"
        " guidance_rescale MICRO NEGATIVE_MICRO clip_skip CALLBACKS", _SDXL,
        _FAMILY_DOC.format("StableDiffusionXLPipeline")),
    "StableDiffusionXLImg2ImgPipeline": Signature(
        "PROMPTS_2 image strength SCHEDULE denoising_start denoising_end guidance_scale SDXL_MIDDLE"
        " cross_attention_kwargs guidance_rescale MICRO NEGATIVE_MICRO AESTHETIC clip_skip CALLBACKS",
        {**_SDXL, "strength": 0.3}, _IMG2IMG_DOC.format("StableDiffusionPipeline", "callbacks"), _STEPS_OR_NONE),
    "StableDiffusionXLInpaintPipeline": Signature(
        "PROMPTS_2 image MASK height width padding_mask_crop strength SCHEDULE denoising_start denoising_end"
        " guidance_scale SDXL_MIDDLE cross_attention_kwargs guidance_rescale MICRO NEGATIVE_MICRO AESTHETIC clip_skip"
        " CALLBACKS",
        {**_SDXL, "strength": 0.9999, "guidance_scale": 7.5},
        _INPAINT_DOC.format("StableDiffusionPipeline", "callbacks"), _STEPS_OR_NONE),
    "StableDiffusionXLControlNetPipeline": Signature(
        "PROMPTS_2 image height width SCHEDULE denoising_end guidance_scale SDXL_MIDDLE cross_attention_kwargs"
        " CONTROLNET MICRO NEGATIVE_MICRO clip_skip CALLBACKS", _SDXL,
        "Generate images following the control ``image``; see ``StableDiffusionControlNetPipeline.__call__``."),
    "StableDiffusionXLControlNetImg2ImgPipeline": Signature(
        "PROMPTS_2 image control_image height width strength num_inference_steps guidance_scale SDXL_MIDDLE"
        " cross_attention_kwargs CONTROLNET MICRO NEGATIVE_MICRO AESTHETIC clip_skip CALLBACKS",
        {**_SDXL, "strength": 0.8, "controlnet_conditioning_scale": 0.8}, _CONTROL_IMG2IMG_DOC),
    # The classic class puts IP_ADAPTER before POOLED here, and has no negative size conditioning.
    "StableDiffusionXLControlNetInpaintPipeline": Signature(
        "PROMPTS_2 image mask_image control_image height width padding_mask_crop strength num_inference_steps"
        " denoising_start denoising_end guidance_scale NEGATIVE_2 num_images_per_prompt eta generator latents EMBEDS"
        " IP_ADAPTER POOLED OUTPUT cross_attention_kwargs CONTROLNET guidance_rescale MICRO AESTHETIC clip_skip"
        " CALLBACKS",
        {**_SDXL, "strength": 0.9999}, _CONTROL_INPAINT_DOC.format("StableDiffusionXLControlNetPipeline")),
    "StableDiffusion3Pipeline": Signature(
        "PROMPTS_3 height width num_inference_steps sigmas guidance_scale SD3_MIDDLE SLG mu", _SD3,
        _FAMILY_DOC.format("StableDiffusion3Pipeline")),
    "StableDiffusion3Img2ImgPipeline": Signature(
        "PROMPTS_3 height width image strength num_inference_steps sigmas guidance_scale SD3_MIDDLE mu",
        {**_SD3, "strength": 0.6, "num_inference_steps": 50},
        _IMG2IMG_DOC.format("StableDiffusionPipeline", "callbacks"), _STEPS_OR_NONE),
    "StableDiffusion3InpaintPipeline": Signature(
        "PROMPTS_3 image MASK height width padding_mask_crop strength num_inference_steps sigmas guidance_scale"
        " SD3_MIDDLE mu",
        {**_SD3, "strength": 0.6, "num_inference_steps": 50}, _INPAINT_DOC.format("StableDiffusionPipeline", "callbacks")),
    "FluxPipeline": Signature(
        "FLUX_PROMPTS height width num_inference_steps sigmas guidance_scale FLUX_TAIL", _FLUX, _FLUX_DOC),
    "FluxImg2ImgPipeline": Signature(
        "FLUX_PROMPTS image height width strength num_inference_steps sigmas guidance_scale FLUX_TAIL",
        {**_FLUX, "strength": 0.6, "guidance_scale": 7.0}, _IMG2IMG_DOC.format("FluxPipeline", "the guidance arguments")),
    "FluxInpaintPipeline": Signature(
        "FLUX_PROMPTS image MASK height width padding_mask_crop strength num_inference_steps sigmas guidance_scale"
        " FLUX_TAIL",
        {**_FLUX, "strength": 0.6, "guidance_scale": 7.0}, _INPAINT_DOC.format("FluxPipeline", "the guidance arguments")),
}

# What the annotations name, for ``typing.get_type_hints`` on the generated functions.
_ANNOTATION_NAMES = {"Any": Any, "torch": torch, "CancelToken": CancelToken}


def _source(parameters: list[tuple[str, str, Any]]) -> str:
    """``def __call__(self, name: annotation = _default_name, ...): return self._call({"name": name, ...})``."""
    lines = ["def __call__(", "    self,"]
    lines += [f"    {name}: {annotation} = _default_{name}," for name, annotation, _ in parameters]
    lines += ["):", "    return self._call({"]
    lines += [f'        "{name}": {name},' for name, _, _ in parameters]
    lines += ["    })", ""]
    return "\n".join(lines)


def compile_method(class_name: str, source: str, namespace: dict[str, Any], doc: str | None) -> Callable[..., Any]:
    """Compile the one function in ``source`` (a method of ``class_name``) in ``namespace``, under future
    annotations, registering the source with ``linecache`` (tracebacks, ``inspect.getsource``)."""
    method = source.split("(", 1)[0].removeprefix("def ")
    filename = f"<stepdiff.pipelines.signatures {class_name}.{method}>"
    code = compile(source, filename, "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    function = namespace[method]
    function.__qualname__ = f"{class_name}.{method}"
    function.__doc__ = doc
    return function


def classic_call(class_name: str, signature: Signature | None = None, module: str | None = None) -> Callable[..., Any]:
    """The ``__call__`` of ``class_name``, from its ``SIGNATURES`` entry (or ``signature``), for ``module`` (by default
    the caller's, as ``collections.namedtuple`` does): ``__call__ = classic_call("StableDiffusionPipeline")``."""
    signature = SIGNATURES[class_name] if signature is None else signature
    module = sys._getframe(1).f_globals.get("__name__", __name__) if module is None else module
    parameters = signature.parameters()
    namespace = {"__name__": module, **_ANNOTATION_NAMES, **{f"_default_{n}": d for n, _, d in parameters}}
    return compile_method(class_name, _source(parameters), namespace, signature.doc)


def stub(class_name: str) -> str:
    """A ``.pyi`` line for the class's ``__call__``, for type checkers (defaults written ``...``, as stubs do)."""
    parameters = ", ".join(f"{n}: {a} = ..." for n, a, _ in SIGNATURES[class_name].parameters())
    return f"class {class_name}:\n    def __call__(self, {parameters}) -> Any: ..."


if __name__ == "__main__":
    print("\n\n".join(stub(name) for name in sys.argv[1:] or SIGNATURES))
