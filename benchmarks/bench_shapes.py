"""Issue 3 / issue 5 benchmarks on the shipped shapes model.

    python benchmarks/bench_shapes.py speed        # one 64x64 image, 25 steps: stepdiff vs diffusers; CLI start-up
    python benchmarks/bench_shapes.py schedulers   # adherence at 25 steps per scheduler (picks the default)
    python benchmarks/bench_shapes.py convergence  # StopOnConvergence: steps saved vs adherence lost
    python benchmarks/bench_shapes.py models       # seconds per image, shapes-v1 against shapes-v2
    python benchmarks/bench_shapes.py speed --smoke  # (any of them) smallest settings: checks the script runs

CLI start-up is measured with `--cli-python` (default: this interpreter). Run it with the python of a
fresh environment made by the README's quick start to see what a newcomer gets: transformers imports
whatever optional packages a dev machine happens to carry.

Adherence is judged from pixels on the held-out (prompt, seed) pairs (`stepdiff eval-shapes`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import diffusers
import torch

import stepdiff
from _common import SMOKE, ModelClock, describe_paired, medians, table, time_rounds
from stepdiff.callbacks import StopOnConvergence
from stepdiff.schedulers import make_scheduler
from stepdiff.shapes.evaluate import evaluate

PROMPT = "a red circle on a blue background"


def _pipes(folder):
    ours = stepdiff.AutoPipelineForText2Image.from_pretrained(folder)
    # diffusers keeps the stored fp16 text encoder but upcasts the UNet unless told: ask for float32 explicitly.
    theirs = diffusers.AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float32)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def speed(args) -> None:
    folder = args.model or stepdiff.default_model()
    ours, theirs = _pipes(folder)
    guidance = 7.5

    clocks = {id(p): ModelClock(p.unet) for p in (ours, theirs)}

    def run(p):
        return clocks[id(p)].wrap(lambda: p(PROMPT, num_inference_steps=args.steps, guidance_scale=guidance,
                                            generator=torch.Generator().manual_seed(0)))

    # "diffusers again" runs the same diffusers pipeline as a third contender: its ratio to "diffusers"
    # shows how far two runs of identical work land apart in this run (the noise floor).
    again = run(theirs)
    rounds = time_rounds({"diffusers": run(theirs), "stepdiff": run(ours), "diffusers again": again},
                         repeats=args.repeats)
    t = medians(rounds)
    out_ours, out_theirs = (clocks[id(p)].median_outside() for p in (ours, theirs))
    startup = []
    for _ in range(args.startups):
        with tempfile.TemporaryDirectory(prefix="stepdiff-bench-") as tmp:  # a new output each run: none is overwritten
            started = time.perf_counter()
            proc = subprocess.Popen(
                [args.cli_python, "-m", "stepdiff.cli", "generate", PROMPT, "--steps", str(args.steps), "--output",
                 os.path.join(tmp, "image.png"), "--model", str(folder)],
                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            )
            buf = ""
            while not re.search(rf"\b\d+/{args.steps}\b", buf):  # the progress bar's first draw: the loop has started
                ch = proc.stderr.read(1)
                if not ch:  # the CLI ended without showing a first step: a failure, not a fast start
                    raise RuntimeError(f"CLI did not reach its first step:\n{buf}")
                buf += ch
            startup.append(time.perf_counter() - started)
            rest = proc.stderr.read()
            if proc.wait() != 0:
                raise RuntimeError(f"CLI failed after its first step:\n{buf}{rest}")
    startup.sort()
    print(f"CLI interpreter: {args.cli_python}")
    print(f"model {folder}: one 64x64 image, {args.steps} steps, guidance {guidance}, median of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}\n")
    print(table([
        ("stepdiff", f"{t['stepdiff']:.3f}", "<= 1.5 s"),
        ("diffusers (same weights)", f"{t['diffusers']:.3f}", ""),
        ("stepdiff / diffusers", f"{t['stepdiff'] / t['diffusers']:.3f}", "<= 1.00"),
        ("median of the per-round ratios", describe_paired(rounds, 'stepdiff', 'diffusers'), ""),
        ("seconds outside the UNet, stepdiff / diffusers", f"{out_ours:.3f} / {out_theirs:.3f}", ""),
        ("noise floor: diffusers again / diffusers", f"{t['diffusers again'] / t['diffusers']:.3f}", ""),
        ("    median of the per-round ratios", describe_paired(rounds, 'diffusers again', 'diffusers'), ""),
        (f"CLI start-up to first step (median of {len(startup)})", f"{startup[len(startup) // 2]:.2f}", "<= 5 s"),
    ], ("measure", "seconds", "goal")))


def schedulers(args) -> None:
    pipe, _ = _pipes(args.model or stepdiff.default_model())
    base = pipe.scheduler.config
    rows = []
    for name in args.schedulers:
        karras = name.endswith("-karras")
        pipe.scheduler = make_scheduler(name.removesuffix("-karras"), base, karras=karras)
        r = evaluate(pipe, args.guidance, steps=args.steps, seeds_per_combo=args.seeds, desc=name, limit=args.pairs)
        rows.append((name, f"{r['all']:.1%}", f"{r['background']:.1%}", f"{r['color']:.1%}", f"{r['shape']:.1%}",
                     f"{r['seconds']:.0f}"))
    print(f"guidance {args.guidance}, {args.steps} steps, {r['n']} held-out pairs\n")
    print(table(rows, ("scheduler", "all three", "background", "shape colour", "shape type", "seconds")))


def convergence(args) -> None:
    pipe, _ = _pipes(args.model or stepdiff.default_model())
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    full = evaluate(pipe, args.guidance, steps=args.steps, seeds_per_combo=args.seeds, batch=1, desc="full",
                    limit=args.pairs)
    rows = [("full run", f"{args.steps:.1f}", "0%", f"{full['all']:.1%}", "")]
    for tol in args.tolerances:
        cb = StopOnConvergence(tolerance=tol, patience=args.patience)
        r = evaluate(pipe, args.guidance, steps=args.steps, seeds_per_combo=args.seeds, batch=1, callback=cb,
                     desc=f"tol={tol:g}", limit=args.pairs)
        saved = 1 - r["mean_steps"] / args.steps
        rows.append((f"StopOnConvergence(tolerance={tol:g}, patience={args.patience})", f"{r['mean_steps']:.1f}", f"{saved:.0%}",
                     f"{r['all']:.1%}", f"{(r['all'] - full['all']) * 100:+.1f} pts"))
    print(f"{type(pipe.scheduler).__name__}, guidance {args.guidance}, {args.steps} steps, {full['n']} held-out pairs, "
          "one image per call\n")
    print(table(rows, ("setting", "mean steps", "steps saved", "all three", "vs full")))


def models(args) -> None:
    """Seconds per 64x64 image at 25 steps, shapes-v1 and shapes-v2 (or --model and --other) side by side,
    interleaved, with the run's noise floor (v2 against itself)."""
    from stepdiff.models import DEFAULT_MODEL_NAME

    root = Path(stepdiff.default_model()).parent
    folders = {"v1": Path(args.other) if args.other else root / "shapes-v1",
               "v2": Path(args.model) if args.model else root / DEFAULT_MODEL_NAME}
    pipes = {name: stepdiff.AutoPipelineForText2Image.from_pretrained(f) for name, f in folders.items()}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)

    def run(p):
        return lambda: p(PROMPT, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))

    rounds = time_rounds({"v1": run(pipes["v1"]), "v2": run(pipes["v2"]), "v2 again": run(pipes["v2"])},
                         repeats=args.repeats)
    t = medians(rounds)
    print(f"seconds per image, {args.steps} steps: {', '.join(f'{k} {v:.3f}' for k, v in t.items())}")
    print(table([("v2 / v1", f"{t['v2'] / t['v1']:.3f}", describe_paired(rounds, "v2", "v1")),
                 ("noise floor: v2 again / v2", f"{t['v2 again'] / t['v2']:.3f}", describe_paired(rounds, "v2 again", "v2"))],
                ("", "ratio of medians", "per-round ratio")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "schedulers", "convergence", "models"))
    parser.add_argument("--other", default=None, help="models: the model to compare with (default: shapes-v1)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seeds", type=int, default=9, help="seeds per held-out combination (24 combinations)")
    parser.add_argument("--pairs", type=int, default=None, help="schedulers, convergence: only the first N pairs")
    parser.add_argument("--schedulers", nargs="+",
                        default=["euler", "euler-a", "dpm++2m", "dpm++2m-karras", "unipc", "ddim", "heun"])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.04, 0.05])
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--scheduler", default=None, help="convergence: scheduler name or alias (default: the model's)")
    parser.add_argument("--cli-python", default=sys.executable, help="interpreter that runs the CLI for start-up timing")
    parser.add_argument("--startups", type=int, default=5, help="speed: CLI start-ups timed")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.startups, args.steps, args.seeds, args.pairs, args.tolerances = 1, 1, 2, 1, 4, [0.05]
        args.schedulers = args.schedulers[-1:]
    torch.set_num_threads(1 if args.smoke else 2)
    {"speed": speed, "schedulers": schedulers, "convergence": convergence, "models": models}[args.what](args)


if __name__ == "__main__":
    main()
