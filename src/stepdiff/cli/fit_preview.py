"""``stepdiff fit-preview``: fit a latent-to-RGB preview table for a model and store it in its folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import loading
from .common import _at_least, _check_model_folder, _check_writable_dir

MAX_FIT_COUNT = 16_384


def add_parser(sub) -> argparse.ArgumentParser:
    f = sub.add_parser("fit-preview", help="fit a latent-to-RGB preview table for a model and store it in its folder",
                       description="Encode sample images, decode them with the full VAE, and fit rgb = latents @ "
                                   "factors + bias by least squares. Writes (replaces) MODEL_DIR/latent_rgb.json.")
    f.add_argument("model", type=Path, help="model folder")
    f.add_argument("--images", type=Path, default=None,
                   help="folder of at least 4 sample images (default: procedural coloured shapes)")
    f.add_argument("--count", type=int, default=512, help=f"procedural images to fit on, 4 to {MAX_FIT_COUNT} (default 512)")

    return f


def cmd_fit_preview(args: argparse.Namespace) -> int:
    import torch

    from ..preview import FITTED_TABLE_FILE, builtin_tables, fit_latent_rgb, images_to_tensor, preview_psnr
    from ..vae import encode_images

    _check_model_folder("fit-preview MODEL", args.model)
    _check_writable_dir(f"fit-preview MODEL (writes {FITTED_TABLE_FILE})", args.model)
    files = None
    if args.images is not None:
        if not args.images.is_dir():
            raise NotADirectoryError(f"--images {str(args.images)!r} is not a folder of images")
        files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if len(files) < 4:
            raise FileNotFoundError(f"--images {str(args.images)!r} holds {len(files)} .png/.jpg/.webp images; "
                                    "at least 4 are needed (3 to fit, 1 to check)")
        from ..images import read_image
        from ..limits import ModelShape

        size = ModelShape.from_folder(args.model).native_size  # the pipeline's default size; read before it loads
        pictures = [read_image(p, what="--images:", mode="RGB").resize((size, size)) for p in files]
    else:
        _at_least("--count", args.count, 4, MAX_FIT_COUNT, " (3/4 fit the table, 1/4 check it)")
    pipe = loading.load_pipeline(args.model)
    if files is not None:
        images = images_to_tensor(pictures)
    else:
        import numpy as np

        from ..shapes.dataset import all_combos, sample_batch

        images = images_to_tensor(sample_batch(np.random.default_rng(0), args.count, all_combos())[0])
    fit_on, held_out = images[: len(images) * 3 // 4], images[len(images) * 3 // 4 :]
    table = fit_latent_rgb(pipe.vae, fit_on, name=f"fitted:{Path(args.model).name}")
    with torch.no_grad():  # as the sampler sees them: shift and latent statistics applied where the VAE has them
        latents = encode_images(pipe.vae, held_out.to(pipe.vae.device, pipe.vae.dtype), sample=False)
    print(f"{'table':<10} PSNR vs VAE decode on {len(held_out)} held-out images (dB)")
    print(f"{'fitted':<10} {preview_psnr(pipe.vae, table, latents):.2f}")
    for name, builtin in builtin_tables().items():
        if builtin.channels == table.channels:
            print(f"{name:<10} {preview_psnr(pipe.vae, builtin, latents):.2f}")
    print(table.save(args.model))
    return 0


