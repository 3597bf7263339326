"""Procedural coloured-shapes dataset: one anti-aliased shape on a plain background.

Deterministic from a seed (numpy + Pillow). The caption vocabulary is fixed so prompts are
portable: "a {color} {shape} on a {background} background".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "SHAPES",
    "VOCABULARY",
    "Sample",
    "caption",
    "eval_pairs",
    "held_out_combos",
    "render",
    "sample_batch",
    "silhouette",
    "train_combos",
]

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (250, 225, 20),
    "purple": (140, 30, 170),
    "orange": (255, 130, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
VOCABULARY: tuple[str, ...] = ("a", "on", "background", *SHAPES, *COLORS)

_SUPERSAMPLE = 4
_HELD_OUT_SEED = 1234
_HELD_OUT_COUNT = 24
# Image seeds at or above this are never drawn for training; evaluation uses them.
EVAL_SEED_BASE = 10_000_000


@dataclass(frozen=True)
class Sample:
    color: str
    shape: str
    background: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side of the bounding box, pixels
    angle: float = 0.0  # rotation about the centre, degrees counter-clockwise (training data: always 0)

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c, s, b in itertools.product(COLORS, SHAPES, COLORS) if c != b]


def held_out_combos() -> list[tuple[str, str, str]]:
    """(colour, shape, background) combinations that training never sees."""
    combos = all_combos()
    rng = np.random.default_rng(_HELD_OUT_SEED)
    picked = rng.choice(len(combos), size=_HELD_OUT_COUNT, replace=False)
    return [combos[i] for i in sorted(picked)]


def train_combos() -> list[tuple[str, str, str]]:
    held = set(held_out_combos())
    return [c for c in all_combos() if c not in held]


def eval_pairs(seeds_per_combo: int = 9) -> list[tuple[tuple[str, str, str], int]]:
    """Held-out (combo, seed) pairs: 24 combos x 9 seeds = 216 by default."""
    return [
        (combo, EVAL_SEED_BASE + k * 1000 + i)
        for i, combo in enumerate(held_out_combos())
        for k in range(seeds_per_combo)
    ]


def random_sample(rng: np.random.Generator, combo: tuple[str, str, str]) -> Sample:
    size = float(rng.uniform(22, 42))
    margin = size / 2 + 2
    cx = float(rng.uniform(margin, IMAGE_SIZE - margin))
    cy = float(rng.uniform(margin, IMAGE_SIZE - margin))
    return Sample(combo[0], combo[1], combo[2], cx, cy, size)


def render(sample: Sample) -> Image.Image:
    """Draw at 4x and downsample with a box filter: anti-aliased edges."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[sample.background])
    draw = ImageDraw.Draw(image)
    s = _SUPERSAMPLE
    half = sample.size / 2 * s
    cx, cy = sample.cx * s, sample.cy * s
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLORS[sample.color]
    if sample.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif sample.shape in ("square", "triangle") and sample.angle:
        corners = ([(-1, -1), (1, -1), (1, 1), (-1, 1)] if sample.shape == "square" else [(0, -1), (1, 1), (-1, 1)])
        a = np.deg2rad(sample.angle)
        c, s_ = np.cos(a), np.sin(a)
        draw.polygon([(cx + half * (x * c + y * s_), cy + half * (-x * s_ + y * c)) for x, y in corners], fill=fill)
    elif sample.shape == "square":
        draw.rectangle(box, fill=fill)
    elif sample.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {sample.shape!r}")
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def silhouette(sample: Sample) -> Image.Image:
    """The shape's silhouette: white on black, RGB, at the image size, anti-aliased like :func:`render`
    (the control image of the shipped ControlNet)."""
    from dataclasses import replace

    image = render(replace(sample, color="white", background="black"))
    # render() uses the palette's near-white and near-black; stretch them to the full 0..255 range.
    lo, hi = COLORS["black"][0], COLORS["white"][0]
    return image.point(lambda v: max(0, min(255, round((v - lo) * 255 / (hi - lo)))))


def sample_batch(
    rng: np.random.Generator, n: int, combos: list[tuple[str, str, str]] | None = None
) -> tuple[np.ndarray, list[str]]:
    """n images as uint8 (n, 64, 64, 3) and their captions, from the training combos by default."""
    combos = train_combos() if combos is None else combos
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        sample = random_sample(rng, combos[int(rng.integers(len(combos)))])
        images[i] = np.asarray(render(sample))
        captions.append(sample.caption)
    return images, captions
