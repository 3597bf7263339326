"""The engine every pipeline shares: prepare -> steps -> finish.

- ``prepare(...)`` checks every argument, sets the timesteps on the run's own scheduler copy,
  encodes the prompts and makes the initial latents, and returns a ``Run`` holding all of the
  call's state (``stepdiff.pipelines.run``);
- iterating the run executes the shared denoising loop (``stepdiff.loop``), with the callbacks
  between steps;
- ``finish(run)`` decodes and builds the record and the output.

``__call__`` is those three; ``steps(...)`` returns the run for callers who drive the loop.

A family subclass (SD, SDXL, SD3) supplies only what differs: ``check_prompts`` (its prompt
arguments), ``encode`` (prompts -> conditional and unconditional conditioning, kept apart),
``predict`` (one model call), ``_callback_names`` (which callback tensor is which conditioning
tensor) and ``flow_matching``. A kind of run (image-to-image, inpainting: ``stepdiff.pipelines.kinds``)
supplies ``check_kind_inputs``, ``set_timesteps`` and ``initial_latents``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from .._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline as _DiffusersSD
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import USE_PEFT_BACKEND, deprecate, scale_lora_layers, unscale_lora_layers
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor

from ..callbacks import MultiPipelineCallbacks, adapt_classic
from ..control import CancelToken
from ..finishing import parse_interrupt_output
from ..guidance import ClassifierFreeGuidance, DistilledGuidance, Guidance, check_guidance_scale
from ..loop import LoopState, scheduler_step_kwargs
from ..output import RunRecord, StepDiffPipelineOutput
from ..vae import decode_latents as decode_with_vae
from .registry import REGISTRY, entry_for_class_name, pipeline_for
from .run import CallInputs, Run, current_run, remembered

__all__ = ["StepDiffPipeline", "check_folder", "decode_with_vae"]

_LOGGER = diffusers_logging.get_logger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class Conditioning:
    cond: dict[str, torch.Tensor]  # (B, ...) each, one row per image
    uncond: dict[str, torch.Tensor]


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



def check_folder(path: str | os.PathLike) -> str | None:
    """The ``_class_name`` of a local pipeline folder; a clear error for anything else."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"pretrained_model_name_or_path={str(path)!r} is not a folder; stepdiff loads local model folders "
            "(model_index.json plus one folder per component), never from a model hub"
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a pipeline folder: it has no model_index.json")
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{str(index)!r} is not valid JSON: {e}") from e


def _routed(
    name: str, doc: str, setter: Callable[[Run, Any], None] | None = None, default: Any = None,
    check: Callable[[Any], Any] | None = None,
) -> property:
    """A classic per-call attribute, routed to the run whose callback is executing in this thread.

    Outside a callback it reads the last run this thread finished on this pipeline (as the classic
    pipelines leave their attributes after a call); writes there change nothing a later run sees.
    """

    def get(self: StepDiffPipeline) -> Any:
        run = current_run(self)
        if run is not None:
            return getattr(run, name)
        return remembered(self).get(name, default)

    def set_(self: StepDiffPipeline, value: Any) -> None:
        run = current_run(self)
        if run is None or setter is None:
            if setter is None and run is not None:
                raise AttributeError(f"{name} is read-only during a run")
            remembered(self)[name] = value if check is None else check(value)
            return
        setter(run, value)

    return property(get, set_, doc=doc)


def _set_interrupt(run: Run, value: Any) -> None:
    if value:
        run.interrupt_now()
    else:
        run._interrupt = False


def _set_guidance(run: Run, value: Any) -> None:
    run.guidance_scale = value


