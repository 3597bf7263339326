"""``read_image``, which every picture taken from a file goes through: a regular file only, any bit depth and mode,
the EXIF orientation applied, one frame, and a pixel limit checked before decoding."""

from __future__ import annotations

import math
import os
import re
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image

__all__ = ["MAX_IMAGE_PIXELS", "read_image"]


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
