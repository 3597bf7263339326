"""stepdiff command line: flags map onto library calls; no logic of its own beyond wiring.

    stepdiff generate "a red circle on a blue background"
    stepdiff eval-shapes
    stepdiff tiny-model DIR --family sdxl
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_DTYPES = ("float32", "float16", "bfloat16")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


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


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped shapes model)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--scheduler", default=None, help="scheduler: an alias (euler, euler-a, dpm++2m, unipc, ...) "
                   "or a diffusers class name (default: the model's own)")
    p.add_argument("--karras", action="store_true", help="use Karras sigmas with the scheduler")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=_DTYPES, help="weights dtype (default float32)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle .bin checkpoints (they can run code: only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="stepdiff", description="Text-to-image diffusion, steerable at every step.")
    parser.add_argument("--version", action="version", version=f"stepdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images from a prompt; prints the path of every image written.")
    g.add_argument("prompt", help='what to draw, e.g. "a red circle on a blue background"')
    _add_model_flags(g)
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: model's)")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0); image i uses seed+i")
    g.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
    g.add_argument("--num-images", type=int, default=1, help="how many images (default 1)")
    g.add_argument("--output", type=Path, default=None,
                   help="output PNG (several images get -1, -2, ... suffixes); default: a new "
                        "stepdiff-NNNNN.png in the current folder, never overwriting")
    cut = g.add_mutually_exclusive_group()
    cut.add_argument("--cfg-cutoff", type=_ratio, default=None, metavar="RATIO",
                     help="turn guidance off after this fraction of the steps (saves compute)")
    cut.add_argument("--cfg-cutoff-step", type=int, default=None, metavar="N", help="turn guidance off after step N")
    g.add_argument("--stop-at", type=int, default=None, metavar="N", help="stop after step N (early stop)")
    g.add_argument("--stop-on-convergence", type=float, nargs="?", const=0.05, default=None, metavar="TOL",
                   help="stop once the x0 estimate changes by less than TOL (default 0.05) for --patience steps; "
                        "pair it with --scheduler euler (DDIM's estimate keeps drifting)")
    g.add_argument("--patience", type=int, default=3, metavar="N", help="steps for --stop-on-convergence (default 3)")
    g.add_argument("--verbose", action="store_true", help="print the run record (steps, model calls, rows, time)")
    pv = g.add_argument_group("previews of intermediate steps")
    pv.add_argument("--preview-dir", type=Path, default=None, help="write a preview PNG per step here ({step}.png)")
    pv.add_argument("--preview-every", type=int, default=1, metavar="N", help="preview every N steps (and the last)")
    pv.add_argument("--preview-source", choices=("denoised", "latents"), default="denoised",
                    help="denoised: the x0 estimate (clean early on, default); latents: the noisy latents")
    pv.add_argument("--preview-method", choices=("auto", "tiny", "linear", "vae"), default="auto",
                    help="tiny: the model's tiny preview decoder (close to the final image, cheap); linear: latent-to-RGB "
                         "table (cheapest, blotchy); vae: exact decode (slower); auto: tiny when the model folder has "
                         "one or --preview-decoder is given, else linear (default)")
    pv.add_argument("--preview-decoder", type=Path, default=None, metavar="DIR",
                    help="a local AutoencoderTiny folder (TAESD, TAESDXL, TAESD3, TAEF1) for --preview-method tiny/auto")
    pv.add_argument("--animation", type=Path, default=None, metavar="PATH", help="write the trajectory as .gif or .webp")
    pv.add_argument("--contact-sheet", type=Path, default=None, metavar="PATH",
                    help="write a grid of the previews, step number under each (.png)")

    e = sub.add_parser("eval-shapes", help="judge prompt adherence of a shapes model on held-out prompts",
                       description="Generate the held-out prompts at fixed seeds and judge each image from its pixels.")
    _add_model_flags(e)
    e.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="guidance scales to evaluate (default: 1.0 and the model's default)")
    e.add_argument("--cfg-cutoff", type=_ratio, nargs="*", default=[0.4], metavar="RATIO",
                   help="also evaluate CFGCutoffCallback at these ratios, at the default guidance (default 0.4)")
    e.add_argument("--seeds-per-combo", type=int, default=9, help="seeds per held-out combination (default 9: 216 pairs)")
    e.add_argument("--batch", type=int, default=24, help="images per pipeline call (default 24)")
    e.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")

    f = sub.add_parser("fit-preview", help="fit a latent-to-RGB preview table for a model and store it in its folder",
                       description="Encode sample images, decode them with the full VAE, and fit rgb = latents @ "
                                   "factors + bias by least squares. Writes MODEL_DIR/latent_rgb.json.")
    f.add_argument("model", type=Path, help="model folder")
    f.add_argument("--images", type=Path, default=None,
                   help="folder of sample images (default: procedural coloured shapes)")
    f.add_argument("--count", type=int, default=512, help="procedural images to fit on (default 512)")

    t = sub.add_parser("tiny-model", help="write a tiny random SD or SDXL model folder (for trying the API)")
    t.add_argument("out", type=Path, help="folder to create")
    t.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    return parser


def _from_pretrained(folder: Path, dtype: str = "float32", allow_pickle: bool = False):
    """Load quietly: no loading bars (the denoising bar stays), no rename warnings."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .pipelines import AutoPipelineForText2Image

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    kwargs = {} if dtype == "float32" else {"torch_dtype": getattr(torch, dtype)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers renames torch_dtype; both spellings work
        return AutoPipelineForText2Image.from_pretrained(folder, allow_pickle=allow_pickle, **kwargs)


def _load(args: argparse.Namespace):
    from .models import default_model
    from .schedulers import make_scheduler

    folder = args.model if args.model is not None else default_model()
    pipe = _from_pretrained(folder, args.dtype, args.allow_pickle)
    pipe.to(args.device)
    if args.scheduler is not None or args.karras:
        name = args.scheduler or type(pipe.scheduler).__name__
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config, karras=args.karras)
    return pipe, folder


