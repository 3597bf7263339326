"""``stepdiff generate``: images from a prompt; prints the path of every image written."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .. import loading
from ..limits import MAX_CONTROL_SCALE, MAX_GUIDANCE, SIZE_LIMIT_RATIO, SIZE_WARN_RATIO
from .common import _load, _warn
from .generate_checks import _check_generate, _check_previews, _generate_outputs
from .interrupts import _graceful_interrupt
from .parser import _add_cache_flags, _add_model_flags, _ratio, _size
from .run_files import _RunFiles, _undo_on_failure


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images from a prompt; prints the path of every image written.")
    g.add_argument("prompt", help='what to draw, e.g. "a red circle on a blue background"')
    _add_model_flags(g)
    g.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g} (default: model's)")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--seed", type=int, default=0, help="random seed, 0 to 2**64-1 (default 0); image i uses seed+i")
    g.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
    g.add_argument("--force", action="store_true",
                   help=f"allow a --size more than {SIZE_LIMIT_RATIO} times the model's native size per side")
    g.add_argument("--num-images", type=int, default=1, help="how many images (default 1)")
    g.add_argument("--output", type=Path, default=None,
                   help="output image, .png, .jpg/.jpeg or .webp (several images get -1, -2, ... suffixes); default: "
                        "a new stepdiff-NNNNN.png in the current folder")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing --output, --animation and --contact-sheet files and --preview-dir frames")
    cut = g.add_mutually_exclusive_group()
    cut.add_argument("--cfg-cutoff", type=_ratio, default=None, metavar="RATIO",
                     help="turn guidance off after this fraction of the steps (saves compute)")
    cut.add_argument("--cfg-cutoff-step", type=int, default=None, metavar="N", help="turn guidance off after step N")
    cut.add_argument("--guidance-interval", default=None, metavar="START,END",
                     help="guidance only on this part of the steps, as ratios, e.g. 0.2,0.8 (Kynkäänniemi et al. 2024)")
    _add_stop_flags(g)
    g.add_argument("--verbose", action="store_true", help="print the run record (steps, model calls, rows, time)")
    _add_cache_flags(g)
    _add_image_flags(g)
    _add_control_flags(g)
    _add_preview_flags(g)
    return g


def _add_stop_flags(g: argparse.ArgumentParser) -> None:
    """Early stops, and the picture a run that stops early gives."""
    g.add_argument("--stop-at", type=int, default=None, metavar="N", help="stop after step N (early stop)")
    g.add_argument("--stop-on-convergence", type=float, nargs="?", const=0.05, default=None, metavar="TOL",
                   help="stop once the x0 estimate changes by less than TOL (default 0.05) for --patience steps; "
                        "pair it with --scheduler euler (DDIM's estimate keeps drifting)")
    g.add_argument("--patience", type=int, default=3, metavar="N", help="steps for --stop-on-convergence (default 3)")
    g.add_argument("--stop-output", default=None, metavar="WHAT",
                   help="the picture of a run that stops early: finish (3 more steps on a re-timed schedule down to "
                        "t=0), finish:N (N steps), denoised (the x0 estimate of the step reached) or latents (the noisy "
                        "latents); default: finish, or denoised with --stop-at / --stop-on-convergence")


def _add_image_flags(g: argparse.ArgumentParser) -> None:
    """Image to image and inpainting."""
    im = g.add_argument_group("image to image and inpainting")
    im.add_argument("--init-image", type=Path, default=None, metavar="PATH",
                    help="start from this picture (image to image); its size is the output size")
    im.add_argument("--mask", type=Path, default=None, metavar="PATH",
                    help="with --init-image: repaint only where this mask is white (inpainting); same size as the image")
    im.add_argument("--strength", type=float, default=None, metavar="S",
                    help="how much of --init-image to re-draw, in (0, 1] (default 0.6; 1.0 with --mask)")
    im.add_argument("--keep-unmasked", action=argparse.BooleanOptionalAction, default=None,
                    help="with --mask: paste --init-image's own pixels back outside the mask, with a 2-pixel feathered "
                         "edge (the default: inpainting re-draws the whole picture through the VAE, which changes the "
                         "kept part); --no-keep-unmasked writes the model's pixels everywhere, as the library returns them")


def _add_control_flags(g: argparse.ArgumentParser) -> None:
    """ControlNet."""
    cn = g.add_argument_group("ControlNet: a structure picture decides where the shape goes")
    cn.add_argument("--control", type=Path, default=None, metavar="PATH",
                    help="control picture, the output size; for the shipped model: the shape's silhouette, white on black")
    cn.add_argument("--controlnet", type=Path, default=None, metavar="DIR",
                    help="ControlNet folder (default: the shipped shapes ControlNet, which fits the shipped model)")
    cn.add_argument("--control-scale", type=float, default=None, metavar="S",
                    help=f"strength of the control, 0 to {MAX_CONTROL_SCALE:g} (default 1.0)")
    cn.add_argument("--control-end", type=float, default=None, metavar="RATIO",
                    help="stop applying the control after this fraction of the steps, in (0, 1] (default 1.0; "
                         "0.5 saves the ControlNet's calls in the second half)")


def _add_preview_flags(g: argparse.ArgumentParser) -> None:
    """Previews of intermediate steps, an animation and a contact sheet."""
    pv = g.add_argument_group("previews of intermediate steps")
    pv.add_argument("--preview-dir", type=Path, default=None, help="write a preview PNG per step here ({step}.png)")
    pv.add_argument("--preview-every", type=int, default=None, metavar="N",
                    help="preview every N steps (and the last); default: every step, or with the tiny decoder of "
                         "--preview-method auto, the steps chosen from the run's measured cost so that previews "
                         "take at most 3%% of the run")
    pv.add_argument("--preview-source", choices=("denoised", "latents"), default="denoised",
                    help="denoised: the x0 estimate (clean early on, default); latents: the noisy latents")
    pv.add_argument("--preview-method", choices=("auto", "tiny", "linear", "vae"), default="auto",
                    help="tiny: the model's tiny preview decoder (close to the final image, cheap); linear: latent-to-RGB "
                         "table (cheapest, blotchy); vae: exact decode (slower); auto: tiny when the model folder has "
                         "one or --preview-decoder is given, at most 3%% of the run, else linear (default)")
    pv.add_argument("--preview-decoder", type=Path, default=None, metavar="DIR",
                    help="a local AutoencoderTiny folder (TAESD, TAESDXL, TAESD3, TAEF1) for --preview-method tiny/auto")
    pv.add_argument("--animation", type=Path, default=None, metavar="PATH", help="write the trajectory as .gif or .webp")
    pv.add_argument("--contact-sheet", type=Path, default=None, metavar="PATH",
                    help="write a grid of the previews, step number under each (.png, .jpg or .webp)")


def cmd_generate(args: argparse.Namespace) -> int:
    from ..control import CancelToken

    # 1. Everything a user can get wrong is checked before the model loads.
    folder, request = _check_generate(args)
    outputs = _generate_outputs(args)
    _check_previews(args, outputs)
    cache = None
    if args.policies:
        from ..caching import describe

        cache = describe(args.policies)
        print(f"stepdiff: {'--fast' if args.fast else '--cache'}: {cache}", file=sys.stderr, flush=True)
    callbacks = request.guidance_callbacks() + _stop_callbacks(args)
    native = _native_size(folder)
    width, height = request.output_size or (native, native)
    if max(width, height) > SIZE_WARN_RATIO * native:
        callbacks.append(_DecodeNotice(f"stepdiff: denoising done; decoding {args.num_images} image(s) at {width}x{height}"))

    # 2. Reserve the image names (atomically: concurrent runs never share one), then run. From here on a
    # failure or an abort takes back what the run wrote.
    files = _RunFiles()
    with _undo_on_failure(files):
        paths = _claim(args, outputs, files)
        if args.preview_dir is not None or args.animation is not None or args.contact_sheet is not None:
            callbacks.append(_previews(args, files))
        callbacks += args.policies  # step caching composes with the callbacks above (cutoff, stops, previews)

        pipe = _load(args, folder)
        info = loading.model_info(folder)
        _warn_about_prompt(pipe, args.prompt, args.negative, info)
        request = request.with_model_defaults(loading.default_guidance(info), native)
        token = CancelToken()
        stop_output = args.stop_output or (
            "denoised" if args.stop_at is not None or args.stop_on_convergence is not None else "finish")
        with _graceful_interrupt(token, stop_output):
            out = pipe(**request.call_kwargs(args.device), callback_on_step_end=callbacks or None, cancel=token,
                       interrupt_output=stop_output)

        # 3. Write the images, each with its metadata; inpainting first gets the kept region's own pixels back.
        _write_images(args, folder, request, pipe, out, paths, files, cache)
    if files.preview is not None:
        print(f"stepdiff: previews: {files.preview.describe(out.record.steps_total)}", file=sys.stderr, flush=True)
        for extra in (args.animation, args.contact_sheet):
            if extra is not None:
                print(extra)
    if args.verbose:
        print(f"record: {out.record.to_dict()}", file=sys.stderr)
    return 0


def _native_size(folder: Path) -> int:
    from ..limits import ModelShape

    return ModelShape.from_folder(folder).native_size


def _stop_callbacks(args: argparse.Namespace) -> list:
    """--stop-on-convergence and --stop-at."""
    from ..callbacks import StopOnConvergence

    callbacks: list = []
    if args.stop_on_convergence is not None:
        callbacks.append(StopOnConvergence(tolerance=args.stop_on_convergence, patience=args.patience))
    if args.stop_at is not None:
        stop_at = args.stop_at

        def stop(pipeline, i, t, kw):
            if i >= stop_at:
                pipeline._interrupt = True
            return kw

        callbacks.append(stop)
    return callbacks


def _claim(args: argparse.Namespace, outputs: list[Path] | None, files: _RunFiles) -> list[Path]:
    from ..images import claim_free_paths, claim_paths

    if outputs is None:
        files.claimed = claim_free_paths(Path.cwd(), "stepdiff", args.num_images)
        return files.claimed
    if args.overwrite:
        return outputs
    files.claimed = claim_paths(outputs)
    return files.claimed


def _previews(args: argparse.Namespace, files: _RunFiles):
    from ..preview import PreviewCallback

    files.preview_dir_created = args.preview_dir is not None and not args.preview_dir.exists()
    files.watch(args.animation)
    files.watch(args.contact_sheet)
    files.preview = PreviewCallback(
        folder=args.preview_dir, every=args.preview_every, source=args.preview_source, method=args.preview_method,
        animation=args.animation, contact_sheet=args.contact_sheet, frame_size=128, tiny_decoder=args.preview_decoder,
    )
    return files.preview


def _write_images(args: argparse.Namespace, folder: Path, request, pipe, out, paths: list[Path], files: _RunFiles,
                  cache: str | None) -> None:
    from ..metadata import write_image

    images, keep, feather = out.images, None, None
    if request.kind == "inpaint":
        from ..images import KEEP_UNMASKED_FEATHER, keep_unmasked

        keep = args.keep_unmasked is not False
        if keep:
            feather = KEEP_UNMASKED_FEATHER
            images = keep_unmasked(request.init_image, out.images, request.mask_image, feather=feather)
    record = {} if request.guidance_interval is None else {"guidance_interval": list(request.guidance_interval)}
    if request.control_image is not None:
        record.update(control=str(args.control), controlnet=str(args.controlnet_folder),
                      control_scale=request.control_scale, control_end=request.control_end)
    for i, (image, path) in enumerate(zip(images, paths)):
        settings = request.image_settings(
            str(folder), i, init_image=None if args.init_image is None else str(args.init_image),
            mask=None if args.mask is None else str(args.mask), cache=cache, keep_unmasked=keep,
            keep_unmasked_feather=feather,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            write_image(path, settings, image, pipe.scheduler, out, extra=record or None)
        for w in caught:
            _warn(str(w.message))
        files.written.append(path)
        print(path, flush=True)


class _DecodeNotice:
    """For sizes far above the model's: a line when the denoising ends, so the (silent) VAE decode is not a mystery."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self, pipeline, step_index, timestep, callback_kwargs) -> None:
        return None

    def on_run_end(self, pipeline) -> None:
        print(self.text, file=sys.stderr, flush=True)


def _warn_about_prompt(pipe, prompt: str, negative: str | None, info: dict) -> None:
    """Words the model does not know, and prompts longer than its text encoder reads."""
    from ..vocabulary import prompt_tokens, unknown_words, unknown_words_note

    note = unknown_words_note(*unknown_words(pipe.tokenizer, prompt, info.get("vocabulary")),
                              ignored=bool(info.get("ignores_unknown_words")))
    if note:
        _warn(note)
    t5 = getattr(pipe, "tokenizer_3", None)
    for flag, text in (("the prompt", prompt), ("--negative", negative)):
        if text is None:
            continue
        tokens, limit = prompt_tokens(t5 if t5 is not None else pipe.tokenizer, text)
        if tokens > limit:
            _warn(f"{flag} is {tokens} tokens but the text encoder reads only the first {limit} "
                  f"(start and end included); the rest is ignored")


