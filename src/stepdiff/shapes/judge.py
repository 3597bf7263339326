"""Judge a generated shapes image from its pixels: background colour, shape colour, shape type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .dataset import COLORS

__all__ = ["Verdict", "judge", "parse_caption", "shape_mask"]

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)  # (8, 3)
_ANGLES = np.deg2rad(np.arange(0, 90, 1.0))  # a rectangle's extent repeats every 90 degrees


@dataclass(frozen=True)
class Verdict:
    background: str
    color: str
    shape: str
    fill_ratio: float


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each RGB row; rgb: (..., 3)."""
    d = ((rgb[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _regions(image: Image.Image | np.ndarray) -> tuple[np.ndarray, int, int | None]:
    """(palette index per pixel, background index: the border's commonest colour, shape colour index: the
    commonest other colour, or None for a plain image)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = _nearest(pixels)  # (H, W) palette index per pixel
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    counts = np.bincount(labels[labels != bg].ravel(), minlength=len(_NAMES))
    return labels, bg, None if counts.sum() == 0 else int(counts.argmax())


def shape_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """The shape's pixels: the largest connected region of the shape's colour (all False for a plain image)."""
    labels, _, fg = _regions(image)
    if fg is None:
        return np.zeros(labels.shape, dtype=bool)
    return _largest_component(labels == fg)


def judge(image: Image.Image | np.ndarray) -> Verdict:
    labels, bg, fg = _regions(image)
    if fg is None:
        return Verdict(_NAMES[bg], "none", "none", 0.0)
    mask = labels == fg
    rows = np.flatnonzero(mask.sum(1) >= 2)  # ignore single stray pixels
    cols = np.flatnonzero(mask.sum(0) >= 2)
    if len(rows) == 0 or len(cols) == 0:
        return Verdict(_NAMES[bg], _NAMES[fg], "none", 0.0)
    mask = _largest_component(mask)
    ratio = _min_box_fill(mask)
    # Ideal fill ratios of the smallest enclosing rectangle, at any rotation: square 1.0, circle pi/4 = 0.785,
    # triangle 0.5 (the smallest rectangle around any triangle has twice its area).
    shape = "square" if ratio > 0.89 else "circle" if ratio > 0.64 else "triangle"
    return Verdict(_NAMES[bg], _NAMES[fg], shape, ratio)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of mask: stray pixels of the shape's colour elsewhere do not widen its box."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(sizes.argmax()) + 1)


def _min_box_fill(mask: np.ndarray) -> float:
    """Pixel count over the area of the smallest enclosing rectangle, searched over rotations in 1 degree steps."""
    ys, xs = np.nonzero(mask)
    xs, ys = xs.astype(np.float64), ys.astype(np.float64)
    c, s = np.cos(_ANGLES)[:, None], np.sin(_ANGLES)[:, None]
    u, v = xs * c + ys * s, ys * c - xs * s  # (angles, pixels)
    # +1: each pixel is a unit square, so a box around pixel centres is one pixel short on each axis
    areas = (u.max(1) - u.min(1) + 1) * (v.max(1) - v.min(1) + 1)
    return float(min(1.0, len(xs) / areas.min()))


def parse_caption(text: str) -> tuple[str, str, str]:
    """'a red circle on a blue background' -> ('red', 'circle', 'blue')."""
    words = text.split()
    return words[1], words[2], words[5]