def _check_common(args: argparse.Namespace) -> None:
    from .schedulers import make_scheduler, scheduler_names

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.scheduler is not None and args.scheduler not in scheduler_names():
        make_scheduler(args.scheduler, {})  # raises with the list of valid names
    if args.model is not None:
        from .pipelines.base import StepDiffPipeline

        StepDiffPipeline._check_folder(args.model)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .callbacks import CFGCutoffCallback, StopOnConvergence
    from .control import CancelToken
    from .images import a1111_parameters, check_writable_dir, next_free_path, save_png
    from .schedulers import display_name
    from .vocabulary import unknown_words

    # Everything a user can get wrong is checked before the model loads.
    _check_common(args)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    if args.guidance is not None and not (args.guidance >= 0):
        raise ValueError(f"--guidance must be a number >= 0, got {args.guidance}")
    if args.preview_every < 1:
        raise ValueError(f"--preview-every must be >= 1, got {args.preview_every}")
    if args.stop_at is not None and args.stop_at < 0:
        raise ValueError(f"--stop-at must be >= 0, got {args.stop_at}")
    if args.size is not None:
        for name, v in zip(("width", "height"), args.size):
            if v < 8 or v % 8:
                raise ValueError(f"--size {name} must be a positive multiple of 8, got {v}")
    callbacks = []
    if args.cfg_cutoff is not None:
        callbacks.append(CFGCutoffCallback(cutoff_step_ratio=args.cfg_cutoff))
    if args.cfg_cutoff_step is not None:
        callbacks.append(CFGCutoffCallback(cutoff_step_index=args.cfg_cutoff_step))
    if args.stop_on_convergence is not None:
        if not 0.0 < args.stop_on_convergence < float("inf"):
            raise ValueError(f"--stop-on-convergence must be a number > 0, got {args.stop_on_convergence}")
        if args.patience < 1:
            raise ValueError(f"--patience must be >= 1, got {args.patience}")
        callbacks.append(StopOnConvergence(tolerance=args.stop_on_convergence, patience=args.patience))
    if args.output is not None:
        check_writable_dir(args.output.parent.resolve(), "--output")
        if args.output.is_dir():
            raise IsADirectoryError(f"--output {str(args.output)!r} is a folder; give a file name ending in .png")
        stem = args.output.with_suffix("")
        paths = [args.output] if args.num_images == 1 else [
            stem.with_name(f"{stem.name}-{i + 1}.png") for i in range(args.num_images)
        ]
    else:
        paths = next_free_path(Path.cwd(), "stepdiff", args.num_images)
    if args.stop_at is not None:
        stop_at = args.stop_at

        def stop(pipeline, i, t, kw):
            if i >= stop_at:
                pipeline._interrupt = True
            return kw

        callbacks.append(stop)

    preview = None
    if args.preview_dir is not None or args.animation is not None or args.contact_sheet is not None:
        from .preview import PreviewCallback

        preview = PreviewCallback(
            folder=args.preview_dir, every=args.preview_every, source=args.preview_source,
            method=args.preview_method, animation=args.animation, contact_sheet=args.contact_sheet, frame_size=128,
            tiny_decoder=args.preview_decoder,
        )
        callbacks.append(preview)

    pipe, folder = _load(args)
    info = _model_info(folder)
    unknown, known = unknown_words(pipe.tokenizer, args.prompt, info.get("vocabulary"))
    if unknown:
        hint = f"; it knows: {', '.join(known)}" if known else ""
        print(f"stepdiff: warning: the model does not know {', '.join(unknown)}{hint}", file=sys.stderr)
    guidance = args.guidance if args.guidance is not None else _default_guidance(info)
    kwargs = {}
    if args.size is not None:
        kwargs["width"], kwargs["height"] = args.size
    generators = [torch.Generator(args.device).manual_seed(args.seed + i) for i in range(args.num_images)]
    token = CancelToken()
    with _graceful_interrupt(token):
        out = pipe(
            prompt=args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=guidance,
            num_images_per_prompt=args.num_images, generator=generators, callback_on_step_end=callbacks or None,
            cancel=token, **kwargs,
        )
    record = out.record.to_dict()
    cutoff = args.cfg_cutoff if args.cfg_cutoff is not None else args.cfg_cutoff_step
    for i, (image, path) in enumerate(zip(out.images, paths)):
        fields = {
            "Steps": args.steps, "Sampler": display_name(pipe.scheduler, args.karras), "CFG scale": guidance,
            "Seed": args.seed + i, "Size": f"{image.width}x{image.height}", "Model": Path(folder).name,
            "CFG cutoff": cutoff, "Interrupted at step": out.steps_completed if out.interrupted else None,
            "Stop reason": out.stop_reason if out.interrupted else None,
            "Version": f"stepdiff {__version__}",
        }
        meta = {
            "prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed + i, "steps": args.steps,
            "scheduler": type(pipe.scheduler).__name__, "karras": args.karras, "guidance_scale": guidance,
            "cfg_cutoff_ratio": args.cfg_cutoff, "cfg_cutoff_step": args.cfg_cutoff_step, "model": str(folder),
            "stepdiff_version": __version__, "record": record, "interrupted": out.interrupted,
            "steps_completed": out.steps_completed, "stop_reason": out.stop_reason,
        }
        print(save_png(image, path, a1111_parameters(args.prompt, args.negative, fields), meta))
    if preview is not None:
        for extra in (args.animation, args.contact_sheet):
            if extra is not None:
                print(extra)
    if args.verbose:
        print(f"record: {record}", file=sys.stderr)
    return 0


