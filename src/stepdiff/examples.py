"""Example pictures for the documentation's image examples, drawn on demand and deterministic.

Every picture is 64x64, the shipped model's size, and is drawn by the shapes dataset's own renderer, so the
README's and the docs' image-to-image, inpainting and ControlNet examples run as written on a fresh machine:

    from stepdiff.examples import red_circle, background_mask
    picture, mask = red_circle(), background_mask()

or, for the command line, as files in a folder (``red-circle.png``, ``background-mask.png``, ``box-mask.png``,
``silhouette.png``):

    python -m stepdiff.examples [DIR] [--overwrite]

An existing file with other content is refused unless ``overwrite=True`` (``--overwrite``); the same picture again
is left as it is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .shapes.dataset import Sample, render
from .shapes.dataset import silhouette as _silhouette

__all__ = ["FILES", "background_mask", "box_mask", "edit_masks", "main", "red_circle", "silhouette", "write"]

RED_CIRCLE = Sample("red", "circle", "blue", 32, 32, 30)
TRIANGLE = Sample("white", "triangle", "black", 22, 24, 28)  # off-centre, so the control visibly moves the shape


def red_circle() -> Image.Image:
    """A red circle on a blue background (RGB, 64x64): the starting picture of the image examples."""
    return render(RED_CIRCLE)


def edit_masks(picture: Image.Image) -> tuple[Image.Image, Image.Image]:
    """(background mask, box mask) of a rendered one-shape picture, mode "L", white repaints.

    The background mask is white on the background and stops one pixel short of the shape; the box mask is the
    shape's bounding box grown by 4 pixels."""
    arr = np.asarray(picture.convert("RGB")).astype(int)
    shape = Image.fromarray(((np.abs(arr - arr[0, 0]).sum(-1) > 60) * 255).astype(np.uint8))
    near_shape = shape.filter(ImageFilter.MaxFilter(3))
    background = Image.fromarray(255 - np.asarray(near_shape))
    bbox = shape.getbbox()
    if bbox is None:
        raise ValueError("picture has no shape: every pixel is the colour of its top-left corner")
    left, top, right, bottom = bbox
    box = Image.new("L", picture.size, 0)
    ImageDraw.Draw(box).rectangle((left - 4, top - 4, right + 3, bottom + 3), fill=255)
    return background, box


def background_mask() -> Image.Image:
    """The mask of :func:`red_circle`'s background (white: repaint it, keep the circle)."""
    return edit_masks(red_circle())[0]


def box_mask() -> Image.Image:
    """The mask of :func:`red_circle`'s circle and a 4-pixel margin (white: repaint the shape, keep the rest)."""
    return edit_masks(red_circle())[1]


def silhouette() -> Image.Image:
    """A triangle's silhouette, white on black, left of centre: a control picture for the shipped ControlNet."""
    return _silhouette(TRIANGLE)


FILES: dict[str, Callable[[], Image.Image]] = {
    "red-circle.png": red_circle,
    "background-mask.png": background_mask,
    "box-mask.png": box_mask,
    "silhouette.png": silhouette,
}


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write(folder: str | Path = ".", overwrite: bool = False) -> list[Path]:
    """Write the example pictures into ``folder`` (made if missing) as PNG files; returns their paths.

    A file that exists with other content raises ``FileExistsError`` before anything is written, unless
    ``overwrite``; one that already holds the same picture is kept."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"folder {str(folder)!r} is a file, not a folder")
    data = {name: _png_bytes(make()) for name, make in FILES.items()}
    if not overwrite:
        for name, content in data.items():
            path = folder / name
            if path.exists() and (not path.is_file() or path.read_bytes() != content):
                raise FileExistsError(f"{str(path)!r} exists and is not the example picture (overwrite=True replaces it)")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in data.items():
        path = folder / name
        if not (path.is_file() and path.read_bytes() == content):
            temporary = path.with_name(f".{name}.tmp")
            temporary.write_bytes(content)
            temporary.replace(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stepdiff.examples",
        description="Write the documentation's example pictures (64x64 PNG): " + ", ".join(FILES) + ".")
    parser.add_argument("folder", nargs="?", default=".", help="where to write them (default: the current folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same names that differ")
    args = parser.parse_args(argv)
    try:
        paths = write(args.folder, overwrite=args.overwrite)
    except OSError as e:
        print(f"python -m stepdiff.examples: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
