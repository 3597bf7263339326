"""Issue 15: VAE round-trip PSNR on held-out renders (encode, then decode), for one or more model folders.

    python benchmarks/bench_vae.py [--model DIR ...] [--images 512]

The renders use the held-out evaluation seeds (never drawn for training) and every colour/shape/background
combination. PSNR is over the whole image in [0, 1]; "worst" is the lowest per-image PSNR and "edge" the PSNR
over pixels within 2 px of a shape outline, where v1's coloured glitch lives. "decode ms" is the median
time of one 4x16x16 latent's decode (the VAE's share of an image's time), the VAEs interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import torch
from diffusers import AutoencoderKL

import stepdiff
from _common import SMOKE, table, time_interleaved
from stepdiff.shapes.dataset import EVAL_SEED_BASE, all_combos, random_sample, render


def held_out_renders(n: int, seed: int = EVAL_SEED_BASE + 777) -> np.ndarray:
    """n renders as uint8 (n, 64, 64, 3) from the evaluation seed range, all combinations in turn."""
    rng = np.random.default_rng(seed)
    combos = all_combos()
    return np.stack([np.asarray(render(random_sample(rng, combos[i % len(combos)]))) for i in range(n)])


def edge_mask(images: np.ndarray) -> np.ndarray:
    """(n, 64, 64) True within 2 px of a colour change."""
    x = images.astype(np.int16)
    change = np.zeros(images.shape[:3], dtype=bool)
    change[:, 1:, :] |= np.abs(x[:, 1:] - x[:, :-1]).sum(-1) > 0
    change[:, :, 1:] |= np.abs(x[:, :, 1:] - x[:, :, :-1]).sum(-1) > 0
    t = torch.from_numpy(change).float()[:, None]
    return (torch.nn.functional.max_pool2d(t, 5, 1, 2)[:, 0] > 0).numpy()


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Decoded(encoded mean) images as float (n, 64, 64, 3) in [0, 1]."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(y.clamp(-1, 1).add(1).div(2).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def psnr_stats(images: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    ref = images.astype(np.float64) / 255.0
    err = (recon.astype(np.float64) - ref) ** 2
    per_image = err.mean(axis=(1, 2, 3))
    mask = edge_mask(images)
    edge_mse = err.mean(-1)[mask].mean()
    # max abs error per image over pixels: the glitch shows as a few wildly wrong pixels
    return {
        "psnr": float(-10 * np.log10(err.mean())),
        "worst": float(-10 * np.log10(per_image.max())),
        "median_image": float(np.median(-10 * np.log10(per_image))),
        "edge": float(-10 * np.log10(edge_mse)),
        "max_err": float(np.sqrt(err.sum(-1)).max(axis=(1, 2)).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, help="model folder or a vae folder (repeatable)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=51, help="decode timings per VAE (interleaved)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.threads, args.repeats = 2, 1, 1
    torch.set_num_threads(args.threads)
    folders = args.model or [str(stepdiff.default_model())]
    images = held_out_renders(args.images)
    rows, vaes = [], {}
    for folder in folders:
        sub = "vae" if os.path.isdir(os.path.join(folder, "vae")) else None
        vae = vaes[folder] = AutoencoderKL.from_pretrained(folder, subfolder=sub, torch_dtype=torch.float32).eval()
        s = psnr_stats(images, round_trip(vae, images))
        rows.append([folder, f"{s['psnr']:.2f}", f"{s['median_image']:.2f}", f"{s['worst']:.2f}", f"{s['edge']:.2f}",
                     f"{s['max_err']:.3f}"])
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def decode(vae):
        def go():
            with torch.inference_mode():
                vae.decode(latent)
        return go

    t = time_interleaved({f: decode(v) for f, v in vaes.items()}, repeats=args.repeats)
    for row in rows:
        row.append(f"{t[row[0]] * 1000:.1f}")
    print(f"{args.images} held-out renders, round trip encode -> mean latent -> decode\n")
    print(table(rows, ("model", "PSNR dB", "median image dB", "worst image dB", "edge dB", "mean max px err",
                       "decode ms")))


if __name__ == "__main__":
    main()
