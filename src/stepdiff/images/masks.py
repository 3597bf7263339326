"""``keep_unmasked``: an inpainting run's kept pixels pasted back from the original picture."""

from __future__ import annotations

import math
import numbers
from typing import Any

from PIL import Image, ImageFilter

__all__ = ["KEEP_UNMASKED_FEATHER", "keep_unmasked"]

KEEP_UNMASKED_FEATHER = 2.0  # keep_unmasked's default: the Gaussian blur radius of the mask's edge, in pixels


def _pictures(name: str, value: Any, count: int | None) -> list[Image.Image]:
    """``value`` as a list of PIL images: one image (for every generated one) or a list, one per generated image."""
    if isinstance(value, Image.Image):
        return [value] * (count or 1)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Image.Image) for v in value):
        if count is not None and len(value) not in (1, count):
            raise ValueError(f"{name} is a list of {len(value)} images but there are {count} generated images; give one "
                             "image for all of them or one per generated image")
        return list(value) * (count if count is not None and len(value) == 1 else 1)
    if not isinstance(value, (list, tuple)):
        got = type(value).__name__
    elif not value:
        got = "an empty list"
    else:
        got = "a list holding " + type(next(v for v in value if not isinstance(v, Image.Image))).__name__
    raise TypeError(f"{name} must be a PIL image or a list of them (the pipelines' default output_type='pil'), got {got}")


def _feather(feather: Any) -> float:
    if isinstance(feather, bool) or not isinstance(feather, numbers.Real):
        raise TypeError(f"feather must be a number of pixels >= 0, got {type(feather).__name__} {feather!r}")
    feather = float(feather)
    if not 0.0 <= feather < math.inf:
        raise ValueError(f"feather must be a number of pixels >= 0 (0: a hard edge), got {feather}")
    return feather


def keep_unmasked(original: Any, generated: Any, mask: Any, feather: float = KEEP_UNMASKED_FEATHER) -> Any:
    """Paste ``original``'s pixels back outside ``mask`` onto an inpainting run's ``generated`` image(s).

    Inpainting decodes the whole picture through the VAE, so the part it keeps comes back slightly changed;
    this puts the original pixels back there, as the web UIs do. ``mask`` is the run's ``mask_image``: white
    repaints, black keeps, split at half grey as the pipelines split it. Its edge is feathered by a Gaussian
    blur of radius ``feather`` pixels (0: a hard edge), so pixels near the edge blend the two; a pixel with no
    pixel of the mask's other side within ``3 * feather + 1`` rows and columns is exactly ``original``'s outside
    the mask and exactly ``generated``'s inside.

    ``generated`` is a PIL image or a list of them (``pipeline(...).images``); ``original`` and ``mask`` are
    one PIL image for all of them, or a list with one per generated image, each the size of the output. The
    result is new images, of ``generated``'s mode, in the same form (an image or a list)::

        out = inpaint(prompt, image=picture, mask_image=mask)
        images = keep_unmasked(picture, out.images, mask)
    """
    radius = _feather(feather)
    single = isinstance(generated, Image.Image)
    results = _pictures("generated", generated, None)
    originals = _pictures("original", original, len(results))
    masks = _pictures("mask", mask, len(results))
    out = []
    for i, (source, image, keep) in enumerate(zip(originals, results, masks)):
        which = "" if single else f"[{i}]"
        for name, other in (("original", source), ("mask", keep)):
            if other.size != image.size:
                raise ValueError(f"{name}{which} is {other.width}x{other.height} but generated{which} is "
                                 f"{image.width}x{image.height} (width x height); they must be the same size")
        weight = keep.convert("L").point(lambda v: 255 if v >= 128 else 0)  # as the pipelines binarize: >= 0.5 repaints
        if radius > 0:
            weight = weight.filter(ImageFilter.GaussianBlur(radius))
        source = source if source.mode == image.mode else source.convert(image.mode)
        out.append(Image.composite(image, source, weight))
    return out[0] if single else out
