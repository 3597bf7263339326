"""Argument checks shared by every pipeline: numbers, prompts, generators, latents; CLIP tokens and row repeats."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging

from ..control import CancelToken
from ..finishing import parse_interrupt_output
from ..guidance import check_guidance_scale
from ..vocabulary import TOKENIZER_LOCK
from .callback_io import resolve_callback

__all__ = ["CallPlan", "check_call", "check_fraction", "pop_prompts", "repeat_rows", "tokenize", "warn_truncated"]

_LOGGER = diffusers_logging.get_logger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_scale(name: str, value: object, maximum: float = math.inf) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > maximum:
        allowed = "a finite number >= 0" if maximum == math.inf else f"a number in [0, {maximum}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _prompt_list(name: str, prompt: object) -> list[str] | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r} ({type(prompt).__name__})")


def _check_prompt_inputs(prompts, negatives, prompt_embeds, negative_prompt_embeds, embed_dims: int = 3) -> int:
    """Batch size from prompt or prompt_embeds; exactly one of them, and matching negatives."""
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt and prompt_embeds" + (" (got both)" if prompts else " (got neither)"))
    if prompt_embeds is not None:
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != embed_dims:
            raise ValueError(
                f"prompt_embeds must be a {embed_dims}-D tensor (batch, tokens, dim), got {_describe(prompt_embeds)}"
            )
        batch = prompt_embeds.shape[0]
    else:
        batch = len(prompts)
    if negatives is not None and negative_prompt_embeds is not None:
        raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds (got both)")
    if negatives is not None and len(negatives) != batch:
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {batch}; they must match")
    if negative_prompt_embeds is not None:
        if prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs prompt_embeds too (got a text prompt)")
        if not isinstance(negative_prompt_embeds, torch.Tensor) or negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds must have the shape of prompt_embeds {tuple(prompt_embeds.shape)}, "
                f"got {_describe(negative_prompt_embeds)}"
            )
    return batch


def pop_prompts(
    args: dict[str, Any], extra: Sequence[str] = (), pooled: bool = False, max_clip_skip: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """Pop and check a family's prompt arguments: (batch size, keyword arguments for its ``encode``).

    ``extra``: the family's other prompt names (``prompt_2``, ``negative_prompt_3``, ...), each as long
    as its base list; ``pooled``: embeddings come with pooled embeddings (SDXL, SD3).
    """
    prompts = _prompt_list("prompt", args.pop("prompt", None))
    negatives = _prompt_list("negative_prompt", args.pop("negative_prompt", None))
    embeds, negative_embeds = args.pop("prompt_embeds", None), args.pop("negative_prompt_embeds", None)
    batch = _check_prompt_inputs(prompts, negatives, embeds, negative_embeds)
    out: dict[str, Any] = dict(prompt=prompts, negative_prompt=negatives, prompt_embeds=embeds,
                               negative_prompt_embeds=negative_embeds)
    for name in extra:
        value = _prompt_list(name, args.pop(name, None))
        base = negatives if name.startswith("negative") else prompts
        if value is not None and (base is None or len(value) != len(base)):
            raise ValueError(f"{name} must match the length of {name[:-2]}, got {value!r}")
        out[name] = value
    if pooled:
        for side in ("", "negative_"):
            value = args.pop(f"{side}pooled_prompt_embeds", None)
            if out[f"{side}prompt_embeds"] is not None and value is None:
                raise ValueError(f"{side}prompt_embeds needs {side}pooled_prompt_embeds too")
            out[f"{side}pooled_prompt_embeds"] = value
    clip_skip = args.pop("clip_skip", None)
    if clip_skip is not None:
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0:
            raise ValueError(f"clip_skip must be None or a non-negative int, got {clip_skip!r}")
        if max_clip_skip is not None and clip_skip > max_clip_skip:
            raise ValueError(
                f"clip_skip={clip_skip} is larger than the text encoder allows: it has {max_clip_skip + 1} layers, "
                f"so clip_skip must be in [0, {max_clip_skip}]"
            )
    out["clip_skip"] = clip_skip
    return batch, out


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


def _check_latents(latents: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for this call, got {tuple(latents.shape)}")
    return latents


def _check_generator(generator: object, rows: int, batch_size: int, per_prompt: int) -> None:
    if isinstance(generator, list):
        wrong = sorted({type(g).__name__ for g in generator if not isinstance(g, torch.Generator)})
        if wrong:
            raise TypeError(
                f"generator must be a torch.Generator or a list of them; got a list containing {', '.join(wrong)}"
            )
        if len(generator) != rows:
            raise ValueError(
                f"generator is a list of {len(generator)} torch.Generator but this call makes {rows} images "
                f"({batch_size} prompts x num_images_per_prompt={per_prompt}); pass one per image, or a single one"
            )
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")


def tokenize(tokenizer, texts: list[str], max_length: int | None = None, logger: Any = None, reason: str | None = None,
             textual_inversion: Callable[[list[str], Any], list[str]] | None = None) -> torch.Tensor:
    """Tokens padded to the model length (or ``max_length``), as the classic pipelines do; a text longer than that is
    cut, with the classic warning on ``logger`` naming what was cut (``reason``: why; CLIP's by default).
    ``textual_inversion``: the pipeline's ``maybe_convert_prompt`` (multi-vector tokens), run first. All of it under
    ``TOKENIZER_LOCK``: one pipeline may tokenize in several threads."""
    length = max_length or tokenizer.model_max_length
    with TOKENIZER_LOCK:
        if textual_inversion is not None:
            texts = textual_inversion(texts, tokenizer)
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        warn_truncated(tokenizer, texts, length, reason or f"CLIP can only handle sequences up to {length} tokens",
                       logger)
    return ids


def warn_truncated(tokenizer, texts: list[str], length: int, reason: str, logger: Any = None) -> None:
    """The classic pipelines' warning for texts longer than ``length`` tokens, with the part that was cut (the tokens
    past ``length - 1``, before the closing special token), on ``logger`` (the classic pipeline module's logger, under
    diffusers' verbosity settings)."""
    with TOKENIZER_LOCK:
        full = tokenizer(texts, truncation=False, verbose=False).input_ids
        removed = [tokenizer.decode(ids[length - 1 : -1]) for ids in full if len(ids) > length]
    if removed:
        (logger or _LOGGER).warning(f"The following part of your input was truncated because {reason}: {removed}")


def repeat_rows(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ...) -> (B*n, ...), each prompt's rows next to each other."""
    return tensor.repeat_interleave(n, dim=0) if n > 1 else tensor


def check_fraction(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be None or a number strictly between 0 and 1, got {value!r}")
    return float(value)


@dataclass
class CallPlan:
    """A call's checked arguments that are not the family's, the kind's or a feature's (``check_call``)."""

    rows: int  # images the call makes: prompts x num_images_per_prompt
    num_images_per_prompt: int
    num_inference_steps: int | None
    timesteps: Any
    sigmas: Any
    guidance_scale: float
    guidance_rescale: float
    eta: float
    output_type: str
    interrupt_output: str
    cancel: CancelToken | None
    generator: Any
    callback: Callable | None
    tensor_names: list[str]
    latents: torch.Tensor | None


def check_scheduler(scheduler: Any) -> None:
    if scheduler is not None and not (callable(getattr(scheduler, "set_timesteps", None))
                                      and callable(getattr(scheduler, "step", None))):
        raise TypeError(f"scheduler must be a diffusers scheduler (set_timesteps and step), got {type(scheduler).__name__}")


def check_call(pipe: Any, args: dict[str, Any], call: Any, batch_size: int) -> CallPlan:
    """Pop and check the arguments every call has (size, steps, guidance, output, stop, randomness, callbacks), in
    the order their errors are reported; the size goes to ``call``."""
    height, width = args.pop("height", None), args.pop("width", None)
    height = call.height if height is None else height
    width = call.width if width is None else width
    call.height = pipe._check_size("height", pipe.default_size() if height is None else height)
    call.width = pipe._check_size("width", pipe.default_size() if width is None else width)
    timesteps, sigmas = args.pop("timesteps", None), args.pop("sigmas", None)
    num_inference_steps = args.pop("num_inference_steps", None)
    if num_inference_steps is not None or (timesteps is None and sigmas is None):
        num_inference_steps = _check_int("num_inference_steps", num_inference_steps, 1)
    per_prompt = _check_int("num_images_per_prompt", args.pop("num_images_per_prompt", 1), 1)
    guidance_scale = check_guidance_scale(args.pop("guidance_scale"))
    guidance_rescale = _check_scale("guidance_rescale", args.pop("guidance_rescale", 0.0), maximum=1.0)
    eta = args.pop("eta", 0.0)
    if not _is_real(eta) or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number, got {eta!r}")
    output_type = args.pop("output_type", "pil")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    interrupt_output = args.pop("interrupt_output", "denoised")
    parse_interrupt_output(interrupt_output)
    cancel = args.pop("cancel", None)
    if cancel is not None:
        if not isinstance(cancel, CancelToken):
            raise TypeError(f"cancel must be a stepdiff.CancelToken, got {type(cancel).__name__}")
        if cancel.cancelled:
            raise ValueError("cancel token is already cancelled; call token.reset() to reuse it")
    rows = batch_size * per_prompt
    generator = args.pop("generator", None)
    _check_generator(generator, rows, batch_size, per_prompt)
    callback, tensor_names = resolve_callback(
        pipe,
        args.pop("callback_on_step_end", None), args.pop("callback_on_step_end_tensor_inputs", None)
    )
    return CallPlan(rows, per_prompt, num_inference_steps, timesteps, sigmas, guidance_scale, guidance_rescale, eta,
                    output_type, interrupt_output, cancel, generator, callback, tensor_names, args.pop("latents", None))


def check_components(pipe: Any, args: dict[str, Any]) -> None:
    """A pipeline built without a component a call needs (``unet=None`` to run ``encode_prompt`` alone, as the
    classic pipelines allow) says which, instead of failing inside the run."""
    needed = [pipe._denoiser_name, "scheduler", *(c for part in pipe.parts() for c in part.components)]
    if args.get("output_type", "pil") != "latent" or pipe.kind.takes_image:
        needed.append("vae")
    missing = [n for n in needed if getattr(pipe, n, None) is None]
    if missing:
        raise ValueError(
            f"this {type(pipe).__name__} was built without {' and '.join(missing)}, which this call needs; "
            "build it with every component (a pipeline without them can still run encode_prompt)"
        )


def check_embedding_widths(pipe: Any, encode_kwargs: dict[str, Any]) -> None:
    width = pipe.embedding_width()
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        value = encode_kwargs.get(name)
        if width is not None and isinstance(value, torch.Tensor) and value.shape[-1] != width:
            raise ValueError(
                f"{name} has width {value.shape[-1]} (shape {tuple(value.shape)}) but this model's "
                f"{type(pipe.denoiser).__name__} takes {width}; encode with this pipeline's encode_prompt"
            )


def bind_arguments(pipe: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``steps(*args, **kwargs)`` bound to the class's ``__call__`` signature, defaults applied."""
    bound = inspect.signature(type(pipe).__call__).bind(pipe, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self")
    arguments.update(arguments.pop("kwargs", {}) or {})
    return arguments


def call_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """A ``__call__``'s ``locals()`` as the call's arguments."""
    arguments = dict(arguments)
    arguments.pop("self", None)
    arguments.pop("__class__", None)
    arguments.update(arguments.pop("kwargs", {}) or {})
    return arguments
