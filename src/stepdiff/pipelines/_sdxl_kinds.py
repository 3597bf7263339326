"""What SDXL's image-to-image and inpainting pipelines share: aesthetic-score micro-conditioning and
``denoising_start``, the refiner side of the base -> refiner hand-off (inpainting included); and, for their ControlNet variants,
the ControlNet pipeline's constructor and the classic name of the control images."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .run import CallInputs, Run
from .stable_diffusion_xl import StableDiffusionXLPipeline, _fraction
from .stable_diffusion_xl_controlnet import StableDiffusionXLControlNetPipeline

__all__ = ["SDXLControlNetImageMixin", "SDXLImageMixin"]


class SDXLImageMixin:
    _callback_tensor_inputs: ClassVar[list[str]] = [
        *StableDiffusionXLPipeline._callback_tensor_inputs, "add_neg_time_ids",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **StableDiffusionXLPipeline._callback_names, "add_neg_time_ids": ("uncond", "time_ids"),
    }

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    def check_prompts(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        batch, kwargs = super().check_prompts(args)  # type: ignore[misc]
        for name, default in (("aesthetic_score", 6.0), ("negative_aesthetic_score", 2.5)):
            value = args.pop(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            kwargs[name] = float(value)
        return batch, kwargs

    def time_id_lists(
        self, height, width, original_size, crops_coords_top_left, target_size, negative_original_size,
        negative_crops_coords_top_left, negative_target_size, aesthetic_score, negative_aesthetic_score,
    ) -> tuple[tuple, tuple | None]:
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        negative_original_size = negative_original_size or original_size
        negative_target_size = negative_target_size or target_size
        if self.config.get("requires_aesthetics_score", False):  # the refiner: an aesthetic score, no target size
            return (original_size + crops_coords_top_left + (aesthetic_score,),
                    negative_original_size + negative_crops_coords_top_left + (negative_aesthetic_score,))
        # As the classic image pipelines: the negative rows use the positive crop coordinates.
        return (original_size + crops_coords_top_left + target_size,
                negative_original_size + crops_coords_top_left + negative_target_size)

    def check_kind_inputs(self, args: dict[str, Any]) -> CallInputs:
        kind = super().check_kind_inputs(args)  # type: ignore[misc]
        kind.denoising_start = _fraction("denoising_start", args.pop("denoising_start", None))
        kind.add_noise = kind.denoising_start is None
        return kind

    def truncate_start(self, run: Run, steps: torch.Tensor, num_inference_steps: int, kind: CallInputs) -> torch.Tensor:
        start = kind.denoising_start
        if start is None:
            return super().truncate_start(run, steps, num_inference_steps, kind)  # type: ignore[misc]
        scheduler = run.scheduler
        train = scheduler.config.num_train_timesteps
        cutoff = round(train - start * train)
        n = int((scheduler.timesteps < cutoff).sum())
        if scheduler.order == 2 and n % 2 == 0:  # keep second-order schedulers on a whole step
            n += 1
        t_start = len(scheduler.timesteps) - n
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        return scheduler.timesteps[t_start:]


class SDXLControlNetImageMixin(SDXLImageMixin):
    """SDXL image-to-image and inpainting with ControlNets: the ControlNet pipeline's constructor (SDXLImageMixin's
    takes no controlnet), control images named ``control_image`` as in the classic pipelines (``image`` is the init
    image there; both names reach the control images in callbacks), and one size for the init and control images."""

    _control_image_name: ClassVar[str] = "control_image"
    _control_tensor_names: ClassVar[tuple[str, ...]] = ("control_image", "image")

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | MultiControlNetModel | list[ControlNetModel] | tuple[ControlNetModel, ...],
        scheduler: KarrasDiffusionSchedulers,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
    ) -> None:
        StableDiffusionXLControlNetPipeline.__init__(
            self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,  # type: ignore[arg-type]
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    def check_kind_inputs(self, args: dict[str, Any]) -> CallInputs:
        return self.match_init_image(super().check_kind_inputs(args), args)  # type: ignore[attr-defined]
