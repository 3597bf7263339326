"""Pictures sent to the studio (``POST /api/uploads``): read with the CLI's rules, kept as PNG in the data folder.

An upload is read by ``stepdiff.images.read_image``, the reader of every picture the CLI and batch take: any bit
depth, the EXIF orientation applied, animated pictures refused, at most ``MAX_UPLOAD_PIXELS`` pixels (refused
from the header, before decoding). What is kept is the picture as read (RGBA, 8 bits, upright), written
atomically as ``uploads/{id}.png``; a job names it by id and reads it again with ``read_image`` in the mode its
field needs (RGB for ``init_image`` and ``control``, L for ``mask``), which gives the pixels the CLI would read
from the original file. Uploads are kept while jobs may use them: deleting a job leaves them.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from .fields import UPLOAD_ID
from .spec import FieldError

__all__ = ["MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "UploadError", "Uploads", "image_from_multipart"]

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096


class UploadError(ValueError):
    """An upload that is not a picture the studio takes; ``status`` is the HTTP status (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def image_from_multipart(content_type: str, body: bytes) -> bytes:
    """The bytes of the one file part of a multipart/form-data body (any field name)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise UploadError("a multipart/form-data body without a boundary or parts; send one file part, or the "
                          "picture itself as the body with an image/* Content-Type")
    files = [part for part in message.iter_parts() if part.get_filename() is not None
             or part.get_content_type().startswith("image/")]
    if len(files) != 1:
        raise UploadError(f"a multipart upload must hold exactly one file part, this one holds {len(files)}")
    data = files[0].get_payload(decode=True)
    if not data:
        raise UploadError("the file part of the upload is empty")
    return data


class Uploads:
    """The uploads folder of a studio."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, data: bytes) -> dict[str, Any]:
        """Read ``data`` as a picture, keep it; ``{"id", "width", "height"}``. ``UploadError`` says what is wrong."""
        from ..images import read_image

        if not data:
            raise UploadError("the upload is empty: send a picture (PNG, JPEG, WebP, TIFF, ...) as the body, or one "
                              "multipart/form-data file part")
        fd, raw = tempfile.mkstemp(prefix=".upload.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                picture = read_image(raw, what="upload", mode="RGBA", max_pixels=MAX_UPLOAD_PIXELS)
            except (ValueError, OSError) as e:
                message = " ".join(str(e).replace(repr(raw), "").replace(raw, "").split())
                status = 413 if "megapixels" in message else 400
                raise UploadError(message, 415 if "cannot identify" in message or "not a picture" in message
                                  else status) from None
            upload_id = uuid.uuid4().hex
            final = self.folder / f"{upload_id}.png"
            tmp = self.folder / f".{upload_id}.png.tmp"
            picture.save(tmp, format="PNG")
            os.replace(tmp, final)
            return {"id": upload_id, "width": picture.width, "height": picture.height}
        finally:
            with contextlib.suppress(OSError):
                os.unlink(raw)

    def path(self, upload_id: str) -> Path | None:
        if not UPLOAD_ID.match(upload_id):
            return None
        path = self.folder / f"{upload_id}.png"
        return path if path.is_file() else None

    def read(self, field: str, upload_id: str, mode: str) -> Image.Image:
        """The upload as ``mode``; ``FieldError`` naming ``field`` when there is no such upload."""
        from ..images import read_image

        path = self.path(upload_id)
        if path is None:
            raise FieldError(field, upload_id, "the id of an upload of this server (POST /api/uploads answers it); "
                             "there is none with this id")
        return read_image(path, what=field, mode=mode)

