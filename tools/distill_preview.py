"""Distil a tiny preview decoder (diffusers ``AutoencoderTiny``, the TAESD architecture) from a model's VAE.

    python -m tools.distill_preview MODEL_DIR --out RUN_DIR [--steps 5000] [--threads 1]
    python -m tools.distill_preview MODEL_DIR --out RUN_DIR --install   # also copy into MODEL_DIR/preview_decoder
    python -m tools.distill_preview MODEL_DIR --out RUN_DIR --width 12 --decoder-blocks 2 0 0   # another size

The student learns the VAE decoder: latents as the sampler sees them (scaled) -> the VAE's decoded image,
on latents of procedural shapes images, on noisy, shrunk copies of them, and, when the model folder has a
UNet, on the x0 estimates ("denoised") of real runs at every step on training prompts: those are what
previews decode, and they are blurry and off the clean-latent distribution early in a run. Its encoder is
distilled too (image -> scaled latents), so the folder is a complete AutoencoderTiny. Fixed seed; a
checkpoint every ``checkpoint_every`` steps, resumed when run again with the same --out.
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
from stepdiff.shapes.dataset import EVAL_SEED_BASE, all_combos, caption, eval_pairs, sample_batch, train_combos
from stepdiff.vae import decode_latents

__all__ = ["DistillConfig", "build_preview_decoder", "distill", "preview_fidelity", "tiny_vs_vae_db", "x0_estimates"]


@dataclass
class DistillConfig:
    seed: int = 0
    threads: int = 1
    width: int = 16  # channels at every level (AutoencoderTiny keeps one width)
    decoder_blocks: tuple[int, ...] = (1, 1, 0)  # residual blocks per level; none at full resolution (cost)
    upsample: int = 2  # the decoder's upsampling per level (4 with two levels: fewer layers for a 4x VAE)
    encoder_blocks: tuple[int, ...] = (0, 1, 1)  # none at full resolution (cost)
    num_images: int = 4000  # latents whose VAE decodes are precomputed as targets
    perturbed_fraction: float = 0.5  # of those, shrunk + noised copies, like early x0 estimates
    x0_runs: int = 20  # runs of the model on training prompts whose x0 estimates at every step are targets too
    x0_prompts: int = 8  # prompts per run (x0_runs * x0_prompts * x0_steps latents)
    x0_steps: int = 25
    steps: int = 5000
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    encoder_weight: float = 1.0
    checkpoint_every: int = 500
    eval_images: int = 256  # held-out renders for the fidelity report
    eval_x0_runs: int = 8  # runs on held-out prompts (at x0_steps) whose x0 estimates the report also scores

    def smoke_version(self) -> DistillConfig:
        return dataclasses.replace(self, num_images=16, steps=3, batch=4, warmup=1, checkpoint_every=2, eval_images=4,
                                   eval_x0_runs=1, x0_runs=1, x0_prompts=2, x0_steps=2)


def _levels(scale_factor: int, per_level: int, name: str) -> int:
    levels = round(math.log(scale_factor, per_level)) + 1 if per_level > 1 else 0
    if per_level < 2 or per_level ** (levels - 1) != scale_factor:
        raise ValueError(f"a {scale_factor}x VAE is not a power of the {name} {per_level}")
    return levels


def build_preview_decoder(cfg: DistillConfig, latent_channels: int, scale_factor: int) -> AutoencoderTiny:
    encoder_levels = _levels(scale_factor, 2, "encoder's downsampling")  # EncoderTiny halves the size per level
    decoder_levels = _levels(scale_factor, cfg.upsample, "upsample setting")
    if len(cfg.decoder_blocks) != decoder_levels or len(cfg.encoder_blocks) != encoder_levels:
        raise ValueError(f"a {scale_factor}x VAE needs {decoder_levels} decoder_blocks (upsample {cfg.upsample}) "
                         f"and {encoder_levels} encoder_blocks")
    return AutoencoderTiny(
        encoder_block_out_channels=(cfg.width,) * encoder_levels, decoder_block_out_channels=(cfg.width,) * decoder_levels,
        num_encoder_blocks=cfg.encoder_blocks, num_decoder_blocks=cfg.decoder_blocks, latent_channels=latent_channels,
        upsampling_scaling_factor=cfg.upsample,
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
def x0_estimates(pipe, prompts: list[str], seed: int, steps: int = 25, guidance_scale: float = 7.5) -> torch.Tensor:
    """The x0 estimates ("denoised", scaled latents) of one run of ``pipe`` at every step, for every prompt:
    (steps * len(prompts), C, h, w), in step order."""
    seen: list[torch.Tensor] = []

    def grab(pipeline, step, timestep, kwargs):
        seen.append(kwargs["denoised"].float().clone())
        return {}

    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
         generator=torch.Generator().manual_seed(seed), callback_on_step_end=grab,
         callback_on_step_end_tensor_inputs=["denoised"])
    return torch.cat(seen)


@torch.no_grad()
def _x0_pairs(pipe, cfg: DistillConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 estimates of ``cfg.x0_runs`` runs on training prompts, their VAE decodes); the guidance scale of
    each run is drawn from 1, 4 and 7.5, so that previews of low- and high-guidance runs are both seen."""
    rng = np.random.default_rng(seed)
    combos = train_combos()
    latents = []
    for run in tqdm(range(cfg.x0_runs), desc="x0 estimates", leave=False):
        prompts = [caption(*combos[i]) for i in rng.integers(len(combos), size=cfg.x0_prompts)]
        guidance = float(rng.choice([1.0, 4.0, 7.5]))
        latents.append(x0_estimates(pipe, prompts, seed + run, cfg.x0_steps, guidance))
    z = torch.cat(latents)
    return z, torch.cat([decode_latents(pipe.vae, chunk).float().clamp(-1, 1) for chunk in z.split(64)])


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / max(F.mse_loss(a, b).item(), 1e-12))


