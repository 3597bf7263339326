"""Keep transformers' import-time notices out of the user's terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["quiet_transformers"]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """diffusers' pipeline modules import transformers' image processors, which warn once that
    torchvision is missing (stepdiff needs no image processor). Silence that, and only that, while
    those modules load."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
