"""Writing images: atomically, never over an existing file unless asked (names claimed with ``O_EXCL``), with
metadata other tools read. PNG carries the popular web UIs' 'parameters' text chunk and a 'stepdiff' JSON chunk;
JPEG and WebP carry the same two in EXIF (UserComment, as the web UIs write it, and ImageDescription)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin

__all__ = [
    "IMAGE_FORMATS", "a1111_parameters", "atomic_write", "check_writable_dir", "claim_free_paths", "claim_paths",
    "image_format", "next_free_path", "release_claims", "remove_stale_temp_files", "save_image", "save_png",
]

# Extensions --output accepts, and the Pillow format each one is written in.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_JPEG_EXIF_MAX = 65533  # one APP1 segment
_USER_COMMENT, _IMAGE_DESCRIPTION, _EXIF_IFD = 0x9286, 0x010E, 0x8769


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
