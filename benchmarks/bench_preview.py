"""Issue 4 / issue 15 / issue 26 benchmarks: what previews cost, and how faithful the linear and tiny previews are.

    python benchmarks/bench_preview.py [--model DIR] [--tiny-decoder DIR] [--repeats 7] [--json FILE] [--cost-only]
                                       [--smoke]

- cost of a preview at every step as a fraction of step time (linear and tiny goal <= 3%; vae for
  reference), measured as the callback's own time over the run's time, and as run-time ratios; and the
  default, ``method="auto"``: the tiny decoder on the steps its budget chooses (<= 3% of the run), with the
  frames it made and the cadence it chose, once with one callback for all runs (a warm decoder) and once with
  a new callback per run (a first decode's warm-up in every run, as in a fresh ``stepdiff generate``);
- fidelity: PSNR against the full VAE decode of the same latents: the linear preview at latent
  resolution, for the model's fitted table and every built-in table with its channel count; the tiny
  decoder (when the model folder has preview_decoder/) at full resolution, on clean latents of held-out
  renders and on the x0 estimates ("denoised", what previews show by default) of 8 held-out runs at every
  step, also by thirds of the run.
"""

from __future__ import annotations

import argparse
import json
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
from _common import SMOKE, table, time_rounds
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
    parser.add_argument("--json", type=Path, default=None, help="write the cost table here (merged into the file)")
    parser.add_argument("--cost-only", action="store_true", help="skip the fidelity tables")
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.steps = 1, 3
    torch.set_num_threads(1 if args.smoke else 2)
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
    previews["auto (default)"] = PreviewCallback(tiny_decoder=tiny_folder)
    fresh = {"auto, new callback per run": lambda: PreviewCallback(tiny_decoder=tiny_folder)}

    def run(cb=None):
        return lambda: pipe(prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                            callback_on_step_end=cb)

    names = [*previews, *fresh]
    own: dict[str, list[float]] = {k: [] for k in names}
    frames: dict[str, list[int]] = {k: [] for k in names}
    cadence: dict[str, list[int | None]] = {k: [] for k in names}

    def timed(name):
        def go():
            cb = previews[name] if name in previews else fresh[name]()
            out = run(cb)()
            own[name].append(cb.seconds / out.record.wall_seconds)
            frames[name].append(len(cb.frames))
            cadence[name].append(cb.cadence)

        return go

    rounds = time_rounds({"none": run(), **{name: timed(name) for name in names}}, repeats=args.repeats)
    for lists in (own, frames, cadence):  # the warm-up round's entries
        for name in names:
            del lists[name][0]
    t = {name: statistics.median(v) for name, v in rounds.items()}
    print(f"model {folder}, {args.steps} steps, median of {args.repeats} interleaved rounds, torch threads 2\n")
    rows, record = [], {}
    for name in ("none", *names):
        share = sorted(own[name]) if name in own else []
        rows.append((name, f"{t[name]:.3f}", f"{t[name] / t['none'] - 1:+.1%}" if name != "none" else "",
                     f"{statistics.median(share):.1%} ({share[0]:.1%}-{share[-1]:.1%})" if share else "",
                     f"{statistics.median(frames[name]):g}" if share else "",
                     ", ".join(sorted({str(c) for c in cadence[name]})) if share else ""))
        record[name] = {"seconds_per_image": rounds[name], "median_seconds": t[name],
                        **({"own_share": own[name], "own_share_median": statistics.median(own[name]),
                            "frames": frames[name], "cadence": cadence[name]} if share else {})}
    print(table(rows, ("preview", "median s / image", "run time vs none",
                       "preview's own share of run time, median (range)", "frames", "cadence (last chosen)")))
    if args.json is not None:
        data = json.loads(args.json.read_text()) if args.json.is_file() else {}
        data["shipped"] = {
            "command": "python benchmarks/bench_preview.py " + " ".join(sys.argv[1:]), "model": str(folder),
            "steps": args.steps, "rounds": args.repeats, "torch_threads": 2,
            "load_average_at_end": os.getloadavg()[0], "previews": record,
        }
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.cost_only:
        return

    rng = np.random.default_rng(123)
    images = images_to_tensor([render(random_sample(rng, combo)) for combo, _ in eval_pairs(4)[: 4 if args.smoke else None]])
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
        runs = 2 if args.smoke else 8
        x0 = held_out_x0(pipe, runs=runs, steps=args.steps)
        per_step = x0.unflatten(0, (runs, args.steps))
        thirds = [per_step[:, : args.steps // 3], per_step[:, args.steps // 3: 2 * args.steps // 3],
                  per_step[:, 2 * args.steps // 3:]]
        rows = [(f"clean latents of {len(images)} held-out renders", f"{tiny_vs_vae_db(pipe.vae, tiny, latents):.2f}"),
                (f"x0 estimates, every step of {runs} held-out runs ({len(x0)})", f"{tiny_vs_vae_db(pipe.vae, tiny, x0):.2f}")]
        rows += [(f"  x0 estimates, {name} third of the steps", f"{tiny_vs_vae_db(pipe.vae, tiny, part.flatten(0, 1)):.2f}")
                 for name, part in zip(("first", "middle", "last"), thirds)]
        linear = table_for(pipe)
        rows.append(("(linear table on the x0 estimates, latent resolution)", f"{preview_psnr(pipe.vae, linear, x0):.2f}"))
        print()
        print(table(rows, (f"tiny decoder {tiny_folder}/ on", "PSNR vs VAE decode (dB), full resolution")))


if __name__ == "__main__":
    main()
