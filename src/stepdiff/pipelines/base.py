"""The engine every family shares: argument checks, callbacks, the loop, decoding, output.

A family subclass supplies only what differs:
- ``encode(...)``: prompts -> conditional and unconditional conditioning (dicts of tensors);
- ``predict(latent_input, timestep, conditioning)``: one model call;
- ``_callback_names``: which callback tensor name is which conditioning tensor;
- ``decode_latents(latents)``: latents -> image tensor in [-1, 1].
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from .._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..callbacks import MultiPipelineCallbacks, adapt_classic
from ..control import CancelToken
from ..loop import LoopState, denoise, scheduler_step_kwargs
from ..output import RunRecord, StepDiffPipelineOutput

__all__ = ["StepDiffPipeline"]

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_INTERRUPT_OUTPUTS = ("denoised", "latents")


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


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


class StepDiffPipeline(DiffusionPipeline):
    """Shared engine. Subclasses: StableDiffusionPipeline, StableDiffusionXLPipeline."""

    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "denoised"]
    # callback tensor name -> ("cond" | "uncond", conditioning key)
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {}
    # model_index.json "_class_name" values this family loads
    _family_class_names: ClassVar[tuple[str, ...]] = ()
    _optional_components: ClassVar[list[str]] = []
    # Call state (set at the start of every call).
    _interrupt: bool = False
    _stop_reason: str | None = None
    _cancel: CancelToken | None = None
    _guidance_scale: float = 1.0
    # Run each model call under torch.inference_mode (see stepdiff.loop.denoise); False: plain no_grad.
    inference_mode_model_calls: bool = True
    _guidance_rescale: float = 0.0
    _num_timesteps: int = 0
    _timesteps: torch.Tensor | None = None

    # ---------------------------------------------------------------- loading

    @classmethod
    def _check_folder(cls, path: str | os.PathLike) -> str:
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
            class_name = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{str(index)!r} is not valid JSON: {e}") from e
        return class_name

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs: Any
    ):
        """Load a local folder in the standard layout (the same path real SD/SDXL weights use).

        Only safetensors weights load by default: pickle checkpoints (``.bin``) can run code when
        loaded, so a folder with only those is refused unless you pass ``allow_pickle=True`` for files
        you trust. Truncated or corrupt weight files are reported before anything loads.
        """
        class_name = cls._check_folder(pretrained_model_name_or_path)
        if cls._family_class_names and class_name not in cls._family_class_names:
            from .auto import pipeline_class_for

            right = pipeline_class_for(class_name)
            hint = f"use stepdiff.{right.__name__}" if right is not None else "this family is not supported"
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} holds a {class_name!r} model, which {cls.__name__} cannot "
                f"load: {hint} (or AutoPipelineForText2Image)"
            )
        _check_weights(Path(pretrained_model_name_or_path), allow_pickle)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            # One dtype for every component: transformers would otherwise keep the stored dtype (fp16 for
            # the shipped model) while diffusers upcasts, and the text encoder and UNet would disagree.
            kwargs["torch_dtype"] = torch.float32
        if allow_pickle:
            kwargs.setdefault("use_safetensors", None)  # diffusers: safetensors where present, else .bin
        else:
            kwargs.setdefault("use_safetensors", True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------ properties

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale; setting it (e.g. from a callback) applies from the next step."""
        return self._guidance_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        self._guidance_scale = _check_scale("guidance_scale", value)

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def timesteps(self) -> torch.Tensor | None:
        """The current call's timesteps (as the scheduler set them)."""
        return self._timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def stop(self, reason: str = "stopped by callback") -> None:
        """Stop the run before the next model call (from a callback); the classic ``_interrupt = True`` also works.

        The image is decoded from the last x0 estimate (see ``interrupt_output``); ``output.stop_reason``
        says why the run ended.
        """
        self._stop_reason = reason
        self._interrupt = True

    def _model_calls_in_inference_mode(self) -> bool:
        """Model calls run under ``torch.inference_mode`` unless turned off or unsafe.

        accelerate's offload hooks move weights inside the model call, and weights created in
        inference mode could not be edited in place afterwards (LoRA fusing, training).
        """
        if not self.inference_mode_model_calls:
            return False
        return not any(hasattr(m, "_hf_hook") for m in self.denoiser.modules())

    def _should_stop(self) -> bool:
        if self._cancel is not None and self._cancel.cancelled:
            self._stop_reason = self._cancel.reason
            self._interrupt = True
        return self._interrupt

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_processor(self) -> VaeImageProcessor:
        proc = self.__dict__.get("_image_processor")
        if proc is None:
            proc = self.__dict__["_image_processor"] = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        return proc

    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    # ----------------------------------------------------- family interface

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def encode(self, **kwargs: Any) -> Conditioning:
        raise NotImplementedError

    def predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_vae(self.vae, latents)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

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

    def scheduler_kwargs(self, height: int, width: int) -> dict[str, Any]:
        """Extra ``set_timesteps`` arguments a family needs (SD3: the resolution-dependent shift ``mu``)."""
        return {}

    def _check_size(self, name: str, value: object) -> int:
        value = _check_int(name, value, self.min_size())
        multiple = self.size_multiple()
        if value % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
        return value

    # --------------------------------------------------------------- helpers

    def _state_tensor(self, state: LoopState, name: str) -> torch.Tensor:
        if name == "latents":
            return state.latents
        if name == "denoised":
            return state.denoised
        side, key = self._callback_names[name]
        return (state.cond if side == "cond" else state.uncond)[key]

    def _apply_callback_result(self, state: LoopState, result: object, step: int, names: list[str]) -> None:
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
            if name == "denoised":  # derived each step; nothing to write back
                continue
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
            if name == "latents":
                state.latents = value
            else:
                side, key = self._callback_names[name]
                (state.cond if side == "cond" else state.uncond)[key] = value

    def _run_callback(self, fn: Callable, state: LoopState, names: list[str]) -> None:
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
        self._apply_callback_result(state, result, step, names)

    def _prepare_latents(
        self, rows: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None, latents: torch.Tensor | None,
    ) -> torch.Tensor:
        shape = (rows, self.latent_channels(), height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for this call, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        # Never in place: the caller keeps its tensor. Flow-matching schedulers start from plain noise.
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def _generate(
        self,
        *,
        batch_size: int,
        encode_kwargs: dict[str, Any],
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        guidance_scale: float,
        guidance_rescale: float,
        num_images_per_prompt: int,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        return_dict: bool,
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: list[str] | None,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        started = time.perf_counter()
        # 1. Check every argument before any model work.
        height = self._check_size("height", self.default_size() if height is None else height)
        width = self._check_size("width", self.default_size() if width is None else width)
        num_inference_steps = _check_int("num_inference_steps", num_inference_steps, 1)
        num_images_per_prompt = _check_int("num_images_per_prompt", num_images_per_prompt, 1)
        guidance_scale = _check_scale("guidance_scale", guidance_scale)
        guidance_rescale = _check_scale("guidance_rescale", guidance_rescale, maximum=1.0)
        if not _is_real(eta) or not math.isfinite(eta):
            raise ValueError(f"eta must be a finite number, got {eta!r}")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        if interrupt_output not in _INTERRUPT_OUTPUTS:
            raise ValueError(f"interrupt_output must be one of {_INTERRUPT_OUTPUTS}, got {interrupt_output!r}")
        if cancel is not None:
            if not isinstance(cancel, CancelToken):
                raise TypeError(f"cancel must be a stepdiff.CancelToken, got {type(cancel).__name__}")
            if cancel.cancelled:
                raise ValueError("cancel token is already cancelled; call token.reset() to reuse it")
        rows = batch_size * num_images_per_prompt
        if isinstance(generator, list):
            if len(generator) != rows or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"generator is a list of {len(generator)} but this call makes {rows} images "
                    f"({batch_size} prompts x num_images_per_prompt={num_images_per_prompt}); "
                    "pass one torch.Generator per image, or a single one"
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        callback, tensor_names = self._resolve_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._interrupt = False
        self._stop_reason = None
        self._cancel = cancel
        device = self._execution_device

        # 2. Timesteps; then callbacks check their settings against this run (schedule lengths, tables)
        # and may set the first step's guidance, still before any model work.
        steps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas,
            **self.scheduler_kwargs(height, width),
        )
        self._num_timesteps = len(steps)
        self._timesteps = steps
        _run_hooks(callback, "on_run_start", self)

        # 3. Encode prompts: conditional and unconditional rows, kept apart.
        conditioning = self.encode(
            device=device, num_images_per_prompt=num_images_per_prompt, height=height, width=width, **encode_kwargs
        )
        dtype = next(iter(conditioning.cond.values())).dtype

        # 4. Initial latents.
        state = LoopState(
            latents=self._prepare_latents(rows, height, width, dtype, device, generator, latents),
            cond=conditioning.cond, uncond=conditioning.uncond,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        )

        # 5. Denoise; callbacks run between steps and may steer the next one.
        loop = denoise(
            state, steps, self.scheduler, self.predict,
            scheduler_step_kwargs(self.scheduler, generator, eta),
            should_stop=self._should_stop,
            guidance_scale=lambda: self._guidance_scale,
            inference_mode=self._model_calls_in_inference_mode(),
        )
        with self.progress_bar(total=len(steps)) as bar:
            for state in loop:
                if callback is not None:
                    self._run_callback(callback, state, tensor_names)
                bar.update()
        interrupted = state.steps_completed < len(steps)
        stop_reason = (self._stop_reason or "interrupted") if interrupted else "completed"
        self._cancel = None
        _run_hooks(callback, "on_run_end", self)

        # 6. Decode. An interrupted run shows its last x0 estimate, a clean picture, unless asked otherwise.
        if output_type == "latent":
            images: Any = state.latents
        else:
            final = state.latents
            if interrupted and interrupt_output == "denoised" and state.denoised is not None:
                final = state.denoised
            images = self.image_processor.postprocess(self.decode_latents(final), output_type=output_type)
        self.maybe_free_model_hooks()

        record = RunRecord(
            steps_total=len(steps), steps_completed=state.steps_completed, interrupted=interrupted,
            stop_reason=stop_reason,
            model_calls=state.model_calls, model_rows=state.model_rows, rows_per_step=list(state.rows_per_step),
            wall_seconds=time.perf_counter() - started,
        )
        if not return_dict:
            return (images,)
        return StepDiffPipelineOutput(
            images=images, interrupted=interrupted, steps_completed=state.steps_completed, stop_reason=stop_reason,
            record=record,
        )


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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


def _run_hooks(callback: object, hook: str, pipeline: StepDiffPipeline) -> None:
    """Optional ``on_run_start(pipeline)`` / ``on_run_end(pipeline)`` methods of callbacks (and of a list's members)."""
    members = callback.callbacks if isinstance(callback, MultiPipelineCallbacks) else [callback]
    for member in members:
        fn = getattr(member, hook, None)
        if callable(fn):
            fn(pipeline)


def tokenize(tokenizer, texts: list[str], max_length: int | None = None) -> torch.Tensor:
    """CLIP-style tokens padded to the model length (or ``max_length``), as the classic pipelines do."""
    return tokenizer(
        texts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids


def repeat_rows(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ...) -> (B*n, ...), each prompt's rows next to each other."""
    return tensor.repeat_interleave(n, dim=0) if n > 1 else tensor


def decode_with_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent scaling (and shift / per-channel statistics where the VAE has them), then decode."""
    needs_upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if needs_upcast:  # fp16 VAEs that overflow decode in float32, as the classic SDXL pipeline does
        vae.to(dtype=torch.float32)
    latents = latents.to(vae.dtype)
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        c = latents.shape[1]
        mean_t = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / cfg.scaling_factor + mean_t
    else:
        latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    image = vae.decode(latents, return_dict=False)[0]
    if needs_upcast:
        vae.to(dtype=torch.float16)
    return image
