"""Issue 4 / issue 15 benchmarks: what previews cost, and how faithful the linear and tiny previews are.

    python benchmarks/bench_preview.py [--model DIR] [--repeats 7]

- cost of a preview at every step as a fraction of step time (linear and tiny goal <= 3%; vae for
  reference), measured as the callback's own time over the run's time, and as run-time ratios;
- fidelity: PSNR against the full VAE decode of the same latents: the linear preview at latent
  resolution, for the model's fitted table and every built-in table with its channel count; the tiny
  decoder (when the model folder has preview_decoder/) at full resolution, on clean latents of held-out
  renders and on the x0 estimates ("denoised") of real runs at every step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import torch

import stepdiff
from _common import table, time_interleaved
from stepdiff.preview import (
    PreviewCallback,
    builtin_tables,
    images_to_tensor,
    load_tiny_decoder,
    preview_psnr,
    table_for,
    tiny_decode,
    tiny_decoder_folder,
)
from stepdiff.shapes.dataset import eval_pairs, random_sample, render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = args.model or stepdiff.default_model()
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"
    previews = {
        "linear": PreviewCallback(method="linear"),
        "vae": PreviewCallback(method="vae"),
    }
    tiny_folder = tiny_decoder_folder(pipe)
    if tiny_folder is not None:
        previews["tiny"] = PreviewCallback(method="tiny")

    def run(cb=None):
        return lambda: pipe(prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                            callback_on_step_end=cb)

    own: dict[str, list[float]] = {k: [] for k in previews}

    def timed(name):
        cb = previews[name]

        def go():
            out = run(cb)()
            own[name].append(cb.seconds / out.record.wall_seconds)

        return go

    t = time_interleaved({"none": run(), **{name: timed(name) for name in previews}}, repeats=args.repeats)
    print(f"model {folder}, {args.steps} steps, median of {args.repeats}, torch threads 2\n")
    print(table([
        (name, f"{t[name]:.3f}", f"{t[name] / t['none'] - 1:+.1%}" if name != "none" else "",
         f"{statistics.median(own[name]):.1%}" if name in own else "")
        for name in ("none", *previews)
    ], ("preview every step", "median s / image", "run time vs none", "preview's own share of run time")))

    rng = np.random.default_rng(123)
    images = images_to_tensor([render(random_sample(rng, combo)) for combo, _ in eval_pairs(4)])
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    rows = [("model's table: " + table_for(pipe).name, f"{preview_psnr(pipe.vae, table_for(pipe), latents):.2f}")]
    for name, builtin in builtin_tables().items():
        if builtin.channels == latents.shape[1]:
            rows.append((f"built-in {name}", f"{preview_psnr(pipe.vae, builtin, latents):.2f}"))
    print()
    print(table(rows, (f"latent-to-RGB table on {len(images)} held-out shapes images", "PSNR vs VAE decode (dB)")))
    if tiny_folder is not None:
        tiny = load_tiny_decoder(tiny_folder, pipe.latent_channels(), pipe.vae_scale_factor)
        seen: list[torch.Tensor] = []

        def grab(p, i, t, kw):
            seen.append(kw["denoised"].clone())
            return kw

        for combo, seed in eval_pairs(1)[:8]:
            pipe(f"a {combo[0]} {combo[1]} on a {combo[2]} background", num_inference_steps=args.steps,
                 generator=torch.Generator().manual_seed(seed), callback_on_step_end=grab,
                 callback_on_step_end_tensor_inputs=["denoised"])
        rows = [(f"clean latents of {len(images)} held-out renders", f"{_tiny_psnr(pipe.vae, tiny, latents):.2f}"),
                (f"x0 estimates, every step of 8 runs ({len(seen)})", f"{_tiny_psnr(pipe.vae, tiny, torch.cat(seen)):.2f}")]
        print()
        print(table(rows, (f"tiny decoder {tiny_folder.name}/ on", "PSNR vs VAE decode (dB), full resolution")))


@torch.no_grad()
def _tiny_psnr(vae, tiny, latents: torch.Tensor) -> float:
    from stepdiff.pipelines.base import decode_with_vae

    target = decode_with_vae(vae, latents).float().clamp(-1, 1)
    mse = torch.nn.functional.mse_loss(tiny_decode(tiny, latents), target).item()
    return 10 * np.log10(4.0 / max(mse, 1e-12))


if __name__ == "__main__":
    main()
