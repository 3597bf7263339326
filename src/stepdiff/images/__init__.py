"""Image helpers. Writing images: atomically, never over an existing file unless asked, with metadata other tools
read; :func:`keep_unmasked`, which pastes an inpainting run's kept pixels back; and :func:`read_image`, which every
picture taken from a file goes through.

PNG carries the popular web UIs' 'parameters' text chunk and a 'stepdiff' JSON chunk; JPEG and WebP carry
the same two in EXIF (UserComment, as the web UIs write it, and ImageDescription).
"""

from __future__ import annotations

from .masks import KEEP_UNMASKED_FEATHER, keep_unmasked
from .reading import MAX_IMAGE_PIXELS, read_image
from .writing import (
    IMAGE_FORMATS,
    a1111_parameters,
    atomic_write,
    check_writable_dir,
    claim_free_paths,
    claim_paths,
    image_format,
    next_free_path,
    release_claims,
    remove_stale_temp_files,
    save_image,
    save_png,
)

__all__ = [
    "IMAGE_FORMATS", "KEEP_UNMASKED_FEATHER", "MAX_IMAGE_PIXELS", "a1111_parameters", "atomic_write",
    "check_writable_dir", "claim_free_paths", "claim_paths", "image_format", "keep_unmasked", "next_free_path",
    "read_image", "release_claims", "remove_stale_temp_files", "save_image", "save_png",
]
