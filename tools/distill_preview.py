"""Distil a tiny preview decoder (diffusers ``AutoencoderTiny``, the TAESD architecture) from a model's VAE.

    python -m tools.distill_preview MODEL_DIR --out RUN_DIR [--steps 5000] [--threads 1]
    python -m tools.distill_preview MODEL_DIR --out RUN_DIR --install   # also copy into MODEL_DIR/preview_decoder

The student learns the VAE decoder: latents as the sampler sees them (scaled) -> the VAE's decoded image,
on latents of procedural shapes images and on noisy, shrunk copies of them (previews decode x0 estimates,
which are blurry early in a run). Its encoder is distilled too (image -> scaled latents), so the folder is
a complete AutoencoderTiny. Fixed seed; a checkpoint every ``checkpoint_every`` steps, resumed when run
again with the same --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from tqdm.auto import tqdm

from stepdiff.preview import PREVIEW_DECODER_DIR
from stepdiff.shapes.dataset import EVAL_SEED_BASE, all_combos, sample_batch

__all__ = ["DistillConfig", "build_preview_decoder", "distill", "preview_fidelity"]


@dataclass
class DistillConfig:
    seed: int = 0
    threads: int = 1
    width: int = 16  # channels at every level (AutoencoderTiny keeps one width)
    decoder_blocks: tuple[int, ...] = (1, 1, 0)  # residual blocks per level; none at full resolution (cost)
    encoder_blocks: tuple[int, ...] = (0, 1, 1)  # none at full resolution (cost)
    num_images: int = 4000  # latents whose VAE decodes are precomputed as targets
    perturbed_fraction: float = 0.5  # of those, shrunk + noised copies, like early x0 estimates
    steps: int = 5000
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    encoder_weight: float = 1.0
    checkpoint_every: int = 500
    eval_images: int = 256  # held-out renders for the fidelity report

    def smoke_version(self) -> DistillConfig:
        return dataclasses.replace(self, num_images=16, steps=3, batch=4, warmup=1, checkpoint_every=2, eval_images=4)


def build_preview_decoder(cfg: DistillConfig, latent_channels: int, scale_factor: int) -> AutoencoderTiny:
    levels = int(math.log2(scale_factor)) + 1
    if 2 ** (levels - 1) != scale_factor:
        raise ValueError(f"scale_factor must be a power of two, got {scale_factor}")
    if len(cfg.decoder_blocks) != levels or len(cfg.encoder_blocks) != levels:
        raise ValueError(f"decoder_blocks and encoder_blocks need {levels} entries for a {scale_factor}x VAE")
    return AutoencoderTiny(
        encoder_block_out_channels=(cfg.width,) * levels, decoder_block_out_channels=(cfg.width,) * levels,
        num_encoder_blocks=cfg.encoder_blocks, num_decoder_blocks=cfg.decoder_blocks, latent_channels=latent_channels,
        scaling_factor=1.0, shift_factor=0.0,  # takes the sampler's latents as they are, like TAESD
    )


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def _vae_pairs(vae: AutoencoderKL, n: int, seed: int, perturbed: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, scaled latents, VAE decodes of those latents) for n procedural images; the last
    ``perturbed`` fraction of latents are shrunk towards zero and noised, and decoded as they are."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    images, latents, decodes = [], [], []
    for start in tqdm(range(0, n, 64), desc="vae targets", leave=False):
        x = _to_tensor(sample_batch(rng, min(64, n - start), all_combos())[0])
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        k = int(len(z) * perturbed) if start >= n * (1 - perturbed) else 0
        if k:
            shrink = torch.rand(k, 1, 1, 1, generator=gen) * 0.6 + 0.4
            z[-k:] = z[-k:] * shrink + torch.randn(z[-k:].shape, generator=gen) * (1 - shrink) * 0.5
        images.append(x)
        latents.append(z)
        decodes.append(vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1))
    return torch.cat(images), torch.cat(latents), torch.cat(decodes)


@torch.no_grad()
def preview_fidelity(vae: AutoencoderKL, tiny: AutoencoderTiny, n: int = 256) -> dict[str, float]:
    """PSNR (dB) of the tiny decoder against the VAE decode of the same latents, on held-out renders
    (clean latents), and of the tiny encoder+decoder round trip against the renders."""
    from stepdiff.preview import tiny_decode

    rng = np.random.default_rng(EVAL_SEED_BASE + 5)
    x = _to_tensor(sample_batch(rng, n, all_combos())[0])
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    target = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    decoded = tiny_decode(tiny, z)
    round_trip = tiny.decode(tiny.encode(x).latents).sample.clamp(-1, 1)

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        return 10 * math.log10(4.0 / max(F.mse_loss(a, b).item(), 1e-12))

    return {"decoder_vs_vae_db": psnr(decoded, target), "tiny_round_trip_db": psnr(round_trip, x)}


def distill(cfg: DistillConfig, vae: AutoencoderKL, out: Path) -> Path:
    """Train into ``out``; returns the AutoencoderTiny folder ``out / preview_decoder``."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    vae = vae.float().eval()
    scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    tiny = build_preview_decoder(cfg, vae.config.latent_channels, scale_factor)
    opt = torch.optim.AdamW(tiny.parameters(), lr=cfg.lr, weight_decay=0.0)
    ck_path, start = out / "preview_decoder.pt", 0
    if ck_path.exists():
        state = torch.load(ck_path, weights_only=False)
        tiny.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    started = time.time()
    images, latents, decodes = _vae_pairs(vae, cfg.num_images, cfg.seed + 1, cfg.perturbed_fraction)
    clean = int(len(images) * (1 - cfg.perturbed_fraction))
    gen = torch.Generator()
    tiny.train()
    bar = tqdm(range(start, cfg.steps), desc="preview decoder", initial=start, total=cfg.steps)
    for step in bar:
        gen.manual_seed(cfg.seed + 7 + step)  # resumable: each step's randomness is its own
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        scale = (step + 1) / cfg.warmup if step < cfg.warmup else 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * scale
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        loss = F.mse_loss(tiny.decode(latents[idx]).sample, decodes[idx])
        if cfg.encoder_weight:
            idx = torch.randint(max(clean, 1), (cfg.batch,), generator=gen)  # the encoder sees clean pairs only
            loss = loss + cfg.encoder_weight * F.mse_loss(tiny.encode(images[idx]).latents, latents[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            tmp = ck_path.with_suffix(".tmp")
            torch.save({"model": tiny.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, ck_path)
    tiny.eval()
    folder = out / PREVIEW_DECODER_DIR
    tiny.save_pretrained(folder, safe_serialization=True)
    report = {"config": dataclasses.asdict(cfg), "resumed_from_step": start, "wall_seconds": time.time() - started,
              **preview_fidelity(vae, tiny, cfg.eval_images)}
    (out / "preview_decoder.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Distil a tiny preview decoder from a model's VAE.")
    parser.add_argument("model", type=Path, help="model folder with a vae/ (e.g. src/stepdiff/models/shapes-v1)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, preview_decoder/)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 5000)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="a few steps only, to check the script runs")
    parser.add_argument("--install", action="store_true", help=f"copy the result into MODEL/{PREVIEW_DECODER_DIR}")
    args = parser.parse_args(argv)
    if not (args.model / "vae" / "config.json").is_file():
        raise SystemExit(f"model {str(args.model)!r} has no vae/ folder")
    cfg = DistillConfig().smoke_version() if args.smoke else DistillConfig()
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    vae = AutoencoderKL.from_pretrained(args.model / "vae", torch_dtype=torch.float32)
    folder = distill(cfg, vae, args.out)
    if args.install:
        dest = args.model / PREVIEW_DECODER_DIR
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(folder, dest)
        shutil.copy(args.out / "preview_decoder.json", dest / "distill_report.json")
        print(f"installed {dest}")


if __name__ == "__main__":
    main()
