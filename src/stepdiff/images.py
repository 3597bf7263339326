"""Image helpers. Writing images: atomically, never over an existing file unless asked, with metadata other tools
read; :func:`keep_unmasked`, which pastes an inpainting run's kept pixels back; and :func:`read_image`, which every
picture taken from a file goes through.

PNG carries the popular web UIs' 'parameters' text chunk and a 'stepdiff' JSON chunk; JPEG and WebP carry
the same two in EXIF (UserComment, as the web UIs write it, and ImageDescription).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageFilter, PngImagePlugin

__all__ = [
    "IMAGE_FORMATS", "MAX_IMAGE_PIXELS", "a1111_parameters", "atomic_write", "check_writable_dir", "claim_free_paths",
    "claim_paths", "image_format", "keep_unmasked", "next_free_path", "read_image", "release_claims",
    "remove_stale_temp_files", "save_image", "save_png",
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


# The temporary names atomic_write gives an image (mkstemp: ".NAME." + 8 random characters + ".tmp").
_TEMP_NAME = re.compile(r"^\..+\.(?:png|jpe?g|webp)\.[a-z0-9_]{8}\.tmp$", re.IGNORECASE)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that image writes killed midway (``kill -9``, a power cut) left in ``folder``, and
    return them. Only for a caller that holds the folder's lock: a live write's temporary file looks the same."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except FileNotFoundError:
        return removed
    for path in entries:
        if _TEMP_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


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


# ------------------------------------------------------------------------------------------- reading

# read_image's default limit: 8192x8192, the largest side any model here takes (8 times SDXL's native size), squared.
# Pillow's own limit (an error from about 179 megapixels) would end a run as a crash, not a message.
MAX_IMAGE_PIXELS = 8192 * 8192
_FILE_KINDS = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
_FORMATS_HINT = "give a picture file (PNG, JPEG, WebP, ...)"
# Formats whose later frames are not a sequence: a camera's multi-picture JPEG (the photo, then previews or depth)
# and Photoshop's PSD (the merged picture, then its layers).
_FIRST_FRAME_IS_THE_PICTURE = {"MPO", "PSD"}


def read_image(path: str | Path, what: str = "image", mode: str = "RGB", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read the picture file ``path`` as it is displayed, fully decoded, as a PIL image of ``mode`` ("RGB", "RGBA"
    or "L"); every picture the CLI, batch runs and the studio take from a file is read here.

    - any bit depth and mode: 16-bit greyscale (PNG, TIFF, PGM) is scaled to 8 bits (50% grey reads 128, not 255),
      32-bit integer pictures are read as 16-bit, float pictures as 0-1, CMYK, palette and Lab pictures converted;
      an alpha channel is dropped for "RGB" and "L";
    - the EXIF orientation is applied: a phone photo comes out as it is displayed (and a mask drawn on it fits);
    - an animated or multi-page picture (GIF, APNG, WebP, TIFF) is refused: which frame to use is the caller's
      choice, so none is guessed (a camera's multi-picture JPEG, MPO, is its first picture, the photo; a layered
      PSD its merged picture);
    - a picture of more than ``max_pixels`` pixels is refused from its header, before it is decoded;
    - only a regular file is read: a folder, a FIFO (which would block forever) or a device is refused unopened.

    A problem raises ``FileNotFoundError``, ``IsADirectoryError``, ``PermissionError`` or ``ValueError`` whose
    message starts with ``what`` and the path (``what`` names the argument: ``"--init-image"``, ``"mask"``).
    """
    if mode not in ("RGB", "RGBA", "L"):
        raise ValueError(f"read_image mode must be 'RGB', 'RGBA' or 'L', got {mode!r}")
    name = f"{what} {str(path)!r}"
    fd = _open_regular(Path(path), name)
    with os.fdopen(fd, "rb") as f:
        image = _decode(f, name, max_pixels)
    try:
        return _to_mode(image, mode, name)
    finally:
        image.close()


