"""Issue 4 / issue 15 benchmarks: what previews cost, and how faithful the linear and tiny previews are.

    python benchmarks/bench_preview.py [--model DIR] [--tiny-decoder DIR] [--repeats 7]

- cost of a preview at every step as a fraction of step time (linear and tiny goal <= 3%; vae for
  reference), measured as the callback's own time over the run's time, and as run-time ratios;
- fidelity: PSNR against the full VAE decode of the same latents: the linear preview at latent
  resolution, for the model's fitted table and every built-in table with its channel count; the tiny
  decoder (when the model folder has preview_decoder/) at full resolution, on clean latents of held-out
  renders and on the x0 estimates ("denoised", what previews show by default) of 8 held-out runs at every
  step, also by thirds of the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for tools/

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
    tiny_decoder_folder,
)
from stepdiff.shapes.dataset import eval_pairs, random_sample, render
from tools.distill_preview import held_out_x0, tiny_vs_vae_db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--tiny-decoder", default=None, help="an AutoencoderTiny folder (default: the model's own)")
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
    tiny_folder = Path(args.tiny_decoder) if args.tiny_decoder else tiny_decoder_folder(pipe)
    if tiny_folder is not None:
        previews["tiny"] = PreviewCallback(method="tiny", tiny_decoder=tiny_folder)
        previews["tiny, every 2nd step"] = PreviewCallback(method="tiny", tiny_decoder=tiny_folder, every=2)

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
    ], ("preview", "median s / image", "run time vs none", "preview's own share of run time")))

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
        x0 = held_out_x0(pipe, runs=8, steps=args.steps)
        per_step = x0.unflatten(0, (8, args.steps))
        thirds = [per_step[:, : args.steps // 3], per_step[:, args.steps // 3: 2 * args.steps // 3],
                  per_step[:, 2 * args.steps // 3:]]
        rows = [(f"clean latents of {len(images)} held-out renders", f"{tiny_vs_vae_db(pipe.vae, tiny, latents):.2f}"),
                (f"x0 estimates, every step of 8 held-out runs ({len(x0)})", f"{tiny_vs_vae_db(pipe.vae, tiny, x0):.2f}")]
        rows += [(f"  x0 estimates, {name} third of the steps", f"{tiny_vs_vae_db(pipe.vae, tiny, part.flatten(0, 1)):.2f}")
                 for name, part in zip(("first", "middle", "last"), thirds)]
        linear = table_for(pipe)
        rows.append(("(linear table on the x0 estimates, latent resolution)", f"{preview_psnr(pipe.vae, linear, x0):.2f}"))
        print()
        print(table(rows, (f"tiny decoder {tiny_folder}/ on", "PSNR vs VAE decode (dB), full resolution")))


if __name__ == "__main__":
    main()
