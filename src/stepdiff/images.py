"""Image helpers. Writing images: atomically, never over an existing file unless asked, with metadata other tools
read; and :func:`keep_unmasked`, which pastes an inpainting run's kept pixels back.

PNG carries the popular web UIs' 'parameters' text chunk and a 'stepdiff' JSON chunk; JPEG and WebP carry
the same two in EXIF (UserComment, as the web UIs write it, and ImageDescription).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageFilter, PngImagePlugin

__all__ = [
    "IMAGE_FORMATS", "a1111_parameters", "atomic_write", "check_writable_dir", "claim_free_paths", "claim_paths",
    "image_format", "keep_unmasked", "next_free_path", "release_claims", "save_image", "save_png",
]

# Extensions --output accepts, and the Pillow format each one is written in.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_JPEG_EXIF_MAX = 65533  # one APP1 segment
_USER_COMMENT, _IMAGE_DESCRIPTION, _EXIF_IFD = 0x9286, 0x010E, 0x8769
KEEP_UNMASKED_FEATHER = 2.0  # keep_unmasked's default: the Gaussian blur radius of the mask's edge, in pixels


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write whole or not at all: ``write(file)`` into a temporary file in the same folder, then an
    atomic rename. The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def a1111_parameters(prompt: str, negative: str | None, fields: dict[str, Any]) -> str:
    """The 'parameters' text chunk as the popular web UIs write it."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def image_format(path: str | Path, what: str = "--output") -> str:
    """The Pillow format for ``path``'s extension; an extension we can't write with metadata is refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{what} must end in {', '.join(IMAGE_FORMATS)}, got {str(path)!r}")
    return IMAGE_FORMATS[suffix]


def _exif(parameters: str | None, record: dict[str, Any] | None) -> Image.Exif:
    exif = Image.Exif()
    if record is not None:
        exif[_IMAGE_DESCRIPTION] = json.dumps(record, sort_keys=True)  # ASCII: non-ASCII is escaped
    if parameters is not None:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    return exif


def save_image(image: Image.Image, path: str | Path, parameters: str, record: dict[str, Any]) -> Path:
    """Write ``image`` atomically in the format its extension names (PNG, JPEG, WebP), with both metadata parts.

    JPEG holds at most 64 KiB of EXIF: when both parts don't fit, the JSON record is left out, then the
    parameters too, with a warning (a prompt of tens of thousands of characters).
    """
    fmt = image_format(path)
    if fmt == "PNG":
        return save_png(image, path, parameters, record)
    exif = _exif(parameters, record)
    if fmt == "JPEG" and len(exif.tobytes()) > _JPEG_EXIF_MAX:
        exif, lost = _exif(parameters, None), "the stepdiff record"
        if len(exif.tobytes()) > _JPEG_EXIF_MAX:
            exif, lost = Image.Exif(), "any metadata"
        warnings.warn(f"the metadata is too long for JPEG's 64 KiB EXIF; {path} is written without {lost}", stacklevel=2)
    kwargs = {"quality": 95}
    return atomic_write(path, lambda f: image.convert("RGB").save(f, format=fmt, exif=exif, **kwargs))


def save_png(image: Image.Image, path: str | Path, parameters: str, record: dict[str, Any]) -> Path:
    """A PNG with a 'parameters' text chunk and a 'stepdiff' JSON chunk, written atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("stepdiff", json.dumps(record, sort_keys=True))
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def check_writable_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what}: folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what}: {str(path)!r} is not a folder")
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{what}: folder {str(path)!r} is not writable")


def next_free_path(folder: Path, stem: str, count: int) -> list[Path]:
    """``count`` paths stem-00001.png, ... that don't exist yet (a snapshot: see ``claim_free_paths`` to reserve them)."""
    n, out = 1, []
    while len(out) < count:
        candidate = folder / f"{stem}-{n:05d}.png"
        if not candidate.exists():
            out.append(candidate)
        n += 1
    return out


def _claim(path: Path) -> bool:
    """Create ``path`` empty if no file has that name; atomic, so two processes never both get it."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        return False
    return True


def claim_free_paths(folder: Path, stem: str, count: int, suffix: str = ".png") -> list[Path]:
    """Reserve ``count`` free names stem-00001.png, ... (gaps are filled) by creating each one empty with
    ``O_CREAT | O_EXCL``: concurrent runs in one folder never get the same name. The image later replaces
    its placeholder atomically (``atomic_write``); ``release_claims`` removes the ones never written."""
    n, out = 1, []
    try:
        while len(out) < count:
            candidate = folder / f"{stem}-{n:05d}{suffix}"
            if _claim(candidate):
                out.append(candidate)
            n += 1
    except BaseException:
        release_claims(out)
        raise
    return out


def claim_paths(paths: list[Path], what: str = "--output") -> list[Path]:
    """Reserve exactly these names (see ``claim_free_paths``); an existing file is refused, and nothing is kept."""
    out: list[Path] = []
    for path in paths:
        if not _claim(path):
            release_claims(out)
            raise FileExistsError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it")
        out.append(path)
    return out


def release_claims(paths: list[Path]) -> None:
    """Remove placeholders that were never written (still empty), e.g. after an error or an abort."""
    for path in paths:
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()


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
