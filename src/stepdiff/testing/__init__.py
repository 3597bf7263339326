"""Tiny random SD / SDXL pipelines in the standard folder layout, built offline.

Used by the test suite, the benchmarks and ``stepdiff tiny-model``. The folders hold
model_index.json, one folder per component and real tokenizer files, and load through
``from_pretrained`` like real weights (and through diffusers' own pipelines, for parity checks).

The package's modules: ``pipelines`` (the tiny pipeline folders), ``adapters`` (ControlNet, IP-Adapter, preview
decoder), ``ldm_layout`` and ``checkpoint`` (a folder written as one single-file checkpoint) and ``standard`` (tiny
pipelines that load from a single file by convention).
"""

from __future__ import annotations

from .adapters import make_tiny_controlnet, make_tiny_ip_adapter, make_tiny_preview_decoder
from .checkpoint import save_single_file
from .pipelines import TINY_WORDS, make_tiny_flux, make_tiny_sd, make_tiny_sd3, make_tiny_sdxl
from .standard import make_tiny_standard

__all__ = [
    "TINY_WORDS", "make_tiny_controlnet", "make_tiny_flux", "make_tiny_ip_adapter", "make_tiny_preview_decoder",
    "make_tiny_sd", "make_tiny_sd3", "make_tiny_sdxl", "make_tiny_standard", "save_single_file",
]
