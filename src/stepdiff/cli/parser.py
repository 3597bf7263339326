"""The argument parser: the shared flags and value types; each command adds its own flags (its module's
``add_parser``; ``stepdiff.cli.build_parser`` puts them together)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..limits import MAX_STEPS

DTYPES = ("float32", "float16", "bfloat16")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but a stray value names the flag it follows (``--karras yes``, ``--stop-on-convergence -1e5``)."""
        args = sys.argv[1:] if args is None else list(args)
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            i = args.index(extras[0]) if extras[0] in args else 0
            after = f" (after {args[i - 1]})" if i > 0 and args[i - 1].startswith("-") else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{after}")
        return parsed


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like WIDTHxHEIGHT, e.g. 64x64; got {text!r}") from None
    return w, h


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GiB > 0, got {text!r}") from None
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of GiB > 0, got {text!r}")
    return value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model folder, single-file .safetensors checkpoint (SD 1.x/2.x, SDXL, SD3) or hub id owner/name "
                        "(default: the shipped shapes model)")
    p.add_argument("--steps", type=int, default=25,
                   help=f"denoising steps, 1 to {MAX_STEPS} (DDIM, DDPM: to the model's training steps; default 25)")
    p.add_argument("--scheduler", default=None, help="scheduler: an alias (euler, euler-a, dpm++2m, unipc, ...) "
                   "or a diffusers class name (default: the model's own)")
    p.add_argument("--karras", action="store_true",
                   help="use Karras sigmas (only schedulers that have them: euler, dpm++2m, heun, lms, unipc, ...)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps or xpu (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle .bin checkpoints (they can run code: only for files you trust)")
    p.add_argument("--max-memory", type=_gib, default=None, metavar="GIB",
                   help="refuse runs estimated to need more memory than this (default: the device's memory)")


def _add_cache_flags(p: argparse.ArgumentParser, note: str = "") -> None:
    fast = p.add_argument_group(
        "faster runs: step caching (reuses work between steps; the pictures change a little)")
    one = fast.add_mutually_exclusive_group()
    one.add_argument("--fast", action="store_true",
                     help="the fast preset: classifier-free guidance off after 30%% of the steps and DeepCache (the "
                          "deep UNet blocks computed every 3rd step only): about 3.5x less compute at the same "
                          "adherence on the shipped model; prints what it uses. "
                          f"UNet models (SD 1.x/2.x, SDXL); not with --cache{note}")
    one.add_argument("--cache", default=None, metavar="SPEC",
                     help="step caching policies, comma-separated: deepcache:INTERVAL[:BRANCH] (the deep UNet "
                          "blocks computed every INTERVAL steps, only the shallow branch BRANCH, default 0, between), "
                          "tgate:GATE_STEP (T-GATE: cross-attention kept and guidance off from step GATE_STEP), "
                          "fbc:THRESHOLD (First-Block-Cache: the rest of the denoiser skipped while its first block's "
                          "output changes by less than THRESHOLD, e.g. 0.1; not with deepcache or tgate), "
                          "adaptive:THRESHOLD (guidance ends per image once the guided and unguided predictions agree "
                          "to cosine THRESHOLD, e.g. 0.999); e.g. deepcache:3,tgate:10. deepcache and tgate need a UNet "
                          f"model (SD 1.x/2.x, SDXL); fbc and adaptive work on SD3 too{note}")



def make_parser(commands) -> argparse.ArgumentParser:
    """The ``stepdiff`` parser with a subcommand from each of ``commands`` (modules with ``add_parser(sub)``)."""
    from .. import __version__

    parser = _Parser(prog="stepdiff", description="Text-to-image diffusion, steerable at every step.")
    parser.add_argument("--version", action="version", version=f"stepdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in commands:
        command.add_parser(sub)
    return parser
