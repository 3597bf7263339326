"""Issue 27 benchmarks: Flux on the shared loop against the classic FluxPipeline, and what a true-CFG cutoff saves.

    python benchmarks/bench_flux.py [--repeats 9] [--steps 25] [--only classic|cutoff] [--threads 2] [--smoke]

(1) stepdiff / classic time for a 25-step FluxPipeline call on identical tiny weights (the classic library's own
    fast-test config, guidance-distilled, 32x32, as FLUX.1-dev is run: distilled guidance 3.5, no true CFG), in
    interleaved rounds with the classic pipeline run twice per round for the noise floor (goal <= 1.00).
(2) True CFG (true_cfg_scale 4, a negative prompt) with FluxCFGCutoffCallback(0.4) against full true CFG on a
    tiny Flux whose transformer dominates a step: the time ratio beside the ratio of transformer rows the run
    records (goal: within 10%).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import diffusers
import torch

import stepdiff
from _common import SMOKE, ModelClock, describe_paired, medians, paired_ratio, table, time_rounds
from stepdiff.callbacks import FluxCFGCutoffCallback
from stepdiff.testing import make_tiny_flux

# A tiny Flux whose transformer dominates a step (part 2): arguments of stepdiff.testing.make_tiny_flux.
TINY_FLUX_BIG = {"layers": 2, "single_layers": 4, "head_dim": 32, "heads": 4, "guidance_embeds": True}


def classic(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_flux(tmp, guidance_embeds=True)  # the classic fast-test config
        ours = stepdiff.FluxPipeline.from_pretrained(folder)
        theirs = diffusers.FluxPipeline.from_pretrained(folder)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    clocks = {id(p): ModelClock(p.transformer) for p in (ours, theirs)}

    def run(p):
        return clocks[id(p)].wrap(lambda: p("a red car on the road", num_inference_steps=args.steps, guidance_scale=3.5,
                                            height=args.size, width=args.size, generator=torch.Generator().manual_seed(0),
                                            output_type="np"))

    # The classic pipeline again as a third contender: the noise floor of this run.
    rounds = time_rounds({"classic": run(theirs), "stepdiff": run(ours), "classic again": run(theirs)},
                         repeats=args.repeats)
    t = medians(rounds)
    out_ours, out_theirs = (clocks[id(p)].median_outside() for p in (ours, theirs))
    params = sum(p.numel() for p in ours.transformer.parameters()) / 1e6
    print(f"tiny Flux (the classic fast-test config, transformer {params:.2f}M, guidance_embeds), {args.size}x{args.size}, "
          f"{args.steps} steps, guidance 3.5, median of {args.repeats} interleaved rounds\n")
    print(table([(k, f"{v:.4f}") for k, v in t.items()] + [
        ("stepdiff / classic", f"{t['stepdiff'] / t['classic']:.3f}"),
        ("median of the per-round ratios", describe_paired(rounds, "stepdiff", "classic")),
        ("noise floor: classic again / classic", f"{t['classic again'] / t['classic']:.3f}"),
        ("    median of the per-round ratios", describe_paired(rounds, "classic again", "classic")),
        ("seconds outside the transformer, stepdiff / classic",
         f"{out_ours:.4f} / {out_theirs:.4f} = {out_ours / out_theirs:.2f}"),
    ], ("run", "median s")))


def cutoff(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pipe = stepdiff.FluxPipeline.from_pretrained(make_tiny_flux(tmp, **args.big))
    pipe.set_progress_bar_config(disable=True)
    rows: dict[str, int] = {}

    def run(name, cb):
        def go():
            out = pipe("a red car on the road", negative_prompt="blurry", true_cfg_scale=4.0, guidance_scale=3.5,
                       num_inference_steps=args.steps, height=args.size, width=args.size, max_sequence_length=64,
                       generator=torch.Generator().manual_seed(0), callback_on_step_end=cb, output_type="latent")
            rows[name] = out.record.model_rows

        return go

    rounds = time_rounds({"full true CFG": run("full true CFG", None),
                          "cutoff 0.4": run("cutoff 0.4", FluxCFGCutoffCallback(cutoff_step_ratio=0.4))},
                         repeats=args.repeats)
    t = medians(rounds)
    time_ratio = paired_ratio(rounds, "cutoff 0.4", "full true CFG")
    rows_ratio = rows["cutoff 0.4"] / rows["full true CFG"]
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    print(f"\ntiny Flux (transformer {params:.1f}M), {args.size}x{args.size}, {args.steps} steps, true_cfg_scale 4 with a "
          f"negative prompt, latent output, median of {args.repeats} interleaved rounds\n")
    print(table([
        ("full true CFG", f"{t['full true CFG']:.3f}", str(rows["full true CFG"]), "1.000", "1.000", ""),
        ("FluxCFGCutoffCallback(0.4)", f"{t['cutoff 0.4']:.3f}", str(rows["cutoff 0.4"]),
         describe_paired(rounds, "cutoff 0.4", "full true CFG"), f"{rows_ratio:.3f}", f"{time_ratio / rows_ratio - 1:+.1%}"),
    ], ("run", "median s", "transformer rows", "time / full", "rows / full", "time vs rows")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--only", choices=("classic", "cutoff"), default=None, help="run one part only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with other work)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    args.size, args.big = 32, TINY_FLUX_BIG
    if args.smoke:
        args.repeats, args.steps, args.size, args.big = 1, 2, 8, {"guidance_embeds": True}
    torch.set_num_threads(1 if args.smoke else args.threads)
    diffusers.utils.logging.disable_progress_bar()
    if args.only != "cutoff":
        classic(args)
    if args.only != "classic":
        cutoff(args)


if __name__ == "__main__":
    main()
