"""Single-file checkpoints (what A1111, ComfyUI and model sites share) and hub ids, offline.

A single ``.safetensors`` file in the original key layout holds the weights of SD 1.x/2.x (CompVis/LDM names),
SDXL (Stability's SGM names) or SD3 (MMDiT), but not the configs that diffusers' ``from_single_file`` needs:
diffusers fetches those from a hub repo (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0, ...). Here they are
derived offline instead: every size the weights fix (channels, levels, layers, attention depth, context and
embedding widths, vocabulary, latent channels) is read from the tensor shapes in the file's header, and what no
shape tells (the number of attention heads, activations, the VAE's scaling factor, the scheduler, the native
sample size) comes from the conventions of the family's released models, written down in ``_CONVENTIONS``. The
CLIP tokenizers are built from OpenAI's CLIP BPE vocabulary, shipped in ``data/bpe_simple_vocab_16e6.txt.gz``
(MIT license; the file open_clip and CLIP ship). The weights themselves are converted by diffusers' own
``from_single_file``, given the derived folder as ``config=``.

What cannot be had offline: SD3's T5 tokenizer (a SentencePiece model nobody ships in a package), so an SD3 file's
T5 encoder is left out, with a warning, unless a ``tokenizer_3`` is passed; text encoders that a file leaves out
(``sd3_medium.safetensors`` has none); SD 2.x files load as 2.1-v (v-prediction, 768 px), as in diffusers, unless
the file says otherwise (a ``v_pred`` key or ``modelspec.prediction_type`` metadata).

The package's modules, in the order a checkpoint goes through them: ``header`` (read and check the file's header),
``configs`` (derive each component's config), ``folder`` (write them as a config folder, with the tokenizers) and
``resolve`` (what ``--model`` names, and ``from_single_file``'s offline arguments).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .configs import conventions, derive_configs
from .folder import config_folder, write_clip_tokenizer, write_config_folder
from .header import PICKLE_SUFFIXES, SingleFile, inspect, read_shapes
from .resolve import download_hub_id, is_hub_id, offline_kwargs, resolve_model

__all__ = [
    "PICKLE_SUFFIXES", "SingleFile", "config_folder", "conventions", "derive_configs", "download_hub_id", "inspect",
    "is_hub_id", "model_shape", "offline_kwargs", "read_shapes", "resolve_model", "write_clip_tokenizer",
    "write_config_folder",
]


def model_shape(path: str | os.PathLike, allow_pickle: bool = False):
    """``stepdiff.limits.ModelShape`` of a checkpoint: its derived configs, and the file's size as the weights."""
    from ..limits import ModelShape

    path = Path(path)
    return replace(ModelShape.from_folder(config_folder(path, allow_pickle)), weight_bytes=path.stat().st_size)