def cmd_fit_preview(args: argparse.Namespace) -> int:
    import torch

    from .pipelines.base import StepDiffPipeline
    from .preview import builtin_tables, fit_latent_rgb, images_to_tensor, preview_psnr

    StepDiffPipeline._check_folder(args.model)
    pipe = _from_pretrained(args.model)
    if args.images is not None:
        from PIL import Image

        files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise FileNotFoundError(f"--images {str(args.images)!r} holds no .png/.jpg/.webp images")
        size = pipe.default_size()
        images = images_to_tensor([Image.open(p).convert("RGB").resize((size, size)) for p in files])
    else:
        import numpy as np

        from .shapes.dataset import all_combos, sample_batch

        images = images_to_tensor(sample_batch(np.random.default_rng(0), args.count, all_combos())[0])
    fit_on, held_out = images[: len(images) * 3 // 4], images[len(images) * 3 // 4 :]
    table = fit_latent_rgb(pipe.vae, fit_on, name=f"fitted:{Path(args.model).name}")
    with torch.no_grad():
        latents = pipe.vae.encode(held_out).latent_dist.mean * pipe.vae.config.scaling_factor
    print(f"{'table':<10} PSNR vs VAE decode on {len(held_out)} held-out images (dB)")
    print(f"{'fitted':<10} {preview_psnr(pipe.vae, table, latents):.2f}")
    for name, builtin in builtin_tables().items():
        if builtin.channels == table.channels:
            print(f"{name:<10} {preview_psnr(pipe.vae, builtin, latents):.2f}")
    print(table.save(args.model))
    return 0


@contextlib.contextmanager
def _graceful_interrupt(token):
    """First Ctrl-C: stop after the current step and keep the image. Second: abort, writing nothing."""

    def handler(signum, frame):
        if token.cancelled:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        token.cancel("interrupted by Ctrl-C")
        print("\nstepdiff: stopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no signal handling
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _model_info(folder: Path) -> dict:
    """stepdiff.json in a model folder: recommended settings and training vocabulary, where recorded."""
    import json

    info = Path(folder) / "stepdiff.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def _default_guidance(info: dict) -> float:
    """The guidance the model folder recommends (its stepdiff.json); otherwise 7.5, as the convention has it."""
    return float(info.get("guidance_scale", 7.5))


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from .shapes.evaluate import evaluate_table, format_breakdown, format_table

    _check_common(args)
    pipe, folder = _load(args)
    default = _default_guidance(_model_info(folder))
    guidances = args.guidance if args.guidance is not None else sorted({1.0, default})
    rows = evaluate_table(pipe, guidances=guidances, default_guidance=default, cutoffs=args.cfg_cutoff,
                          steps=args.steps, seeds_per_combo=args.seeds_per_combo, batch=args.batch)
    print(format_table(rows))
    for row in rows:  # where the misses are: per shape, per colour, and which shape was drawn instead
        print()
        print(format_breakdown(row))
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .testing import make_tiny_sd, make_tiny_sdxl

    folder = (make_tiny_sd if args.family == "sd" else make_tiny_sdxl)(args.out)
    print(folder)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, never a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: already printed
        return int(e.code or 0)
    commands = {
        "generate": cmd_generate, "eval-shapes": cmd_eval_shapes, "fit-preview": cmd_fit_preview,
        "tiny-model": cmd_tiny_model,
    }
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, OSError) as e:
        print(f"stepdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stepdiff: aborted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
