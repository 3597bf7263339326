"""stepdiff command line: flags map onto library calls; no logic of its own beyond wiring and checks.

    stepdiff generate "a red circle on a blue background"
    stepdiff eval-shapes
    stepdiff tiny-model DIR --family sdxl
    stepdiff batch prompts.jsonl --out images/ [--ray --workers 2]

Every flag a user can get wrong is checked before any model loads: a bad value exits with status 2 and
one line on stderr naming the flag, the value and what is allowed. A run that fails or is aborted
leaves nothing behind (its reserved image names and its preview frames are removed) and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MAX_GUIDANCE", "MAX_SEED", "MAX_STEPS", "SIZE_LIMIT_RATIO", "SIZE_WARN_RATIO", "Terminated", "main"]

_DTYPES = ("float32", "float16", "bfloat16")
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
MAX_GUIDANCE = 100.0  # beyond this the guided prediction saturates: black or white images, or NaN
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds
SIZE_WARN_RATIO = 2  # --size above this many times the native size (per side): a warning
SIZE_LIMIT_RATIO = 8  # ... above this: refused unless --force
MAX_STEPS = 10_000
MAX_SEEDS_PER_COMBO = 10_000
MAX_CONTROL_SCALE = 10.0
MAX_FIT_COUNT = 16_384
_FRAME = re.compile(r"^\d+\.png$")  # a preview frame, {step}.png


class Terminated(BaseException):
    """SIGTERM during a command: abort like a second Ctrl-C (a BaseException, so no library swallows it)."""


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
    p.add_argument("--dtype", default="float32", choices=_DTYPES, help="weights dtype (default float32)")
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="stepdiff", description="Text-to-image diffusion, steerable at every step.")
    parser.add_argument("--version", action="version", version=f"stepdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    g.add_argument("--stop-at", type=int, default=None, metavar="N", help="stop after step N (early stop)")
    g.add_argument("--stop-on-convergence", type=float, nargs="?", const=0.05, default=None, metavar="TOL",
                   help="stop once the x0 estimate changes by less than TOL (default 0.05) for --patience steps; "
                        "pair it with --scheduler euler (DDIM's estimate keeps drifting)")
    g.add_argument("--patience", type=int, default=3, metavar="N", help="steps for --stop-on-convergence (default 3)")
    g.add_argument("--stop-output", default=None, metavar="WHAT",
                   help="the picture of a run that stops early: finish (3 more steps on a re-timed schedule down to "
                        "t=0), finish:N (N steps), denoised (the x0 estimate of the step reached) or latents (the noisy "
                        "latents); default: finish, or denoised with --stop-at / --stop-on-convergence")
    g.add_argument("--verbose", action="store_true", help="print the run record (steps, model calls, rows, time)")
    _add_cache_flags(g)
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

    e = sub.add_parser("eval-shapes", help="judge prompt adherence of a shapes model on held-out prompts",
                       description="Generate the held-out prompts at fixed seeds and judge each image from its pixels.")
    _add_model_flags(e)
    e.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="guidance scales to evaluate (default: 1.0 and the model's default)")
    e.add_argument("--cfg-cutoff", type=_ratio, nargs="*", default=[0.4], metavar="RATIO",
                   help="also evaluate CFGCutoffCallback at these ratios, at the default guidance (default 0.4)")
    e.add_argument("--seeds-per-combo", type=int, default=9,
                   help=f"seeds per held-out combination, 1 to {MAX_SEEDS_PER_COMBO} (default 9: 216 pairs)")
    e.add_argument("--batch", type=int, default=24, help="images per pipeline call (default 24)")
    e.add_argument("--varied", action="store_true",
                   help="also judge each setting on captions as people write them (articles, capitals, punctuation, "
                        "word order, 'a photo of', 'high quality', unknown words), one per pair")
    e.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")

    f = sub.add_parser("fit-preview", help="fit a latent-to-RGB preview table for a model and store it in its folder",
                       description="Encode sample images, decode them with the full VAE, and fit rgb = latents @ "
                                   "factors + bias by least squares. Writes (replaces) MODEL_DIR/latent_rgb.json.")
    f.add_argument("model", type=Path, help="model folder")
    f.add_argument("--images", type=Path, default=None,
                   help="folder of at least 4 sample images (default: procedural coloured shapes)")
    f.add_argument("--count", type=int, default=512, help=f"procedural images to fit on, 4 to {MAX_FIT_COUNT} (default 512)")

    b = sub.add_parser("batch", help="make one image per row of a prompt file; resumable; here or on Ray",
                       description="Make one PNG per row of INPUT (a text file with one prompt a line, JSONL or CSV) "
                                   "into --out, with a manifest (manifest.jsonl). Run it again to resume: rows already "
                                   "made are skipped, changed rows are redone. Flags give the rows' defaults.")
    b.add_argument("input", type=Path, metavar="INPUT", help="prompts: .txt (one a line), .jsonl or .csv")
    b.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created if missing)")
    b.add_argument("--format", choices=("text", "jsonl", "csv"), default=None, help="INPUT's format (default: from its name)")
    _add_model_flags(b)
    b.add_argument("--guidance", type=float, default=None, help="default guidance scale (default: the model's)")
    b.add_argument("--negative", default=None, help="default negative prompt")
    b.add_argument("--seed", type=int, default=0, help="a row without a seed gets SEED + its row number, from 0 (default 0)")
    b.add_argument("--size", type=_size, default=None, help="default WIDTHxHEIGHT (default: the model's)")
    bcut = b.add_mutually_exclusive_group()
    bcut.add_argument("--cfg-cutoff", type=_ratio, default=None, metavar="RATIO", help="default CFG cutoff ratio")
    bcut.add_argument("--cfg-cutoff-step", type=int, default=None, metavar="N", help="default CFG cutoff step")
    bcut.add_argument("--guidance-interval", default=None, metavar="START,END",
                      help="default guidance interval, as ratios of the steps, e.g. 0.2,0.8")
    _add_cache_flags(b, "; the rows' default: a row's own fast or cache replaces it")
    b.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="rows per pipeline call, among rows with the same settings (default 1)")
    b.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads per pipeline (here, or each Ray worker; default 1). The same count "
                        "gives the same image bytes")
    b.add_argument("--strict", action="store_true", help="a bad row fails the run (default: reported and skipped)")
    b.add_argument("--verify", action="store_true",
                   help="on resume, check each done image's SHA-256 against the manifest (default: its size)")
    r = b.add_argument_group("Ray (pip install 'stepdiff[ray]')")
    r.add_argument("--ray", action="store_true", help="run on a local Ray started for this run")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="run on this Ray cluster (auto: the one this machine is in); --out must be a folder every "
                        "node sees")
    r.add_argument("--workers", type=int, default=1, metavar="N", help="Ray actors, one pipeline each (default 1)")
    r.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per worker (default: 1 where the cluster has GPUs, else 0)")

    v = sub.add_parser("serve", help="a live studio in the browser: queue, previews, stop, steer guidance, history",
                       description="Serve the studio (page, HTTP API, WebSocket events) on one model; prints the URL.")
    v.add_argument("--model", type=Path, default=None,
                   help="model folder, single-file .safetensors checkpoint or hub id (default: the shipped shapes model)")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other address requires a token)")
    v.add_argument("--port", type=int, default=7860, help="port, 0 for any free one (default 7860)")
    v.add_argument("--data", type=Path, default=Path("stepdiff-studio"),
                   help="folder for the job history (SQLite) and images (default ./stepdiff-studio)")
    v.add_argument("--token", default=None,
                   help="token every API call must carry (default: none on 127.0.0.1, generated and printed elsewhere)")
    v.add_argument("--workers", type=int, default=1, help="jobs run at once on the one loaded model (default 1)")
    v.add_argument("--queue-size", type=int, default=100, help="jobs that may wait; more get HTTP 429 (default 100)")
    v.add_argument("--max-steps", type=int, default=500, help="the most steps a job may ask for (default 500)")
    v.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds a client has to send a request's headers, and then its body (default 10); slower "
                        "connections are closed")
    v.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="HTTP connections held at once (default 512, fewer under a low open-file limit); past it the "
                        "connection that waited longest without a request is closed")
    v.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    v.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps or xpu (default cpu)")
    v.add_argument("--dtype", default="float32", choices=_DTYPES, help="weights dtype (default float32)")

    t = sub.add_parser("tiny-model", help="write a tiny random SD or SDXL model folder (for trying the API)")
    t.add_argument("out", type=Path, help="folder to create (an existing non-empty folder only with --overwrite)")
    t.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    t.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    return parser


# ----------------------------------------------------------------------------------------------- checks


def _at_least(flag: str, value: int, low: int, high: int | None = None, why: str = "") -> int:
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{flag} must be {allowed}{why}, got {value}")
    return value


def _check_guidance(flag: str, value: float) -> None:
    if not 0.0 <= value <= MAX_GUIDANCE:  # also refuses nan
        raise ValueError(f"{flag} must be a number in [0, {MAX_GUIDANCE:g}], got {value:g} "
                         "(far above 10 the images saturate to black or white)")


def _check_text(flag: str, text: str | None) -> None:
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{flag} is not valid UTF-8 text: {text[:40]!r}") from None


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N, mps or xpu") from None
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(f"--device {device!r}: stepdiff runs on cpu, cuda, mps or xpu")
    if dev.type == "cpu":
        return
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not backend.is_available():
        raise ValueError(f"--device {device!r}: this torch ({torch.__version__}) cannot use a {dev.type} device here; "
                         "use --device cpu")
    if dev.index is not None and hasattr(backend, "device_count") and dev.index >= backend.device_count():
        raise ValueError(f"--device {device!r}: this machine has {backend.device_count()} {dev.type} device(s), "
                         f"numbered from 0")


def _check_model_folder(flag: str, folder: Path) -> None:
    from .pipelines.base import StepDiffPipeline

    try:
        StepDiffPipeline._check_folder(folder)
    except (OSError, ValueError) as e:
        raise type(e)(f"{flag}: {e}") from None


def _resolve_model(flag: str, model: Path, allow_pickle: bool = False) -> Path:
    """--model as a local path: a model folder, a single-file checkpoint (header checked, configs derived) or a hub
    id's snapshot folder (downloaded where a network is, else from the local hub cache)."""
    from .single_file import config_folder, resolve_model

    try:
        path = resolve_model(model, allow_pickle)
        if path.is_file():
            config_folder(path, allow_pickle)  # derived once, before anything loads
    except (OSError, ValueError) as e:
        raise type(e)(f"{flag}: {e}") from None
    return path