class StepDiffPipeline(DiffusionPipeline):
    """Shared engine of every stepdiff pipeline (see the module docstring)."""

    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "denoised"]
    # callback tensor name -> ("cond" | "uncond", conditioning key)
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {}
    family: ClassVar[str] = ""  # the registry's family of this class ("sd", "sdxl", "sd3")
    flow_matching: ClassVar[bool] = False  # rectified-flow latents and x0 estimate (SD3), declared, not guessed
    _optional_components: ClassVar[list[str]] = []
    # Run each model call under torch.inference_mode (see stepdiff.loop.denoise); False: plain no_grad.
    inference_mode_model_calls: bool = True
    # Stop with a clear error when the model output or the latents turn NaN/inf (instead of a black image).
    check_finite: bool = True

    # Per-call state lives on the run; these classic names reach it from inside a callback.
    _interrupt = _routed("interrupt", "Stop flag of the current run (classic: set True in a callback).", _set_interrupt,
                         default=False)
    _guidance_scale = _routed("guidance_scale", "Guidance scale of the current run; applies from the next step.",
                              _set_guidance, default=1.0, check=check_guidance_scale)
    guidance_scale = _routed("guidance_scale", "Guidance scale of the current run; applies from the next step.",
                             _set_guidance, default=1.0, check=check_guidance_scale)
    _guidance_rescale = _routed("guidance_rescale", "Guidance rescale of the current run.", default=0.0)
    guidance_rescale = _routed("guidance_rescale", "Guidance rescale of the current run.", default=0.0)
    _num_timesteps = _routed("num_timesteps", "Number of steps of the current run.", default=0)
    num_timesteps = _routed("num_timesteps", "Number of steps of the current run.", default=0)
    timesteps = _routed("timesteps", "The current run's timesteps (as its scheduler set them).")
    interrupt = _routed("interrupt", "Whether the current run was asked to stop.", default=False)
    do_classifier_free_guidance = _routed(
        "do_classifier_free_guidance", "Whether the current run computes unconditional rows this step.", default=False
    )

    @property
    def current_run(self) -> Run | None:
        """The run whose callback is executing in this thread (None outside callbacks)."""
        return current_run(self)

    def stop(self, reason: str = "stopped by callback") -> None:
        """Stop the current run before its next model call (from a callback); ``_interrupt = True`` also works.

        The image is what ``interrupt_output`` says (by default the last x0 estimate; ``"finish"``: a few more
        steps down to t = 0); ``output.stop_reason`` says why the run ended. To stop a run from another thread,
        pass it a ``CancelToken``.
        """
        run = current_run(self)
        if run is None:
            raise RuntimeError(
                "pipeline.stop() works inside a step callback; to stop a run from another thread pass "
                "cancel=CancelToken() to the call and call token.cancel()"
            )
        run.stop(reason)

    # ---------------------------------------------------------------- loading

    @classmethod
    def _family_class_names(cls) -> tuple[str, ...]:
        return tuple(e.name for e in REGISTRY if e.family == cls.family)

    @classmethod
    def _check_folder(cls, path: str | os.PathLike) -> str | None:
        return check_folder(path)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs: Any
    ):
        """Load a local folder in the standard layout (the same path real SD/SDXL/SD3 weights use).

        A folder of the same family loads into any of its kinds (an SD text-to-image folder into
        ``StableDiffusionImg2ImgPipeline``, ...). Only safetensors weights load by default: pickle
        checkpoints (``.bin``) can run code when loaded, so a folder with only those is refused unless you
        pass ``allow_pickle=True`` for files you trust. Truncated or corrupt weight files are reported
        before anything loads.
        """
        class_name = check_folder(pretrained_model_name_or_path)
        entry = entry_for_class_name(class_name)
        if cls.family and (entry is None or entry.family != cls.family):
            right = None if entry is None else pipeline_for(entry.family, _kind_of(cls))
            hint = f"use stepdiff.{right.name}" if right is not None else "this family is not supported"
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} holds a {class_name!r} model, which {cls.__name__} cannot "
                f"load: {hint} (or AutoPipelineForText2Image)"
            )
        _check_weights(Path(pretrained_model_name_or_path), allow_pickle)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            # One dtype for every component: transformers would otherwise keep the stored dtype (fp16 for
            # the shipped model) while diffusers upcasts, and the text encoder and UNet would disagree.
            # ``dtype``, diffusers' current name: a caller's ``torch_dtype`` gets diffusers' own deprecation warning.
            kwargs["dtype"] = torch.float32
        if allow_pickle:
            kwargs.setdefault("use_safetensors", None)  # diffusers: safetensors where present, else .bin
        else:
            kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (ValueError, RuntimeError) as e:
            raise _explain_mismatch(Path(pretrained_model_name_or_path), e) from e

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike, *, allow_pickle: bool = False,
                         **kwargs: Any):
        """diffusers' ``FromSingleFileMixin.from_single_file`` (one checkpoint in the original key layout;
        ``config=`` a folder or repo with the configs), with ``from_pretrained``'s pickle rule: a ``.ckpt``/``.pt``
        /``.bin`` file is a pickle, which can run code when loaded, and is refused unless ``allow_pickle=True``.
        Only ``.safetensors`` and ``.gguf`` files load by default. Every model comes back in eval mode, as from
        ``from_pretrained`` (diffusers leaves a single-file T5 in training mode, with dropout on).

        Without ``config=`` (and ``original_config=``), a local SD 1.x/2.x, SDXL or SD3 file loads offline: the
        configs are derived from its tensor shapes and its family's conventions (``stepdiff.single_file``), the
        CLIP tokenizers are built from the CLIP vocabulary stepdiff ships; an SD3 file's T5 is left out (with a
        warning) unless ``tokenizer_3=`` is given. All models load in float32 unless ``torch_dtype`` says otherwise.
        """
        name = str(pretrained_model_link_or_path).split("?")[0].rstrip("/")
        if not allow_pickle and not name.endswith((".safetensors", ".gguf")):
            raise OSError(
                f"{str(pretrained_model_link_or_path)!r} is not a .safetensors file: diffusers reads other single "
                "files as pickles, which can run code when loaded; stepdiff loads only safetensors by default. Pass "
                "allow_pickle=True to from_single_file if you trust this file"
            )
        if "config" not in kwargs and "original_config" not in kwargs and Path(name).exists():
            from ..single_file import offline_kwargs

            kwargs, notes = offline_kwargs(name, cls, kwargs, allow_pickle)
            for note in notes:
                warnings.warn(note, UserWarning, stacklevel=2)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            kwargs["torch_dtype"] = torch.float32  # as from_pretrained: one dtype for every component
        with _without_empty_fp32_note():
            pipe = super().from_single_file(str(pretrained_model_link_or_path), **kwargs)  # type: ignore[misc]
        for component in pipe.components.values():
            # diffusers leaves a single-file T5 (SD3's text_encoder_3) in training mode: its dropout would make
            # every prompt encode differently; from_pretrained sets every model to eval mode, and so do we
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipe

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          *args: Any, allow_pickle: bool = False, **kwargs: Any) -> None:
        """diffusers' ``load_lora_weights`` (the family's LoRA loader mixin), with ``from_pretrained``'s pickle
        rule: only safetensors LoRA files load unless ``allow_pickle=True``."""
        _refuse_pickle([pretrained_model_name_or_path_or_dict], kwargs, allow_pickle, "load_lora_weights")
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name, *args, **kwargs)  # type: ignore[misc]

    def load_textual_inversion(self, pretrained_model_name_or_path, *args: Any, allow_pickle: bool = False,
                               **kwargs: Any) -> None:
        """diffusers' ``load_textual_inversion``, with ``from_pretrained``'s pickle rule: only safetensors
        embeddings (or tensors and dicts in memory) load unless ``allow_pickle=True``."""
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) else [
            pretrained_model_name_or_path]
        _refuse_pickle(sources, kwargs, allow_pickle, "load_textual_inversion")
        super().load_textual_inversion(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------ properties

    def model_calls_in_inference_mode(self) -> bool:
        """Model calls run under ``torch.inference_mode`` unless turned off or unsafe.

        accelerate's offload hooks move weights inside the model call, and weights created in
        inference mode could not be edited in place afterwards (LoRA fusing, training).
        """
        if not self.inference_mode_model_calls:
            return False
        return not any(hasattr(m, "_hf_hook") for m in self.denoiser.modules())

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        if vae is None:  # a pipeline built without its VAE (text encoders only): the classic pipelines' 8
            return 8
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def _vae_latent_channels(self) -> int:
        vae = getattr(self, "vae", None)
        return 4 if vae is None else vae.config.latent_channels

    @property
    def image_processor(self) -> VaeImageProcessor:
        """Pre- and post-processing of images (made on first use; assignable, as the classic attribute)."""
        proc = self.__dict__.get("_image_processor")
        if proc is None:
            proc = self.__dict__["_image_processor"] = VaeImageProcessor(
                vae_scale_factor=self.vae_scale_factor, vae_latent_channels=self._vae_latent_channels()
            )
        return proc

    @image_processor.setter
    def image_processor(self, value: VaeImageProcessor) -> None:
        self.__dict__["_image_processor"] = value

    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    # ----------------------------------------------------- family interface

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def check_prompts(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Pop and check the family's prompt arguments: (batch size, keyword arguments for ``encode``)."""
        raise NotImplementedError

    def encode(self, **kwargs: Any) -> Conditioning:
        raise NotImplementedError

    def predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Run):
        raise NotImplementedError

    def added_cond_extras(self, conditioning: dict) -> dict[str, Any]:
        """Extra ``added_cond_kwargs`` of the denoiser from the rows of this call (IP-Adapter image embeddings)."""
        return {}

    @contextlib.contextmanager
    def model_call_context(self, run: Run) -> Iterator[None]:
        """Held around every model call of ``run`` (IP-Adapter: the run's scales in the attention processors)."""
        yield

    def unet_extras(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Run) -> dict:
        """Extra denoiser keyword arguments for this model call, computed from its rows (ControlNet residuals)."""
        return {}

    def model_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        """Pop per-call model arguments (``cross_attention_kwargs``, ...) into the run."""
        return {}

    def make_guidance(self, guidance_scale: float, guidance_rescale: float, kind: CallInputs | None = None) -> Guidance:
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            return DistilledGuidance(guidance_scale)  # LCM and other guidance-distilled UNets
        return ClassifierFreeGuidance(guidance_scale, guidance_rescale)

    def _encode_classic(
        self, args: dict[str, Any], device, num_images_per_prompt: int, lora_scale: float | None, size: int | None = None,
    ) -> Conditioning:
        """What every family's classic ``encode_prompt`` does: the pipeline's own prompt checks and encoding,
        with ``lora_scale`` on the text encoders."""
        _, kwargs = self.check_prompts(args)
        scale = {} if lora_scale is None else {"cross_attention_kwargs": {"scale": lora_scale}}
        with self._text_lora_scale(scale):
            return self.encode(device=device or self._execution_device, num_images_per_prompt=num_images_per_prompt,
                               height=size, width=size, **kwargs)

    def add_model_conditioning(self, run: Run, dtype: torch.dtype, device: torch.device) -> None:
        """Guidance-distilled UNets take the scale as an embedding (``timestep_cond``), made once per run
        from the starting scale, as the classic pipelines do."""
        dim = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        if dim is None:
            return
        rows = run.state.latents.shape[0]
        w = torch.tensor(run.guidance.scale - 1).repeat(rows)
        embedding = _DiffusersSD.get_guidance_scale_embedding(self, w, embedding_dim=dim).to(device=device, dtype=dtype)
        run.state.cond["timestep_cond"] = run.state.uncond["timestep_cond"] = embedding

    @contextlib.contextmanager
    def _text_lora_scale(self, model_kwargs: dict[str, Any]) -> Iterator[None]:
        """LoRA scale (``cross_attention_kwargs={"scale": s}``) on the text encoders while prompts are encoded."""
        kwargs = model_kwargs.get("cross_attention_kwargs") or model_kwargs.get("joint_attention_kwargs") or {}
        scale = kwargs.get("scale")
        encoders = [getattr(self, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        encoders = [e for e in encoders if e is not None]
        if scale is None or not USE_PEFT_BACKEND or not hasattr(self, "load_lora_weights"):
            yield
            return
        for e in encoders:
            scale_lora_layers(e, scale)
        try:
            yield
        finally:
            for e in encoders:
                unscale_lora_layers(e, scale)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_vae(self.vae, latents)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    # ------------------------------------------------- kind-of-run interface

    def check_kind_inputs(self, args: dict[str, Any]) -> CallInputs:
        """Pop and check what this kind of run adds (image, mask, strength); text-to-image adds nothing."""
        return CallInputs()

    def check_kind_batch(self, kind: CallInputs, batch_size: int) -> None:
        """Once the number of prompts is known: the kind's inputs against it (ControlNet: the control images)."""

    def check_kind_rows(self, kind: CallInputs, rows: int, batch_size: int, num_images_per_prompt: int) -> None:
        """Once the call's size and number of images are known, before any model work: the kind's images against
        them (image-to-image: as many images as the call makes, or a number that divides it; inpainting: masks too)."""

    def set_timesteps(self, run: Run, num_inference_steps: int | None, timesteps, sigmas, kind: CallInputs) -> torch.Tensor:
        """Set the run's scheduler and return the timesteps the loop will run."""
        steps, num_inference_steps = retrieve_timesteps(
            run.scheduler, num_inference_steps, self._execution_device, timesteps=timesteps, sigmas=sigmas,
            **self.scheduler_kwargs(kind.height, kind.width, kind),
        )
        steps = self.truncate_start(run, steps, num_inference_steps, kind)
        return self.truncate_end(run, steps, kind)

    def truncate_start(self, run: Run, steps: torch.Tensor, num_inference_steps: int, kind: CallInputs) -> torch.Tensor:
        """Where the run starts in the schedule (image-to-image: by ``strength`` or ``denoising_start``)."""
        return steps

    def truncate_end(self, run: Run, steps: torch.Tensor, kind: CallInputs) -> torch.Tensor:
        """Where the run ends in the schedule (SDXL: ``denoising_end``)."""
        return steps

    def extend_model_input(self, latent_input: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """Extra input channels a kind adds (9-channel inpainting UNets: mask and masked-image latents)."""
        return latent_input

    def initial_latents(
        self, run: Run, rows: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None, latents: torch.Tensor | None, kind: CallInputs,
    ) -> torch.Tensor:
        """Text-to-image: scaled noise, or the caller's ``latents``."""
        shape = (rows, self.latent_channels(), height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = _check_latents(latents, shape).to(device=device, dtype=dtype)
        # Never in place: the caller keeps its tensor. Flow-matching schedulers start from plain noise.
        return latents * getattr(run.scheduler, "init_noise_sigma", 1.0)

    def denoised_for_output(self, run: Run, denoised: torch.Tensor) -> torch.Tensor:
        """The x0 estimate an interrupted run decodes (inpainting puts the known region back)."""
        return denoised

    # ---------------------------------------------------------- validation

    def _resolve_callback(
        self, callback: object, tensor_inputs: Sequence[str] | None
    ) -> tuple[Callable | None, list[str]]:
        requested = ["latents"] if tensor_inputs is None else tensor_inputs
        if isinstance(requested, str) or not all(isinstance(n, str) for n in requested):
            raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names, got {requested!r}")
        names = list(dict.fromkeys(requested))
        if callback is None:
            fn = None
        elif isinstance(callback, (list, tuple)):
            fn = MultiPipelineCallbacks([adapt_classic(cb) for cb in callback])
            for name in fn.tensor_inputs:
                if name not in names:
                    names.append(name)
        elif hasattr(callback, "tensor_inputs") and callable(callback):
            fn = adapt_classic(callback)
            names = list(dict.fromkeys(fn.tensor_inputs))  # an official callback declares its own inputs
        elif callable(callback):
            fn = callback
        else:
            raise TypeError(
                "callback_on_step_end must be a callable (pipeline, step_index, timestep, callback_kwargs) -> dict, "
                f"a PipelineCallback, or a list of them; got {callback!r} ({type(callback).__name__})"
            )
        unknown = [n for n in names if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {unknown}, which {type(self).__name__} does not provide; "
                f"allowed: {self._callback_tensor_inputs}"
            )
        return fn, names

    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return max(8, self.vae_scale_factor)

    def min_size(self) -> int:
        """The smallest size whose latents survive every down-sampling of the denoiser."""
        return max(8, self.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1))

    def scheduler_kwargs(self, height: int, width: int, kind: CallInputs | None = None) -> dict[str, Any]:
        """Extra ``set_timesteps`` arguments a family needs (SD3: the resolution-dependent shift ``mu``)."""
        return {}

    def _check_size(self, name: str, value: object) -> int:
        value = _check_int(name, value, self.min_size())
        multiple = self.size_multiple()
        if value % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
        return value

    # --------------------------------------------------------------- callbacks

    def _state_tensor(self, state: LoopState, name: str) -> torch.Tensor:
        if name == "latents":
            return state.latents
        if name == "denoised":
            return state.denoised
        side, key = self._callback_names[name]
        return (state.cond if side == "cond" else state.uncond)[key]

    def _apply_callback_result(self, state: LoopState, result: object, step: int) -> None:
        if result is None:  # "no change"; the classic library crashes here
            return
        if not isinstance(result, dict):
            raise TypeError(
                f"callback_on_step_end must return a dict (or None) but returned {type(result).__name__} at step {step}"
            )
        for name, value in result.items():
            if name not in self._callback_tensor_inputs:
                raise ValueError(
                    f"callback_on_step_end returned unknown key {name!r} at step {step}; "
                    f"allowed: {self._callback_tensor_inputs}"
                )
            current = self._state_tensor(state, name)
            if value is current:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"callback_on_step_end returned {name!r} as {type(value).__name__} at step {step}; expected a tensor"
                )
            if value.shape != current.shape:
                raise ValueError(
                    f"callback_on_step_end returned {name!r} with shape {tuple(value.shape)} at step {step}; "
                    f"expected {tuple(current.shape)}"
                )
            if value.dtype != current.dtype or value.device != current.device:
                raise ValueError(
                    f"callback_on_step_end returned {name!r} as {value.dtype} on {value.device} at step {step}; "
                    f"expected {current.dtype} on {current.device}"
                )
            if name == "denoised":  # derived each step: checked, but nothing to write back
                continue
            if name == "latents":
                state.latents = value
            else:
                side, key = self._callback_names[name]
                (state.cond if side == "cond" else state.uncond)[key] = value

    def run_step_callback(self, run: Run, fn: Callable, state: LoopState, names: list[str]) -> None:
        """Call a step callback with the tensors it asked for (``names``) and apply what it returns to the step; an
        error it raises is told where (step and timestep). Called by the run after each step."""
        step, t = state.step_index, state.timestep
        kwargs = {name: self._state_tensor(state, name) for name in names}
        try:
            result = fn(self, step, t, kwargs)
        except Exception as e:
            where = f"(raised in callback_on_step_end at step {step}, timestep {float(t):g})"
            if len(e.args) == 1 and isinstance(e.args[0], str):
                e.args = (f"{e.args[0]} {where}",)
            elif hasattr(e, "add_note"):
                e.add_note(where)
            raise
        self._apply_callback_result(state, result, step)

    # ------------------------------------------------------------ the call

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """``steps(*args, **kwargs)`` bound to this class's ``__call__`` signature, defaults applied."""
        bound = inspect.signature(type(self).__call__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        arguments.update(arguments.pop("kwargs", {}) or {})
        return arguments

    def steps(self, *args: Any, scheduler: Any = None, **kwargs: Any) -> Run:
        """Prepare a run with ``__call__``'s arguments, for callers who drive the loop themselves.

        ``scheduler``: a scheduler for this run only (a copy of it is stepped); the pipeline's own is left alone,
        so threads sharing the pipeline can each run their own (``run.run()`` finishes it as ``__call__`` does).

        ``for state in run`` executes one step per iteration (callbacks included) and yields the loop
        state (``latents``, ``denoised``, ``step_index``, ``timestep``, counters); ``run.finish()``
        decodes and returns exactly what ``__call__`` would have. Breaking out early and calling
        ``finish()`` gives the clean image of the last step reached.
        """
        return self.prepare(self._arguments(args, kwargs), scheduler=scheduler)

    def _call(self, arguments: dict[str, Any]) -> Any:
        """What every ``__call__`` does with its arguments: prepare, run every step, finish."""
        arguments = dict(arguments)
        arguments.pop("self", None)
        arguments.pop("__class__", None)
        arguments.update(arguments.pop("kwargs", {}) or {})
        return self.prepare(arguments).run()

    @torch.no_grad()
    def prepare(self, args: dict[str, Any], scheduler: Any = None) -> Run:
        """Check everything, set the timesteps, encode, make the initial latents: a ``Run`` ready to step."""
        started = time.perf_counter()
        args = dict(args)
        # 1. Check every argument before any model work.
        if scheduler is not None and not (callable(getattr(scheduler, "set_timesteps", None))
                                          and callable(getattr(scheduler, "step", None))):
            raise TypeError(f"scheduler must be a diffusers scheduler (set_timesteps and step), got {type(scheduler).__name__}")
        self._check_components(args)
        kind = self.check_kind_inputs(args)
        batch_size, encode_kwargs = self.check_prompts(args)
        self.check_kind_batch(kind, batch_size)
        self._check_embedding_widths(encode_kwargs)
        height = args.pop("height", None)
        width = args.pop("width", None)
        height = kind.height if height is None else height
        width = kind.width if width is None else width
        kind.height = self._check_size("height", self.default_size() if height is None else height)
        kind.width = self._check_size("width", self.default_size() if width is None else width)
        timesteps, sigmas = args.pop("timesteps", None), args.pop("sigmas", None)
        num_inference_steps = args.pop("num_inference_steps", None)
        if num_inference_steps is not None or (timesteps is None and sigmas is None):
            num_inference_steps = _check_int("num_inference_steps", num_inference_steps, 1)
        num_images_per_prompt = _check_int("num_images_per_prompt", args.pop("num_images_per_prompt", 1), 1)
        guidance_scale = check_guidance_scale(args.pop("guidance_scale"))
        guidance_rescale = _check_scale("guidance_rescale", args.pop("guidance_rescale", 0.0), maximum=1.0)
        eta = args.pop("eta", 0.0)
        if not _is_real(eta) or not math.isfinite(eta):
            raise ValueError(f"eta must be a finite number, got {eta!r}")
        output_type = args.pop("output_type", "pil")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        interrupt_output = args.pop("interrupt_output", "denoised")
        parse_interrupt_output(interrupt_output)
        cancel = args.pop("cancel", None)
        if cancel is not None:
            if not isinstance(cancel, CancelToken):
                raise TypeError(f"cancel must be a stepdiff.CancelToken, got {type(cancel).__name__}")
            if cancel.cancelled:
                raise ValueError("cancel token is already cancelled; call token.reset() to reuse it")
        rows = batch_size * num_images_per_prompt
        generator = args.pop("generator", None)
        _check_generator(generator, rows, batch_size, num_images_per_prompt)
        callback, tensor_names = self._resolve_callback(
            args.pop("callback_on_step_end", None), args.pop("callback_on_step_end_tensor_inputs", None)
        )
        self.check_kind_rows(kind, rows, batch_size, num_images_per_prompt)
        device = self._execution_device

        # 2. The run, with its own scheduler and guidance; timesteps; then callbacks check their settings
        # against this run (schedule lengths, tables) and may set the first step's guidance.
        scheduler = copy.deepcopy(self.scheduler if scheduler is None else scheduler)
        run = Run(
            self, scheduler=scheduler, timesteps=torch.empty(0),
            guidance=self.make_guidance(guidance_scale, guidance_rescale, kind),
            cancel=cancel, callback=callback, tensor_names=tensor_names, output_type=output_type,
            return_dict=args.pop("return_dict", True), interrupt_output=interrupt_output,
            step_kwargs=scheduler_step_kwargs(scheduler, generator, eta), model_kwargs=self.model_kwargs(args),
            started=started,
        )
        try:
            run.timesteps = self.set_timesteps(run, num_inference_steps, timesteps, sigmas, kind)
            if len(run.timesteps) == 0:
                raise ValueError("this call has no denoising step to run (check strength / denoising_start)")
            run.guidance.start(len(run.timesteps))
            with run.bound():
                run_hooks(callback, "on_run_start", self)

            # 3. Encode prompts: conditional and unconditional rows, kept apart.
            with self._text_lora_scale(run.model_kwargs):
                conditioning = self.encode(
                    device=device, num_images_per_prompt=num_images_per_prompt, height=kind.height, width=kind.width,
                    **encode_kwargs,
                )
            dtype = next(iter(conditioning.cond.values())).dtype

            # 4. Initial latents (noise, or the image's latents noised to the first timestep).
            latents = self.initial_latents(
                run, rows, kind.height, kind.width, dtype, device, generator, args.pop("latents", None), kind
            )
            run.state = LoopState(
                latents=latents, cond=conditioning.cond, uncond=conditioning.uncond, guidance_scale=run.guidance.scale,
            )
            self.add_model_conditioning(run, dtype, device)
            self.add_kind_conditioning(run, kind, dtype, device, generator)
        except BaseException:
            run.compute.free()  # a refused or failed start leaves no block of the model wrapped
            raise
        return run

    def _check_components(self, args: dict[str, Any]) -> None:
        """A pipeline built without a component a call needs (``unet=None`` to run ``encode_prompt`` alone, as the
        classic pipelines allow) says which, instead of failing inside the run."""
        needed = [self._denoiser_name, "scheduler", *self._call_components]
        from .kinds import Image2ImageRun

        if args.get("output_type", "pil") != "latent" or isinstance(self, Image2ImageRun):
            needed.append("vae")
        missing = [n for n in needed if getattr(self, n, None) is None]
        if missing:
            raise ValueError(
                f"this {type(self).__name__} was built without {' and '.join(missing)}, which this call needs; "
                "build it with every component (a pipeline without them can still run encode_prompt)"
            )

    _denoiser_name: ClassVar[str] = "unet"
    _call_components: ClassVar[tuple[str, ...]] = ()  # further components every call needs (ControlNet: controlnet)

    def embedding_width(self) -> int | None:
        """The width the denoiser's cross-attention takes (what ``prompt_embeds`` must have)."""
        cfg = self.denoiser.config
        width = getattr(cfg, "joint_attention_dim", None) or getattr(cfg, "cross_attention_dim", None)
        return width if isinstance(width, int) else None

    def _check_embedding_widths(self, encode_kwargs: dict[str, Any]) -> None:
        width = self.embedding_width()
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            value = encode_kwargs.get(name)
            if width is not None and isinstance(value, torch.Tensor) and value.shape[-1] != width:
                raise ValueError(
                    f"{name} has width {value.shape[-1]} (shape {tuple(value.shape)}) but this model's "
                    f"{type(self.denoiser).__name__} takes {width}; encode with this pipeline's encode_prompt"
                )

    def add_kind_conditioning(self, run: Run, kind: CallInputs, dtype, device, generator) -> None:
        """Per-row conditioning a kind of run adds (inpainting's mask and masked-image latents)."""

    @torch.no_grad()
    def finish(self, run: Run) -> Any:
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
                final, stop_output = self.denoised_for_output(run, state.denoised), "denoised"
        if run.output_type == "latent":
            images: Any = final
        else:
            images = self.image_processor.postprocess(self.decode_latents(final), output_type=run.output_type)
        self.maybe_free_model_hooks()
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
        remembered(self).update(
            guidance_scale=run.guidance.scale, guidance_rescale=run.guidance_rescale, num_timesteps=run.num_timesteps,
            timesteps=run.timesteps, interrupt=run.interrupt, do_classifier_free_guidance=run.do_classifier_free_guidance,
        )
        if not run.return_dict:
            return (images,)
        return StepDiffPipelineOutput(
            images=images, interrupted=interrupted, steps_completed=state.steps_completed, stop_reason=stop_reason,
            record=record,
        )


def normalize_legacy_configs(scheduler: Any, unet: Any) -> None:
    """What the classic SD constructor fixes in old configs, with the same deprecation warnings:
    ``steps_offset`` 1, ``clip_sample`` False, and ``sample_size`` 64 for pre-0.9 UNet configs below 64."""
    from packaging import version

    cfg = getattr(scheduler, "config", None)
    if cfg is not None and hasattr(cfg, "steps_offset") and cfg.steps_offset != 1:
        deprecate("steps_offset!=1", "1.0.0", f"The scheduler config of {type(scheduler).__name__} has steps_offset="
                  f"{cfg.steps_offset}; it should be 1. stepdiff (like the classic pipeline) uses 1.", standard_warn=False)
        scheduler._internal_dict = FrozenDict({**dict(cfg), "steps_offset": 1})
    cfg = getattr(scheduler, "config", None)
    if cfg is not None and getattr(cfg, "clip_sample", False) is True:
        deprecate("clip_sample not set", "1.0.0", f"The scheduler config of {type(scheduler).__name__} sets clip_sample"
                  "=True; it should be False for Stable Diffusion. stepdiff (like the classic pipeline) uses False.",
                  standard_warn=False)
        scheduler._internal_dict = FrozenDict({**dict(cfg), "clip_sample": False})
    ucfg = getattr(unet, "config", None)
    old = ucfg is not None and hasattr(ucfg, "_diffusers_version") and (
        version.parse(version.parse(ucfg._diffusers_version).base_version) < version.parse("0.9.0.dev0"))
    if old and isinstance(getattr(ucfg, "sample_size", None), int) and ucfg.sample_size < 64:
        deprecate("sample_size<64", "1.0.0", "The UNet config sets sample_size below 64, which fits none of the SD 1.x "
                  "checkpoints; stepdiff (like the classic pipeline) uses 64.", standard_warn=False)
        unet._internal_dict = FrozenDict({**dict(ucfg), "sample_size": 64})


def _explain_mismatch(folder: Path, error: Exception) -> Exception:
    """A weight whose shape does not fit its component's config: name the config.json to check."""
    import re

    from safetensors import safe_open

    match = re.search(r"(?:because|for) (\S+?):? (?:expected shape|size mismatch)", str(error))
    if match is None:
        return error
    key = match.group(1)
    for weights in sorted(folder.glob("*/*.safetensors")):
        with safe_open(weights, "pt") as f:
            if key in f.keys():
                component = weights.parent.name
                return ValueError(
                    f"{str(folder / component / 'config.json')!r} does not match the weights in {component}/: "
                    f"{key} has another shape than that config describes ({str(error).split('. ')[0]})"
                )
    return error


def _kind_of(cls: type) -> str:
    for e in REGISTRY:
        if e.name == cls.__name__:
            return e.kind
    return "text2image"


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


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@contextlib.contextmanager
def _without_empty_fp32_note() -> Iterator[None]:
    """diffusers' single-file loader casts each model to ``torch_dtype`` with ``.to()``, and warns for every model that
    "modules ... should be kept in float32: []" even when there are none; that empty note is dropped."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "should be kept in float32: []" not in record.getMessage()

    logger, drop = logging.getLogger("diffusers.models.modeling_utils"), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    """Every component folder that model_index.json lists exists, and its weights are readable."""
    from safetensors import safe_open

    index = json.loads((folder / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{str(folder)!r} lists component {name!r} in model_index.json but has no {name}/ folder")
        safetensors = sorted(sub.glob("*.safetensors"))
        for path in safetensors:
            try:
                with safe_open(path, "pt"):
                    pass
            except Exception as e:
                raise OSError(f"weights file {str(path)!r} is truncated or corrupt ({e})") from None
        pickles = [p for p in sorted(sub.iterdir()) if p.suffix in _PICKLE_SUFFIXES]
        if pickles and not safetensors and not allow_pickle:
            raise OSError(
                f"{str(pickles[0])!r} is a pickle checkpoint, which can run code when loaded; stepdiff loads only "
                "safetensors by default. Pass allow_pickle=True to from_pretrained (CLI: --allow-pickle) if you "
                "trust this file"
            )


def _refuse_pickle(sources: list, kwargs: dict[str, Any], allow_pickle: bool, loader: str) -> None:
    """Refuse a pickle file named by a loader's source or ``weight_name``; otherwise make diffusers' loaders
    look for safetensors only (by default they fall back to a pickle ``.bin`` when there is none)."""
    if allow_pickle:
        return
    names = [kwargs.get("weight_name")] + [s for s in sources if isinstance(s, (str, os.PathLike))]
    for name in names:
        if name is not None and Path(str(name)).suffix in _PICKLE_SUFFIXES:
            raise OSError(
                f"{str(name)!r} is a pickle file, which can run code when loaded; stepdiff loads only safetensors by "
                f"default. Pass allow_pickle=True to {loader} if you trust this file"
            )
    if kwargs.get("use_safetensors") is False:
        raise OSError(f"use_safetensors=False loads pickle files; pass allow_pickle=True to {loader} as well")
    kwargs["use_safetensors"] = True


def run_hooks(callback: object, hook: str, pipeline: StepDiffPipeline) -> None:
    """Optional ``on_run_start(pipeline)`` / ``on_run_end(pipeline)`` methods of callbacks (and of a list's members)."""
    members = callback.callbacks if isinstance(callback, MultiPipelineCallbacks) else [callback]
    for member in members:
        fn = getattr(member, hook, None)
        if callable(fn):
            fn(pipeline)


def tokenize(tokenizer, texts: list[str], max_length: int | None = None, logger: Any = None) -> torch.Tensor:
    """CLIP-style tokens padded to the model length (or ``max_length``), as the classic pipelines do; a text
    longer than that is cut, with the classic warning on ``logger`` naming what was cut."""
    length = max_length or tokenizer.model_max_length
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    warn_truncated(tokenizer, texts, length, f"CLIP can only handle sequences up to {length} tokens", logger)
    return ids


def warn_truncated(tokenizer, texts: list[str], length: int, reason: str, logger: Any = None) -> None:
    """The classic pipelines' warning for texts longer than ``length`` tokens, with the part that was cut (the tokens
    past ``length - 1``, before the closing special token), on ``logger`` (the classic pipeline module's logger, under
    diffusers' verbosity settings)."""
    full = tokenizer(texts, truncation=False, verbose=False).input_ids
    removed = [tokenizer.decode(ids[length - 1 : -1]) for ids in full if len(ids) > length]
    if removed:
        (logger or _LOGGER).warning(f"The following part of your input was truncated because {reason}: {removed}")


def repeat_rows(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ...) -> (B*n, ...), each prompt's rows next to each other."""
    return tensor.repeat_interleave(n, dim=0) if n > 1 else tensor