@torch.no_grad()
def tiny_vs_vae_db(vae: AutoencoderKL, tiny: AutoencoderTiny, latents: torch.Tensor) -> float:
    """PSNR (dB, full resolution) of the tiny decoder against the VAE decode of the same scaled latents."""
    from stepdiff.preview import tiny_decode

    target = torch.cat([decode_latents(vae, chunk).float().clamp(-1, 1) for chunk in latents.split(64)])
    return _psnr(tiny_decode(tiny, latents), target)


def held_out_x0(pipe, runs: int = 8, steps: int = 25) -> torch.Tensor:
    """x0 estimates at every step of ``runs`` runs on held-out prompts and seeds, at the default guidance."""
    return torch.cat([x0_estimates(pipe, [caption(*combo)], seed, steps) for combo, seed in eval_pairs(1)[:runs]])


@torch.no_grad()
def preview_fidelity(vae: AutoencoderKL, tiny: AutoencoderTiny, n: int = 256, pipe=None, x0_runs: int = 8,
                     x0_steps: int = 25) -> dict[str, float]:
    """PSNR (dB) of the tiny decoder against the VAE decode of the same latents, on held-out renders
    (clean latents) and, with ``pipe``, on the x0 estimates of ``x0_runs`` runs on held-out prompts; and of the
    tiny encoder+decoder round trip against the renders."""
    rng = np.random.default_rng(EVAL_SEED_BASE + 5)
    x = _to_tensor(sample_batch(rng, n, all_combos())[0])
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    round_trip = tiny.decode(tiny.encode(x).latents).sample.clamp(-1, 1)
    report = {"decoder_vs_vae_db": tiny_vs_vae_db(vae, tiny, z), "tiny_round_trip_db": _psnr(round_trip, x)}
    if pipe is not None:
        report["decoder_vs_vae_x0_db"] = tiny_vs_vae_db(vae, tiny, held_out_x0(pipe, x0_runs, x0_steps))
    return report


def distill(cfg: DistillConfig, vae: AutoencoderKL, out: Path, pipe=None) -> Path:
    """Train into ``out``; returns the AutoencoderTiny folder ``out / preview_decoder``. With ``pipe`` (a
    stepdiff pipeline of the same model, float32), x0 estimates of its runs are training targets too."""
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
    if pipe is not None and cfg.x0_runs:
        x0, x0_decodes = _x0_pairs(pipe, cfg, cfg.seed + 2)
        latents, decodes = torch.cat([latents, x0]), torch.cat([decodes, x0_decodes])
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
    fidelity = preview_fidelity(vae, tiny, cfg.eval_images, pipe, cfg.eval_x0_runs, cfg.x0_steps)
    report = {"config": dataclasses.asdict(cfg), "resumed_from_step": start, "wall_seconds": time.time() - started,
              "x0_latents": len(latents) - len(images), **fidelity}
    (out / "preview_decoder.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Distil a tiny preview decoder from a model's VAE.")
    parser.add_argument("model", type=Path, help="model folder with a vae/ (e.g. src/stepdiff/models/shapes-v1)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, preview_decoder/)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 5000)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    parser.add_argument("--width", type=int, default=None, help="channels at every level (default 16)")
    parser.add_argument("--decoder-blocks", type=int, nargs="+", default=None,
                        help="residual blocks per decoder level, lowest resolution first (default 1 1 0)")
    parser.add_argument("--upsample", type=int, default=None,
                        help="the decoder's upsampling per level (default 2; 4 with two --decoder-blocks for a 4x VAE)")
    parser.add_argument("--x0-runs", type=int, default=None,
                        help="runs of the model whose x0 estimates are targets too (default 20; 0: none)")
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
    for name, least in (("threads", 1), ("width", 1), ("x0_runs", 0), ("upsample", 2)):
        value = getattr(args, name)
        if value is not None:
            if value < least:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
            cfg = dataclasses.replace(cfg, **{name: value})
    if args.decoder_blocks is not None:
        cfg = dataclasses.replace(cfg, decoder_blocks=tuple(args.decoder_blocks))
    pipe = None
    if (args.model / "unet" / "config.json").is_file():  # a whole model: its runs' x0 estimates are targets too
        import stepdiff

        torch.set_num_threads(cfg.threads)
        pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae if pipe is not None else AutoencoderKL.from_pretrained(args.model / "vae", torch_dtype=torch.float32)
    folder = distill(cfg, vae, args.out, pipe)
    if args.install:
        dest = args.model / PREVIEW_DECODER_DIR
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(folder, dest)
        shutil.copy(args.out / "preview_decoder.json", dest / "distill_report.json")
        print(f"installed {dest}")


if __name__ == "__main__":
    main()