def _configs(model: Path) -> Path:
    """The folder that holds a model's configs: the model folder, or a single file's derived config folder."""
    if Path(model).is_file():
        from .single_file import config_folder

        return config_folder(model)
    return Path(model)


def _folder(args: argparse.Namespace) -> Path:
    from .models import default_model

    return args.model if args.model is not None else default_model()


def _scheduler_config(folder: Path) -> dict:
    import json

    try:
        config = json.loads((_configs(folder) / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _check_steps(args: argparse.Namespace, config: dict) -> None:
    """--steps in [1, MAX_STEPS]; above the training steps only for schedulers that can (DDIM and DDPM can't)."""
    from .schedulers import make_scheduler

    _at_least("--steps", args.steps, 1, MAX_STEPS)
    train = int(config.get("num_train_timesteps", 1000))
    if args.steps <= train:
        return
    name = args.scheduler or config.get("_class_name", "")
    try:  # the scheduler alone, from its config: no weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_scheduler(name, config).set_timesteps(args.steps)
    except ValueError as e:
        if "num_inference_steps" in str(e):
            raise ValueError(f"--steps must be in [1, {train}] with scheduler {name!r} (the model was trained with {train} "
                             f"steps), got {args.steps}") from None


def _check_common(args: argparse.Namespace) -> Path:
    """The model flags, checked before anything loads; returns the model folder."""
    from .schedulers import karras_schedulers, scheduler_class, supports_karras

    if args.model is not None:
        args.model = _resolve_model("--model", args.model, args.allow_pickle)
    folder = _folder(args)
    config = _scheduler_config(folder)
    if args.scheduler is not None:
        try:
            scheduler_class(args.scheduler)
        except ValueError as e:
            raise ValueError(f"--scheduler: {e}") from None
    _check_steps(args, config)
    if args.karras:
        name = args.scheduler or config.get("_class_name")  # default: the model's own scheduler
        has_karras = True
        with contextlib.suppress(ValueError):  # a scheduler class we don't list: diffusers decides
            has_karras = name is None or supports_karras(name)
        if not has_karras:
            raise ValueError(f"--karras: scheduler {name!r} has no Karras sigmas; add --scheduler with one of: "
                                 f"{', '.join(karras_schedulers())}")
    _check_device(args.device)
    return folder


def _check_memory(args: argparse.Namespace, shape, width: int, height: int, images: int, what: str) -> None:
    from .limits import device_memory, estimate_memory, format_bytes

    need = estimate_memory(shape, width, height, images, args.dtype)
    if args.max_memory is not None:
        limit, source = int(args.max_memory * 2**30), "--max-memory"
    else:
        limit, source = device_memory(args.device), f"the {args.device} device's memory"
    if limit is not None and need > limit:
        raise ValueError(f"{what} need about {format_bytes(need)} of memory (an estimate); the limit is "
                         f"{format_bytes(limit)}, {source}; make them smaller or raise the limit with --max-memory GIB")


def _check_writable_dir(flag: str, folder: Path) -> None:
    from .images import check_writable_dir

    check_writable_dir(folder.resolve(), flag)


def _check_new_file(flag: str, path: Path, overwrite: bool, suffixes: Sequence[str] | None = None) -> None:
    """An output file: its folder exists and is writable, it is not a folder, and it is new unless --overwrite."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a folder; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} must end in {', '.join(suffixes)}, got {str(path)!r}")
    _check_writable_dir(flag, path.parent)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {str(path)!r} already exists; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------- loading


def _from_pretrained(folder: Path, dtype: str = "float32", allow_pickle: bool = False, kind: str = "text2image",
                     controlnet: Path | None = None):
    """Load quietly: no loading bars (the denoising bar stays), no rename warnings."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from . import pipelines

    auto = {"text2image": pipelines.AutoPipelineForText2Image, "image2image": pipelines.AutoPipelineForImage2Image,
            "inpaint": pipelines.AutoPipelineForInpainting}[kind]

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    kwargs = {} if dtype == "float32" else {"torch_dtype": getattr(torch, dtype)}
    if Path(folder).is_file():
        return _from_single_file(Path(folder), kwargs, allow_pickle, kind, controlnet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers renames torch_dtype; both spellings work
        if controlnet is not None:
            from diffusers import ControlNetModel

            kwargs["controlnet"] = ControlNetModel.from_pretrained(
                controlnet, torch_dtype=kwargs.get("torch_dtype", torch.float32))
        return auto.from_pretrained(folder, allow_pickle=allow_pickle, **kwargs)


def _from_single_file(path: Path, kwargs: dict, allow_pickle: bool, kind: str, controlnet: Path | None):
    """A single-file checkpoint, offline: the family's pipeline of this kind, configs derived from the file."""
    import torch

    from .pipelines.registry import load, pipeline_for
    from .single_file import inspect, offline_kwargs

    info = inspect(path, allow_pickle)
    entry = pipeline_for(info.family, kind, controlnet is not None)
    if entry is None:
        raise ValueError(f"{str(path)!r} is a {info.family} checkpoint, which stepdiff does not run as {kind}"
                         f"{' with a ControlNet' if controlnet is not None else ''}")
    cls = load(entry)
    kwargs, notes = offline_kwargs(path, cls, kwargs, allow_pickle)
    for note in notes:
        _warn(note)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if controlnet is not None:
            from diffusers import ControlNetModel

            kwargs["controlnet"] = ControlNetModel.from_pretrained(
                controlnet, torch_dtype=kwargs.get("torch_dtype", torch.float32))
        return cls.from_single_file(str(path), allow_pickle=allow_pickle, **kwargs)


def _kind(args: argparse.Namespace) -> str:
    if getattr(args, "init_image", None) is None:
        return "text2image"
    return "inpaint" if args.mask is not None else "image2image"


def _load(args: argparse.Namespace, folder: Path):
    from .schedulers import make_scheduler

    pipe = _from_pretrained(folder, args.dtype, args.allow_pickle, _kind(args), getattr(args, "controlnet_folder", None))
    pipe.to(args.device)
    if args.scheduler is not None or args.karras:
        name = args.scheduler or type(pipe.scheduler).__name__
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config, karras=args.karras)
    return pipe


def _warn(message: str) -> None:
    print(f"stepdiff: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------- files of a run


class _RunFiles:
    """What a run puts on disk, so that a failed or aborted run can take it back and say exactly what it kept."""

    def __init__(self) -> None:
        self.claimed: list[Path] = []  # image names reserved (empty placeholders until written)
        self.written: list[Path] = []
        self.preview = None  # the PreviewCallback
        self.preview_dir_created = False
        self.extras: dict[Path, int | None] = {}  # animation / contact sheet -> mtime before the run (None: new)

    def watch(self, path: Path | None) -> None:
        if path is not None:
            self.extras[path] = path.stat().st_mtime_ns if path.exists() else None

    def undo(self) -> str:
        """Remove what the run wrote, except finished images; describe what is left."""
        from .images import release_claims

        release_claims([p for p in self.claimed if p not in self.written])
        removed = []
        folder = getattr(self.preview, "folder", None)
        if folder is not None:
            frames = [folder / f"{step}.png" for step, _ in self.preview.frames]
            count = sum(1 for p in frames if p.exists())
            for p in frames:
                p.unlink(missing_ok=True)
            if self.preview_dir_created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
            if count:
                removed.append(f"the {count} preview frame{'s' * (count != 1)} it wrote in {str(folder)!r}")
        for path, before in self.extras.items():
            if path.exists() and (before is None or path.stat().st_mtime_ns != before):
                path.unlink()
                removed.append(repr(str(path)))
        if self.written:
            kept = f"kept the {len(self.written)} image(s) printed above, nothing else"
        else:
            kept = "nothing written"
        return kept + (f" (removed {' and '.join(removed)})" if removed else "")


@contextlib.contextmanager
def _undo_on_failure(files: _RunFiles):
    try:
        yield
    except BaseException as e:
        e.stepdiff_kept = files.undo()  # type: ignore[attr-defined]
        raise


# --------------------------------------------------------------------------------------- commands


def _generate_outputs(args: argparse.Namespace) -> list[Path] | None:
    """The --output paths (checked, not yet reserved); None for automatic stepdiff-NNNNN.png names."""
    from .images import image_format

    if args.output is None:
        _check_writable_dir("the current folder", Path.cwd())
        return None
    if args.output.is_dir():
        raise IsADirectoryError(f"--output {str(args.output)!r} is a folder; give a file name ending in .png")
    image_format(args.output)
    _check_writable_dir("--output", args.output.parent)
    stem, ext = args.output.with_suffix(""), args.output.suffix
    paths = [args.output] if args.num_images == 1 else [stem.with_name(f"{stem.name}-{i + 1}{ext}")
                                                       for i in range(args.num_images)]
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(f"--output: {str(path)!r} is a folder")
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"--output {str(path)!r} already exists; pass --overwrite to replace it")
    return paths


def _check_previews(args: argparse.Namespace, outputs: list[Path] | None) -> None:
    if args.preview_dir is not None:
        folder = args.preview_dir
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"--preview-dir {str(folder)!r} exists and is not a folder")
            _check_writable_dir("--preview-dir", folder)
            frames = sorted(p.name for p in folder.iterdir() if _FRAME.match(p.name))
            if frames and not args.overwrite:
                raise FileExistsError(f"--preview-dir {str(folder)!r} already holds {len(frames)} preview frame(s) "
                                      f"({frames[0]}, ...); choose another folder or pass --overwrite")
        else:
            _check_writable_dir("--preview-dir", folder.parent)
    if args.animation is not None:
        _check_new_file("--animation", args.animation, args.overwrite, (".gif", ".webp"))
    if args.contact_sheet is not None:
        _check_new_file("--contact-sheet", args.contact_sheet, args.overwrite, (".png", ".jpg", ".jpeg", ".webp"))
    seen: dict[Path, str] = {p.resolve(): "--output" for p in outputs or []}
    for flag, path in (("--animation", args.animation), ("--contact-sheet", args.contact_sheet)):
        if path is not None:
            if path.resolve() in seen:
                raise ValueError(f"{flag} {str(path)!r} is also the {seen[path.resolve()]} file")
            seen[path.resolve()] = flag


def _check_generate(args: argparse.Namespace):
    """Every generate flag, before the model loads. Returns (model folder, (width, height))."""
    from .limits import ModelShape

    _check_text("PROMPT", args.prompt)
    _check_text("--negative", args.negative)
    folder = _check_common(args)
    _at_least("--num-images", args.num_images, 1)
    _at_least("--seed", args.seed, 0, MAX_SEED)
    if args.seed + args.num_images - 1 > MAX_SEED:
        raise ValueError(f"--seed {args.seed} with --num-images {args.num_images} runs past the largest seed, 2**64-1")
    if args.guidance is not None:
        _check_guidance("--guidance", args.guidance)
    if args.preview_every is not None:
        _at_least("--preview-every", args.preview_every, 1)
    _at_least("--patience", args.patience, 1)
    if args.stop_at is not None:
        _at_least("--stop-at", args.stop_at, 0)
    if args.cfg_cutoff_step is not None:
        _at_least("--cfg-cutoff-step", args.cfg_cutoff_step, 0)
    if args.stop_on_convergence is not None and not 0.0 < args.stop_on_convergence < math.inf:
        raise ValueError(f"--stop-on-convergence must be a number > 0, got {args.stop_on_convergence}")
    if args.stop_output is not None:
        from .finishing import parse_interrupt_output

        parse_interrupt_output(args.stop_output, "--stop-output")
    try:
        shape = ModelShape.from_folder(folder)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    if args.init_image is not None:
        args.size = _check_init_images(args, shape)
    elif args.mask is not None or args.strength is not None:
        flag = "--mask" if args.mask is not None else "--strength"
        raise ValueError(f"{flag} needs --init-image (the picture to start from)")
    if args.keep_unmasked is not None and args.mask is None:
        flag = "--keep-unmasked" if args.keep_unmasked else "--no-keep-unmasked"
        raise ValueError(f"{flag} needs --mask (it is about inpainting's kept region)")
    width, height = args.size if args.size is not None else (shape.native_size, shape.native_size)
    if args.size is not None:
        for name, v in zip(("width", "height"), args.size):
            if v < shape.min_size or v % shape.size_multiple:
                raise ValueError(f"--size {name} must be a positive multiple of {shape.size_multiple}, at least "
                                 f"{shape.min_size} for this model, got {v}")
        ratio = max(width, height) / shape.native_size
        native = f"{shape.native_size}x{shape.native_size}"
        if ratio > SIZE_LIMIT_RATIO and not args.force:
            from .limits import estimate_memory, format_bytes

            need = format_bytes(estimate_memory(shape, width, height, args.num_images, args.dtype))
            raise ValueError(f"--size {width}x{height} is {ratio:g} times the model's native {native} per side; the limit "
                             f"is {SIZE_LIMIT_RATIO} times: the run would need about {need} and each step slows down with "
                             "the square of the pixel count (self-attention); pass --force to run anyway")
    _check_control(args, folder, width, height)
    # T-GATE's gate is a share of the steps that run (image to image runs int(steps * strength) of them)
    run_steps = args.steps if args.init_image is None else max(1, min(args.steps, int(args.steps * args.strength)))
    args.policies = _check_cache(args, folder, run_steps)
    _check_memory(args, shape, width, height, args.num_images,
                  f"--size {width}x{height} and --num-images {args.num_images}")
    ratio = max(width, height) / shape.native_size
    if ratio > SIZE_WARN_RATIO:  # only for a run that goes ahead
        _warn(f"--size {width}x{height} is {ratio:g} times the model's native {shape.native_size}x{shape.native_size} "
              "per side: expect repeated or broken shapes, and slow steps")
    return folder, (width, height)


def _check_cache(args: argparse.Namespace, folder: Path, steps: int) -> list:
    """--fast / --cache: the run's compute policies (stepdiff.caching), checked against the model folder's
    layout (no weights) so that a bad spec or a policy the model cannot take fails before anything loads."""
    from .cache_options import cache_policies, check_policies, has_unet

    policies = cache_policies(args.fast, args.cache, steps, "--cache")
    check_policies(policies, "--fast" if args.fast else "--cache", has_unet(folder))
    return policies


def _check_control(args: argparse.Namespace, folder: Path, width: int, height: int) -> None:
    """--control, --controlnet, --control-scale and --control-end; sets args.controlnet_folder and args.control_picture."""
    import json
    from types import SimpleNamespace

    from .models import default_controlnet, default_model
    from .pipelines.controlnet import check_controlnet_fits

    args.controlnet_folder = args.control_picture = None
    if args.control is None:
        for flag, value in (("--controlnet", args.controlnet), ("--control-scale", args.control_scale),
                            ("--control-end", args.control_end)):
            if value is not None:
                raise ValueError(f"{flag} needs --control (the control picture)")
        return
    if args.mask is not None:
        raise ValueError("--control with --mask (ControlNet inpainting) is not supported; use one or the other")
    if args.control_scale is not None and not 0.0 <= args.control_scale <= MAX_CONTROL_SCALE:
        raise ValueError(f"--control-scale must be a number from 0 to {MAX_CONTROL_SCALE:g}, got {args.control_scale}")
    if args.control_end is not None and not 0.0 < args.control_end <= 1.0:
        raise ValueError(f"--control-end must be a number in (0, 1], got {args.control_end}")
    if args.controlnet is None:
        if args.model is not None and args.model.resolve() != default_model().resolve():
            raise ValueError(f"--control with --model {str(args.model)!r} needs --controlnet DIR: the shipped ControlNet "
                             "fits the shipped model only")
        args.controlnet = default_controlnet()
    elif not (args.controlnet / "config.json").is_file():
        raise ValueError(f"--controlnet {str(args.controlnet)!r} is not a ControlNet folder (it has no config.json)")
    config = json.loads((args.controlnet / "config.json").read_text())
    if config.get("_class_name") != "ControlNetModel":
        raise ValueError(f"--controlnet {str(args.controlnet)!r} holds a {config.get('_class_name')!r}, not a "
                         "ControlNetModel")
    unet = json.loads((_configs(folder) / "unet" / "config.json").read_text())
    try:  # the configs decide whether the ControlNet fits, before any weights load
        check_controlnet_fits(SimpleNamespace(config=SimpleNamespace(**config)), SimpleNamespace(config=SimpleNamespace(**unet)))
    except ValueError as e:
        raise ValueError(f"--controlnet {str(args.controlnet)!r} does not fit --model {str(folder)!r}: "
                         f"{str(e).split(': ', 1)[1]}") from None
    picture = _read_picture("--control", args.control, "RGB")
    if picture.size != (width, height):
        raise ValueError(f"--control is {picture.width}x{picture.height} but the output is {width}x{height}; "
                         "give a control picture of the output size")
    args.controlnet_folder, args.control_picture = args.controlnet, picture


def _read_picture(flag: str, path: Path, mode: str):
    """A picture file, fully decoded now (stepdiff.images.read_image), so that a bad file fails before the model loads."""
    from .images import read_image

    return read_image(path, what=flag, mode=mode)


def _check_init_images(args: argparse.Namespace, shape) -> tuple[int, int]:
    """--init-image, --mask and --strength; the size of the run is the picture's."""
    args.init_picture = _read_picture("--init-image", args.init_image, "RGB")
    args.mask_picture = None if args.mask is None else _read_picture("--mask", args.mask, "L")
    width, height = args.init_picture.size
    if args.mask_picture is not None and args.mask_picture.size != (width, height):
        mw, mh = args.mask_picture.size
        raise ValueError(f"--mask is {mw}x{mh} but --init-image is {width}x{height}; they must be the same size")
    if args.size is not None and tuple(args.size) != (width, height):
        raise ValueError(f"--size {args.size[0]}x{args.size[1]} differs from --init-image's {width}x{height}; "
                         "leave --size out (the picture's size is used) or resize the picture")
    for name, v in (("width", width), ("height", height)):
        if v < shape.min_size or v % shape.size_multiple:
            raise ValueError(f"--init-image {name} must be a multiple of {shape.size_multiple}, at least {shape.min_size} "
                             f"for this model, got {v}")
    if args.strength is None:
        args.strength = 1.0 if args.mask is not None else 0.6
    if not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be a number in (0, 1], got {args.strength}")
    if int(args.steps * args.strength) < 1:
        raise ValueError(f"--strength {args.strength} with --steps {args.steps} leaves no denoising step "
                         f"(int({args.steps} x {args.strength}) = 0); raise --strength or --steps")
    return width, height


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .callbacks import CFGCutoffCallback, StopOnConvergence
    from .control import CancelToken
    from .images import claim_free_paths, claim_paths
    from .limits import ModelShape
    from .metadata import ImageSettings, write_image

    # 1. Everything a user can get wrong is checked before the model loads.
    folder, (width, height) = _check_generate(args)
    outputs = _generate_outputs(args)
    _check_previews(args, outputs)
    cache = None
    if args.policies:
        from .caching import describe

        cache = describe(args.policies)
        print(f"stepdiff: {'--fast' if args.fast else '--cache'}: {cache}", file=sys.stderr, flush=True)

    callbacks = []
    if args.cfg_cutoff is not None:
        callbacks.append(CFGCutoffCallback(cutoff_step_ratio=args.cfg_cutoff))
    if args.cfg_cutoff_step is not None:
        callbacks.append(CFGCutoffCallback(cutoff_step_index=args.cfg_cutoff_step))
    if args.stop_on_convergence is not None:
        callbacks.append(StopOnConvergence(tolerance=args.stop_on_convergence, patience=args.patience))
    if args.stop_at is not None:
        stop_at = args.stop_at

        def stop(pipeline, i, t, kw):
            if i >= stop_at:
                pipeline._interrupt = True
            return kw

        callbacks.append(stop)

    if max(width, height) > SIZE_WARN_RATIO * ModelShape.from_folder(folder).native_size:
        callbacks.append(_DecodeNotice(f"stepdiff: denoising done; decoding {args.num_images} image(s) at {width}x{height}"))

    # 2. Reserve the image names (atomically: concurrent runs never share one), then run. From here on a
    # failure or an abort takes back what the run wrote.
    files = _RunFiles()
    with _undo_on_failure(files):
        if outputs is None:
            files.claimed = claim_free_paths(Path.cwd(), "stepdiff", args.num_images)
            paths = files.claimed
        elif args.overwrite:
            paths = outputs
        else:
            files.claimed = paths = claim_paths(outputs)
        if args.preview_dir is not None or args.animation is not None or args.contact_sheet is not None:
            from .preview import PreviewCallback

            files.preview_dir_created = args.preview_dir is not None and not args.preview_dir.exists()
            files.watch(args.animation)
            files.watch(args.contact_sheet)
            files.preview = PreviewCallback(
                folder=args.preview_dir, every=args.preview_every, source=args.preview_source,
                method=args.preview_method, animation=args.animation, contact_sheet=args.contact_sheet, frame_size=128,
                tiny_decoder=args.preview_decoder,
            )
            callbacks.append(files.preview)
        callbacks += args.policies  # step caching composes with the callbacks above (cutoff, stops, previews)

        pipe = _load(args, folder)
        info = _model_info(folder)
        _warn_about_prompt(pipe, args.prompt, args.negative, info)
        guidance = args.guidance if args.guidance is not None else _default_guidance(info)
        generators = [torch.Generator(args.device).manual_seed(args.seed + i) for i in range(args.num_images)]
        token = CancelToken()
        kind = _kind(args)
        extra: dict = {}
        if kind != "text2image":
            extra = {"image": args.init_picture, "strength": args.strength}
        if kind == "inpaint":
            extra["mask_image"] = args.mask_picture
        if kind != "image2image":  # image to image takes the picture's size
            extra.update(width=width, height=height)
        if args.control_picture is not None:
            extra["control_image" if kind == "image2image" else "image"] = args.control_picture
            if kind == "image2image":
                extra["image"] = args.init_picture
            extra.update(controlnet_conditioning_scale=1.0 if args.control_scale is None else args.control_scale,
                         control_guidance_end=1.0 if args.control_end is None else args.control_end)
        stop_output = args.stop_output or (
            "denoised" if args.stop_at is not None or args.stop_on_convergence is not None else "finish")
        with _graceful_interrupt(token, stop_output):
            out = pipe(
                prompt=args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                guidance_scale=guidance, num_images_per_prompt=args.num_images, generator=generators,
                callback_on_step_end=callbacks or None, cancel=token, interrupt_output=stop_output, **extra,
            )

        # 3. Write the images, each with its metadata; inpainting first gets the kept region's own pixels back.
        record = out.record.to_dict()
        images, keep, feather = out.images, None, None
        if kind == "inpaint":
            from .images import KEEP_UNMASKED_FEATHER, keep_unmasked

            keep = args.keep_unmasked is not False
            if keep:
                feather = KEEP_UNMASKED_FEATHER
                images = keep_unmasked(args.init_picture, out.images, args.mask_picture, feather=feather)
        control_record = None if args.control_picture is None else {
            "control": str(args.control), "controlnet": str(args.controlnet_folder),
            "control_scale": extra["controlnet_conditioning_scale"], "control_end": extra["control_guidance_end"],
        }
        for i, (image, path) in enumerate(zip(images, paths)):
            settings = ImageSettings(
                prompt=args.prompt, negative_prompt=args.negative, seed=args.seed + i, steps=args.steps,
                guidance_scale=guidance, model=str(folder), cfg_cutoff_ratio=args.cfg_cutoff,
                cfg_cutoff_step=args.cfg_cutoff_step, strength=args.strength,
                init_image=None if args.init_image is None else str(args.init_image),
                mask=None if args.mask is None else str(args.mask), cache=cache, keep_unmasked=keep,
                keep_unmasked_feather=feather,
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                write_image(path, settings, image, pipe.scheduler, out, extra=control_record)
            for w in caught:
                _warn(str(w.message))
            files.written.append(path)
            print(path, flush=True)
    if files.preview is not None:
        print(f"stepdiff: previews: {files.preview.describe(out.record.steps_total)}", file=sys.stderr, flush=True)
        for extra in (args.animation, args.contact_sheet):
            if extra is not None:
                print(extra)
    if args.verbose:
        print(f"record: {record}", file=sys.stderr)
    return 0


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
    from .vocabulary import prompt_tokens, unknown_words, unknown_words_note

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


def cmd_fit_preview(args: argparse.Namespace) -> int:
    import torch

    from .preview import FITTED_TABLE_FILE, builtin_tables, fit_latent_rgb, images_to_tensor, preview_psnr

    _check_model_folder("fit-preview MODEL", args.model)
    _check_writable_dir(f"fit-preview MODEL (writes {FITTED_TABLE_FILE})", args.model)
    files = None
    if args.images is not None:
        if not args.images.is_dir():
            raise NotADirectoryError(f"--images {str(args.images)!r} is not a folder of images")
        files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if len(files) < 4:
            raise FileNotFoundError(f"--images {str(args.images)!r} holds {len(files)} .png/.jpg/.webp images; "
                                    "at least 4 are needed (3 to fit, 1 to check)")
        from .images import read_image
        from .limits import ModelShape

        size = ModelShape.from_folder(args.model).native_size  # the pipeline's default size; read before it loads
        pictures = [read_image(p, what="--images:", mode="RGB").resize((size, size)) for p in files]
    else:
        _at_least("--count", args.count, 4, MAX_FIT_COUNT, " (3/4 fit the table, 1/4 check it)")
    pipe = _from_pretrained(args.model)
    if files is not None:
        images = images_to_tensor(pictures)
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
def _signal_handler(signum: int, handler):
    """``handler`` for ``signum`` while the block runs, then the previous one again; off the main thread (where
    Python cannot handle signals) the block just runs."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:  # not the main thread: no signal handling
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _two_step_ctrl_c(stopping, stop, message: str):
    """First Ctrl-C: ``stop()`` and print ``message``. Second (``stopping()`` is true): abort with KeyboardInterrupt."""

    def handler(signum, frame):
        if stopping():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop()
        print(f"\nstepdiff: {message} (Ctrl-C again to abort)", file=sys.stderr)

    return _signal_handler(signal.SIGINT, handler)


def _graceful_interrupt(token, stop_output: str = "denoised"):
    """First Ctrl-C: stop after the current step and keep the image (finished in a few more steps with
    ``--stop-output finish``, the default). Second: abort, writing nothing."""
    from .finishing import parse_interrupt_output

    policy, steps = parse_interrupt_output(stop_output)
    message = "stopping after this step"
    if policy == "finish":
        message += f", then finishing the picture in {steps} step{'s' if steps > 1 else ''} at most"
    return _two_step_ctrl_c(lambda: token.cancelled, lambda: token.cancel("interrupted by Ctrl-C"), message)


def _terminate_aborts():
    """SIGTERM raises Terminated, so a run is taken back and reported like a second Ctrl-C (exit 143)."""

    def handler(signum, frame):
        raise Terminated

    return _signal_handler(signal.SIGTERM, handler)


def _model_info(folder: Path) -> dict:
    """stepdiff.json in a model folder: recommended settings and training vocabulary, where recorded."""
    import json

    info = Path(folder) / "stepdiff.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def _default_guidance(info: dict) -> float:
    """The guidance the model folder recommends (its stepdiff.json); otherwise 7.5, as the convention has it."""
    return float(info.get("guidance_scale", 7.5))


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from .images import atomic_write
    from .limits import ModelShape
    from .shapes.evaluate import evaluate_table, format_breakdown, format_table

    folder = _check_common(args)
    for g in args.guidance or []:
        _check_guidance("--guidance", g)
    _at_least("--seeds-per-combo", args.seeds_per_combo, 1, MAX_SEEDS_PER_COMBO)
    _at_least("--batch", args.batch, 1)
    shape = ModelShape.from_folder(folder)
    _check_memory(args, shape, shape.native_size, shape.native_size, args.batch, f"--batch {args.batch} images")
    if args.json is not None:
        _check_new_file("--json", args.json, args.overwrite)
    pipe = _load(args, folder)
    default = _default_guidance(_model_info(folder))
    guidances = args.guidance if args.guidance is not None else sorted({1.0, default})
    rows = evaluate_table(pipe, guidances=guidances, default_guidance=default, cutoffs=args.cfg_cutoff,
                          steps=args.steps, seeds_per_combo=args.seeds_per_combo, batch=args.batch,
                          varied=args.varied)
    print(format_table(rows))
    for row in rows:  # where the misses are: per shape, per colour, and which shape was drawn instead
        print()
        print(format_breakdown(row))
    if args.json is not None:
        import json

        data = json.dumps(rows, indent=1).encode()
        print(atomic_write(args.json, lambda f: f.write(data)))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import threading

    from .batch import BatchConfig, BatchDefaults, run_batch
    from .batch.rows import _interval

    folder = _check_common(args)
    _at_least("--seed", args.seed, 0, MAX_SEED)
    if args.guidance is not None:
        _check_guidance("--guidance", args.guidance)
    if args.cfg_cutoff_step is not None:
        _at_least("--cfg-cutoff-step", args.cfg_cutoff_step, 0)
    interval = None
    if args.guidance_interval is not None:
        def bad(message: str) -> ValueError:
            return ValueError(message.replace("guidance_interval", "--guidance-interval"))

        interval = _interval(bad, args.guidance_interval)
    _check_text("--negative", args.negative)
    cache = None
    if args.cache is not None or args.fast:
        from .cache_options import normalize_spec

        _check_cache(args, folder, args.steps)
        cache = None if args.cache is None else normalize_spec(args.cache)
    _at_least("--batch-size", args.batch_size, 1, 4096)
    _at_least("--threads", args.threads, 1, 1024)
    _at_least("--workers", args.workers, 1, 100_000)
    width, height = args.size if args.size is not None else (None, None)
    defaults = BatchDefaults(
        negative_prompt=args.negative, seed=args.seed, steps=args.steps, width=width, height=height,
        guidance_scale=args.guidance, cfg_cutoff=args.cfg_cutoff, cfg_cutoff_step=args.cfg_cutoff_step,
        guidance_interval=interval, scheduler=args.scheduler, karras=args.karras, cache=cache, fast=args.fast,
    )
    config = BatchConfig(
        input=args.input, out=args.out, model=folder, defaults=defaults, format=args.format, dtype=args.dtype,
        device=args.device, allow_pickle=args.allow_pickle, threads=args.threads, batch_size=args.batch_size,
        strict=args.strict, verify=args.verify, ray=args.ray, ray_address=args.ray_address, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
    )
    if not config.uses_ray:
        from .limits import ModelShape

        shape = ModelShape.from_folder(folder)
        w, h = width or shape.native_size, height or shape.native_size
        _check_memory(args, shape, w, h, args.batch_size, f"--batch-size {args.batch_size} images of {w}x{h}")
    stop = threading.Event()
    try:
        with _stop_on_interrupt(stop):
            result = run_batch(config, stop=stop, on_event=_warn)
    except ImportError as e:  # Ray missing: a flag this installation cannot serve
        raise ValueError(str(e)) from None
    print(result.summary())
    return 130 if result.stopped else 0


def _stop_on_interrupt(stop):
    """First Ctrl-C: finish the images in flight, record them, stop. Second: abort at once."""
    return _two_step_ctrl_c(stop.is_set, stop.set, "stopping after the images in flight")


# What `stepdiff serve` imports (websockets: uvicorn's WebSocket protocol, which it picks at run time), as pyproject.toml's
# base dependencies declare them
STUDIO_REQUIREMENTS = {"starlette": "starlette>=0.40", "uvicorn": "uvicorn>=0.30", "websockets": "websockets>=12"}


def _check_studio_modules() -> None:
    """Base dependencies since the studio's extra was folded in; an environment without them (an older install, a
    --no-deps install) gets one line saying what to install, before the model loads."""
    import importlib

    missing = []
    for name in STUDIO_REQUIREMENTS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        wanted = " ".join(f"'{STUDIO_REQUIREMENTS[name]}'" for name in STUDIO_REQUIREMENTS)
        raise ValueError(f"serve needs {', '.join(missing)}, missing here (stepdiff depends on it; an older or a --no-deps "
                         f"install may lack it): pip install {wanted}")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.model is not None:
        args.model = _resolve_model("--model", args.model, getattr(args, "allow_pickle", False))
    folder = _folder(args)
    _at_least("--port", args.port, 0, 65535)
    _at_least("--workers", args.workers, 1, 64)
    _at_least("--queue-size", args.queue_size, 1, 100_000)
    _at_least("--max-steps", args.max_steps, 1, MAX_STEPS)
    if args.threads is not None:
        _at_least("--threads", args.threads, 1, 1024)
    if not 0.1 <= args.request_timeout <= 3600:  # also refuses nan
        raise ValueError(f"--request-timeout must be a number of seconds in [0.1, 3600], got {args.request_timeout}")
    if args.max_connections is not None:
        _at_least("--max-connections", args.max_connections, 8, 100_000)
    if args.token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,256}", args.token):
        raise ValueError("--token must be 8 to 256 characters from A-Z a-z 0-9 . _ ~ -, got "
                         f"{len(args.token)} characters")
    if args.data.exists() and not args.data.is_dir():
        raise NotADirectoryError(f"--data {str(args.data)!r} is a file, not a folder")
    _check_writable_dir("--data", args.data if args.data.is_dir() else args.data.parent)
    _check_device(args.device)
    _check_studio_modules()
    from .studio.server import load_studio, serve

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    studio = load_studio(folder, args.data, workers=args.workers, queue_size=args.queue_size, max_steps=args.max_steps,
                         device=args.device, dtype=args.dtype)
    with contextlib.suppress(KeyboardInterrupt, Terminated):  # Ctrl-C and SIGTERM are how a server stops
        serve(studio, host=args.host, port=args.port, token=args.token, request_timeout=args.request_timeout,
              max_connections=args.max_connections)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from .testing import make_tiny_sd, make_tiny_sdxl

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"tiny-model OUT {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"tiny-model OUT {str(out)!r} is a folder that is not empty; pass --overwrite to replace it")
    _check_writable_dir("tiny-model OUT", out.parent)
    # Built beside its destination, then renamed into place: never half a model folder under its name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (make_tiny_sd if args.family == "sd" else make_tiny_sdxl)(tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        old = None
        if out.is_dir():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(out)
    return 0


def _names_hub_id(args: argparse.Namespace) -> bool:
    """--model names a hub id (owner/name that is no local path): the one case where the CLI may use the network
    (unless HF_HUB_OFFLINE=1 is set), to download it through diffusers as the classic loader does."""
    from .single_file import is_hub_id

    model = getattr(args, "model", None)
    return isinstance(model, Path) and not model.exists() and is_hub_id(str(model))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: already printed
        return int(e.code or 0)
    if not _names_hub_id(args):  # (parsing imports no hub library, so this still decides its offline mode)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only: nothing reaches a hub by accident
    commands = {
        "generate": cmd_generate, "eval-shapes": cmd_eval_shapes, "fit-preview": cmd_fit_preview,
        "tiny-model": cmd_tiny_model, "batch": cmd_batch, "serve": cmd_serve,
    }
    try:
        with _terminate_aborts():
            return commands[args.command](args)
    except (ValueError, TypeError, OSError) as e:
        print(f"stepdiff: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"stepdiff: aborted; {getattr(e, 'stepdiff_kept', 'nothing written')}", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"stepdiff: terminated; {getattr(e, 'stepdiff_kept', 'nothing written')}", file=sys.stderr)
        return 143
    except FloatingPointError as e:  # the run's numbers blew up (NaN/inf): the message names the step and the likely cause
        print(f"stepdiff: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or the machine (out of memory): still one line; STEPDIFF_TRACEBACK=1 shows it
        if os.environ.get("STEPDIFF_TRACEBACK"):
            raise
        print(f"stepdiff: error: {type(e).__name__}: {_one_line(e)} (STEPDIFF_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