def _open_regular(path: Path, name: str) -> int:
    """A read-only descriptor of ``path``, which must be a non-empty regular file (checked again once open)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} does not exist") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{name} does not exist (a part of the path is not a folder)") from None
    except OSError as e:
        raise type(e)(f"{name} cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # a NUL character in the path
        raise ValueError(f"{name} is not a valid path ({e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(f"{name} is a folder; {_FORMATS_HINT}")
    _check_regular(info, name)
    try:  # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise PermissionError(f"{name} cannot be read: permission denied") from None
    except OSError as e:
        raise type(e)(f"{name} cannot be read ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        _check_regular(info, name)
        if info.st_size == 0:
            raise ValueError(f"{name} is empty (0 bytes); {_FORMATS_HINT}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(info: os.stat_result, name: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(info.st_mode)), "special file")
        raise ValueError(f"{name} is a {kind}, not a regular file; {_FORMATS_HINT}")


def _too_big(name: str, pixels: int, max_pixels: int, size: str = "") -> ValueError:
    return ValueError(f"{name} is {size}{pixels / 1e6:,.0f} megapixels; at most {max_pixels / 1e6:,.0f} megapixels "
                      f"({math.isqrt(max_pixels)}x{math.isqrt(max_pixels)}) are read: scale it down first")


def _decode(f: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """The first picture of file ``f``, loaded, with its EXIF orientation applied; refused if animated or too big."""
    from PIL import ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here, below
        try:
            image = Image.open(f)
        except Image.DecompressionBombError as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise _too_big(name, int(found.group(1)) if found else max_pixels + 1, max_pixels) from None
        except UnidentifiedImageError:
            raise ValueError(f"{name} is not a readable picture (not a picture format Pillow knows); "
                             f"{_FORMATS_HINT}") from None
        except MemoryError:
            raise
        except Exception as e:  # a broken header raises anything from SyntaxError to struct.error
            raise _unreadable(name, e) from None
        try:
            width, height = image.size
            if width * height > max_pixels:
                raise _too_big(name, width * height, max_pixels, f"{width}x{height} pixels, ")
            try:
                frames = getattr(image, "n_frames", 1)  # GIF counts its frames by reading through them
            except MemoryError:
                raise
            except Exception as e:
                raise _unreadable(name, e) from None
            if frames > 1 and image.format not in _FIRST_FRAME_IS_THE_PICTURE:
                kind = "multi-page" if image.format == "TIFF" else "animated"
                raise ValueError(f"{name} is an {kind} {image.format} of {frames} frames; give a still picture "
                                 "(save the frame you want as PNG)")
            try:
                image.load()
            except MemoryError:
                raise
            except Exception as e:  # truncated or corrupt data
                raise _unreadable(name, e) from None
        except BaseException:
            image.close()
            raise
    try:
        turned = ImageOps.exif_transpose(image)
    except Exception as e:  # EXIF that does not parse: the picture as stored, said once
        warnings.warn(f"{name}: its EXIF data could not be read ({type(e).__name__}: {e}); its orientation is not "
                      "applied", stacklevel=3)
        return image
    if turned is not image and turned is not None:
        image.close()
        return turned
    return image


def _unreadable(name: str, e: BaseException) -> ValueError:
    return ValueError(f"{name} is not a readable picture ({type(e).__name__}: {' '.join(str(e).split())})")


def _to_mode(image: Image.Image, mode: str, name: str) -> Image.Image:
    """``image`` in ``mode`` at 8 bits a channel, whatever its own mode and depth."""
    import numpy as np

    source = image.mode
    if source.startswith("I") or source == "F":
        values = np.asarray(image).astype(np.float64)
        if source == "F":  # float pictures: 0 is black, 1 white
            values = values * 255.0
        else:  # 16-bit (and 32-bit integer) pictures: 65535 is white
            values = np.clip(values, 0, 65535) / 257.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif source == "LAB":
        from PIL import ImageCms

        image = ImageCms.profileToProfile(image, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                          outputMode="RGB")
    elif source in ("La", "RGBa"):  # premultiplied alpha
        image = image.convert("RGBA") if source == "RGBa" else Image.merge(
            "LA", [image.getchannel(0), image.getchannel(1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "palette images with transparency expressed in bytes ..."
        try:
            return image.convert(mode)
        except ValueError as e:
            raise ValueError(f"{name} is a picture of mode {source}, which cannot be converted to {mode} ({e})") from None
