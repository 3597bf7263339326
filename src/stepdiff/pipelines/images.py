"""Image arguments of the kinds and features: checked, measured, preprocessed, counted against the call's rows."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

__all__ = ["check_strength"]

_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor, list)


def check_strength(value: object, steps: int | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"strength must be a number in (0, 1], got {value!r} ({type(value).__name__})")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"strength must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_image(name: str, image: object) -> None:
    if image is None:
        raise ValueError(f"{name} is required for this pipeline (a PIL image, numpy array, tensor or a list of them)")
    if not isinstance(image, _IMAGE_TYPES) or (isinstance(image, list) and not image):
        raise TypeError(
            f"{name} must be a PIL image, a numpy array, a torch tensor or a non-empty list of them, "
            f"got {type(image).__name__}"
        )


def _image_size(image: object) -> tuple[int, int] | None:
    """(height, width) of an image argument before preprocessing, where it can be told."""
    first = image[0] if isinstance(image, list) else image
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, torch.Tensor) and first.ndim >= 2:
        return tuple(first.shape[-2:])  # type: ignore[return-value]
    if isinstance(first, np.ndarray) and first.ndim >= 2:
        return (first.shape[-3], first.shape[-2]) if first.ndim >= 3 and first.shape[-1] in (1, 3, 4) else first.shape[:2]
    return None


def _preprocess(processor: VaeImageProcessor, name: str, image: object, **kwargs: Any) -> torch.Tensor:
    try:
        return processor.preprocess(image, **kwargs)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name} could not be read as an image: {e}") from None


def _check_count(name: str, what: str, count: int, rows: int, batch_size: int, per_prompt: int) -> None:
    """An image argument holds as many images as the call makes, or a number that divides it (each then serves
    ``rows // count`` images, the classic duplication); anything else is refused before any model work."""
    if count < 1 or rows % count:
        allowed = f"give 1 {what}" if rows == 1 else f"give 1 {what}, one per image ({rows}), or a number that divides {rows}"
        raise ValueError(
            f"{name} holds {count} {what}{'s' if count != 1 else ''} but this call makes {rows} image"
            f"{'s' if rows != 1 else ''} ({batch_size} prompt{'s' if batch_size != 1 else ''} x num_images_per_prompt="
            f"{per_prompt}); {allowed}"
        )


def _is_latents(image: object, channels: int) -> bool:
    """An image argument given as VAE latents: a tensor (C, h, w) or (B, C, h, w) with the VAE's latent channels
    (the image processor passes them through unchanged)."""
    return isinstance(image, torch.Tensor) and (
        (image.ndim == 4 and image.shape[1] == channels) or (image.ndim == 3 and image.shape[0] == channels)
    )


def _repeat_to(latents: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """The classic duplication: the whole batch again, until it has ``rows`` rows."""
    if rows > latents.shape[0]:
        if rows % latents.shape[0]:
            raise ValueError(f"{name} has {latents.shape[0]} images, which does not divide the {rows} images of this call")
        return torch.cat([latents] * (rows // latents.shape[0]))
    return latents
