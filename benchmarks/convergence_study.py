"""Study early stopping on the shipped shapes model from full per-step traces.

    python benchmarks/convergence_study.py record --split tune --out runs/traces-tune.npz
    python benchmarks/convergence_study.py record --split eval --out runs/traces-eval.npz
    python benchmarks/convergence_study.py analyse runs/traces-tune.npz
    python benchmarks/convergence_study.py --smoke     # record 2 pairs of 3 steps and analyse them: checks it runs

`record` runs every (prompt, seed) pair for 25 steps, keeps the x0 estimate after every step, decodes
each one (an early stop after step k shows exactly that image) and judges it. `analyse` replays
stopping rules on the traces: for each rule, the mean steps saved and the all-three accuracy against
the full runs. Rules are chosen on the `tune` split (training combinations, fresh seeds) and then
checked on the held-out `eval` split, so the held-out numbers are not fitted to.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import torch
from tqdm.auto import tqdm

import stepdiff
from _common import SMOKE, table
from stepdiff.schedulers import make_scheduler
from stepdiff.shapes.dataset import caption, eval_pairs, train_combos
from stepdiff.shapes.judge import judge
from stepdiff.vae import decode_latents

STEPS = 25
TUNE_SEED_BASE = 7_000_000


def tune_pairs(n: int = 216) -> list[tuple[tuple[str, str, str], int]]:
    combos = train_combos()
    rng = np.random.default_rng(1234)
    picked = rng.choice(len(combos), size=n, replace=n > len(combos))
    return [(combos[c], TUNE_SEED_BASE + i) for i, c in enumerate(picked)]


def record(args) -> None:
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(args.model or stepdiff.default_model())
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pairs = eval_pairs() if args.split == "eval" else tune_pairs()
    pairs, steps_n = pairs[: args.pairs or len(pairs)], args.steps
    x0s, correct = [], []
    for start in tqdm(range(0, len(pairs), args.batch), desc=f"record {args.split}"):
        chunk = pairs[start : start + args.batch]
        steps: list[torch.Tensor] = []

        def keep(p, i, t, kw, steps=steps):
            steps.append(kw["denoised"].detach().float().cpu().clone())

        pipe([caption(*c) for c, _ in chunk], num_inference_steps=steps_n, guidance_scale=args.guidance,
             generator=[torch.Generator().manual_seed(s) for _, s in chunk], callback_on_step_end=keep,
             callback_on_step_end_tensor_inputs=["denoised"], output_type="latent")
        trace = torch.stack(steps, 1)  # (B, steps, C, h, w)
        ok = np.zeros((len(chunk), steps_n), dtype=bool)
        with torch.no_grad():
            for k in range(steps_n):
                images = pipe.image_processor.postprocess(decode_latents(pipe.vae, trace[:, k]), output_type="pil")
                for b, ((color, shape, background), _) in enumerate(chunk):
                    v = judge(images[b])
                    ok[b, k] = v.background == background and v.color == color and v.shape == shape
        x0s.append(trace.numpy())
        correct.append(ok)
    np.savez_compressed(args.out, x0=np.concatenate(x0s), correct=np.concatenate(correct), guidance=args.guidance,
                        steps=steps_n)
    c = np.concatenate(correct)
    print(f"wrote {args.out}: {len(c)} pairs; all-three at the last step {c[:, -1].mean():.1%}")


def _changes(x0: np.ndarray, kind: str) -> np.ndarray:
    """Per pair and step k >= 1, the change of the x0 estimate from step k-1 to k: (N, steps - 1)."""
    if kind.startswith("pool"):
        f = int(kind[4:])
        n, s, c, h, w = x0.shape
        x0 = x0.reshape(n, s, c, h // f, f, w // f, f).mean((4, 6))
    d = x0[:, 1:] - x0[:, :-1]
    prev = x0[:, :-1]
    axes = (2, 3, 4)
    if kind == "max":
        return np.abs(d).max(axes) / np.abs(prev).max(axes)
    return np.sqrt((d**2).mean(axes)) / np.maximum(np.sqrt((prev**2).mean(axes)), 1e-8)


def replay(changes: np.ndarray, tol: float, patience: int, min_steps: int) -> np.ndarray:
    """Steps run per pair under StopOnConvergence's rule (changes[:, j] is the change at step j + 1)."""
    n = changes.shape[0]
    stop = np.full(n, changes.shape[1] + 1)
    for i in range(n):
        calm = 0
        for j in range(changes.shape[1]):
            step_index = j + 1
            calm = calm + 1 if changes[i, j] < tol else 0
            if calm >= patience and step_index + 1 >= min_steps:
                stop[i] = step_index + 1
                break
    return stop


def analyse(args) -> None:
    data = np.load(args.traces)
    x0, correct = data["x0"], data["correct"]
    steps_n = correct.shape[1]
    full = correct[:, -1].mean()
    rows = []
    for kind in args.kinds:
        ch = _changes(x0, kind)
        for patience in args.patience:
            for tol in args.tolerances:
                for min_steps in args.min_steps:
                    stop = replay(ch, tol, patience, min_steps)
                    acc = correct[np.arange(len(stop)), stop - 1].mean()
                    saved = 1 - stop.mean() / steps_n
                    meets = saved >= 0.25 and (acc - full) * 100 >= -2.0
                    rows.append((kind, str(patience), f"{tol:g}", str(min_steps), f"{saved:.1%}", f"{acc:.1%}",
                                 f"{(acc - full) * 100:+.1f}", "yes" if meets else ""))
    print(f"{args.traces}: {len(correct)} pairs, full-run all-three {full:.1%}\n")
    print(table(rows, ("change", "patience", "tolerance", "min steps", "saved", "all three", "pts", "goal met")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    sub = parser.add_subparsers(dest="what")
    r = sub.add_parser("record")
    r.add_argument("--split", choices=("tune", "eval"), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--model", default=None)
    r.add_argument("--guidance", type=float, default=7.5)
    r.add_argument("--batch", type=int, default=24)
    r.add_argument("--scheduler", default=None, help="scheduler name or alias (default: the model's own)")
    r.add_argument("--pairs", type=int, default=None, help="only the first N pairs")
    r.add_argument("--steps", type=int, default=STEPS)
    a = sub.add_parser("analyse")
    a.add_argument("traces")
    a.add_argument("--kinds", nargs="+", default=["rms", "max", "pool2", "pool4"])
    a.add_argument("--tolerances", type=float, nargs="+", default=[0.02, 0.03, 0.04, 0.05, 0.06, 0.08])
    a.add_argument("--patience", type=int, nargs="+", default=[1, 2, 3])
    a.add_argument("--min-steps", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1 if args.smoke else 2)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            traces = os.path.join(tmp, "traces.npz")
            record(argparse.Namespace(split="eval", out=traces, model=None, guidance=7.5, batch=2, scheduler=None,
                                      pairs=2, steps=3))
            analyse(argparse.Namespace(traces=traces, kinds=["rms", "pool4"], tolerances=[0.05], patience=[1],
                                       min_steps=[0]))
        return
    if args.what is None:
        parser.error("choose record or analyse (or --smoke)")
    {"record": record, "analyse": analyse}[args.what](args)


if __name__ == "__main__":
    main()
