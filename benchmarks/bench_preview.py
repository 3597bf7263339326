"""Issue 4 benchmarks: what previews cost, and how faithful the linear preview is.

    python benchmarks/bench_preview.py [--model DIR] [--repeats 7]

- cost of a preview at every step as a fraction of step time (linear goal <= 3%; vae for reference),
  measured as the callback's own time over the run's time, and as run-time ratios;
- fidelity: PSNR of the linear preview against the full VAE decode of the same latents, at latent
  resolution, for the model's fitted table and every built-in table with its channel count.
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
from stepdiff.preview import PreviewCallback, builtin_tables, images_to_tensor, preview_psnr, table_for
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

    t = time_interleaved({"none": run(), "linear": timed("linear"), "vae": timed("vae")}, repeats=args.repeats)
    print(f"model {folder}, {args.steps} steps, median of {args.repeats}, torch threads 2\n")
    print(table([
        (name, f"{t[name]:.3f}", f"{t[name] / t['none'] - 1:+.1%}" if name != "none" else "",
         f"{statistics.median(own[name]):.1%}" if name in own else "")
        for name in ("none", "linear", "vae")
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


if __name__ == "__main__":
    main()
