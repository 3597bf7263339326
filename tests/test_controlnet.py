"""ControlNet on the shared loop: parity with diffusers on tiny models, the classic cutoff callbacks' defects
reproduced on diffusers and fixed here, per-run scales, guess mode, control windows and bad input."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers import callbacks as classic

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, SDXLControlnetCFGCutoffCallback

from .conftest import control_image, gen

STEPS = 4
IMAGES = [control_image(seed=5), control_image(seed=6)]
CLASSES = {
    "sd": (stepdiff.StableDiffusionControlNetPipeline, diffusers.StableDiffusionControlNetPipeline),
    "sdxl": (stepdiff.StableDiffusionXLControlNetPipeline, diffusers.StableDiffusionXLControlNetPipeline),
}
_cache: dict = {}


def _controlnets(family, request):
    key = ("nets", family)
    if key not in _cache:
        from stepdiff.testing import make_tiny_controlnet

        base = request.getfixturevalue(f"{family}_folder")
        first = request.getfixturevalue(f"{family}_controlnet_folder")
        second = make_tiny_controlnet(request.getfixturevalue("tmp_path_factory").mktemp(f"{family}-cn2"), base, seed=1)
        _cache[key] = (base, [ControlNetModel.from_pretrained(first), ControlNetModel.from_pretrained(second)])
    return _cache[key]


def _pipes(family, nets, request):
    """(stepdiff pipeline, diffusers pipeline) on the same weights; ``nets``: 1 or 2 ControlNets."""
    key = (family, nets)
    if key not in _cache:
        base, cns = _controlnets(family, request)
        controlnet = cns[0] if nets == 1 else cns
        pair = tuple(cls.from_pretrained(base, controlnet=controlnet) for cls in CLASSES[family])
        for p in pair:
            p.set_progress_bar_config(disable=True)
        _cache[key] = pair
    return _cache[key]


def _kw(nets, prompts, **kw):
    gens = [gen(i) for i in range(len(prompts) * kw.get("num_images_per_prompt", 1))]
    image = IMAGES[0] if nets == 1 else IMAGES
    return {"prompt": prompts, "image": image, "generator": gens, "num_inference_steps": STEPS, "output_type": "np", **kw}


PARITY = {
    "batch1": dict(prompts=["a photo of a cat"]),
    "batch2": dict(prompts=["a photo of a cat", "a red car"], negative_prompt=["blue", "dog"]),
    "guess-mode": dict(prompts=["a photo of a cat", "a red car"], guess_mode=True),
    "guess-mode-no-cfg": dict(prompts=["a photo of a cat"], guess_mode=True, guidance_scale=1.0),
    "end-0.5": dict(prompts=["a photo of a cat", "a red car"], control_guidance_end=0.5),
    "window-scale": dict(prompts=["a dog"], num_images_per_prompt=2, control_guidance_start=0.25,
                         controlnet_conditioning_scale=0.6),
}


SDXL_ONLY = {"denoising-end": dict(prompts=["a photo of a cat"], denoising_end=0.6, control_guidance_end=0.75)}


@pytest.mark.parametrize("nets", [1, 2])
@pytest.mark.parametrize("case", SDXL_ONLY)
def test_sdxl_only_arguments_match_diffusers(case, nets, request):
    """The control windows are fractions of the whole schedule, before denoising_end cuts it (as the classic one)."""
    ours, theirs = _pipes("sdxl", nets, request)
    args = dict(SDXL_ONLY[case])
    a = ours(**_kw(nets, args.pop("prompts"), num_inference_steps=8, **args, output_type="latent")).images
    args = dict(SDXL_ONLY[case])
    b = theirs(**_kw(nets, args.pop("prompts"), num_inference_steps=8, **args, output_type="latent")).images
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("case", PARITY)
@pytest.mark.parametrize("nets", [1, 2])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_matches_diffusers(family, nets, case, request):
    ours, theirs = _pipes(family, nets, request)
    args = dict(PARITY[case])
    a = ours(**_kw(nets, args.pop("prompts"), **args)).images
    args = dict(PARITY[case])
    b = theirs(**_kw(nets, args.pop("prompts"), **args)).images
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_control_image_matters(family, request):
    """The tiny ControlNets' residuals are not zero, so the parity above is not trivial."""
    ours, _ = _pipes(family, 2, request)
    base = ours(**_kw(2, ["a cat"])).images
    off = ours(**_kw(2, ["a cat"], controlnet_conditioning_scale=0.0)).images
    other = ours(**_kw(2, ["a cat"], image=[torch.ones_like(IMAGES[0]), torch.zeros_like(IMAGES[0])])).images
    assert np.abs(base - off).max() > 1e-1 and np.abs(base - other).max() > 1e-2


# ------------------------------------------------------------------ the classic callbacks' defects

CLASSIC_CUTOFFS = {
    "sd": [classic.SDCFGCutoffCallback],
    "sdxl": [classic.SDXLCFGCutoffCallback, classic.SDXLControlnetCFGCutoffCallback],
}
DEFECTS = [
    (family, nets, cb, batch)
    for family in ("sd", "sdxl") for nets in (1, 2) for cb in CLASSIC_CUTOFFS[family] for batch in (1, 2)
    # the only case the classic library gets through: one prompt, one ControlNet, the ControlNet callback
    if not (cb is classic.SDXLControlnetCFGCutoffCallback and nets == 1 and batch == 1)
]


@pytest.mark.parametrize("family,nets,callback,batch", DEFECTS,
                         ids=[f"{f}-{n}net-{c.__name__}-batch{b}" for f, n, c, b in DEFECTS])
def test_classic_cutoff_crashes_on_diffusers_and_is_batch_safe_here(family, nets, callback, batch, request):
    """diffusers #8686 and its relatives: the control image keeps its doubled batch (SDCFGCutoffCallback,
    SDXLCFGCutoffCallback), ``image[-1:]`` keeps one row of a batch, and with several ControlNets the list
    slice keeps the last ControlNet's doubled image. Here the same classic object runs as its batch-safe twin:
    each image of a batch-2 run with the cutoff equals the same prompt run alone with that cutoff."""
    ours, theirs = _pipes(family, nets, request)
    prompts = ["a photo of a cat", "a red car"][:batch]
    cb = callback(cutoff_step_ratio=0.5)
    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs(**_kw(nets, prompts, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs))
    out = ours(**_kw(nets, prompts, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs))
    assert out.record.rows_per_step == [2 * batch] * 3 + [batch]  # cutoff at step 2, guidance off from step 3
    for i, prompt in enumerate(prompts):
        alone = ours(**_kw(nets, [prompt], generator=[gen(i)], callback_on_step_end=CFGCutoffCallback(0.5))).images
        assert np.abs(out.images[i] - alone[0]).max() <= 1e-4


class _CorrectCutoff(classic.PipelineCallback):
    """What a correct classic SDXL ControlNet cutoff would do at batch 1: keep the conditional half of every
    tensor, of every ControlNet's image."""

    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids", "image"]  # noqa: RUF012

    def callback_fn(self, pipeline, step_index, timestep, kw):
        if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
            pipeline._guidance_scale = 0.0
            for name in self.tensor_inputs:
                value = kw[name]
                kw[name] = [v.chunk(2)[1] for v in value] if isinstance(value, list) else value.chunk(2)[1]
        return kw


@pytest.mark.parametrize("nets", [1, 2])
def test_sdxl_controlnet_cutoff_matches_diffusers_where_it_works(nets, request):
    """Parity of the cutoff itself: the official callback at batch 1 (one ControlNet), and a correctly slicing
    classic callback with two ControlNets, where the official one crashes (test above)."""
    ours, theirs = _pipes("sdxl", nets, request)
    cb = classic.SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5) if nets == 1 else _CorrectCutoff(cutoff_step_ratio=0.5)
    b = theirs(**_kw(nets, ["a sports car"], callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs))
    a = ours(**_kw(nets, ["a sports car"], callback_on_step_end=SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5)))
    assert a.record.rows_per_step == [2, 2, 2, 1]
    assert np.abs(a.images - b.images).max() <= 1e-4


class ControlNetCalls:
    """Rows seen by each ControlNet call, per ControlNet."""

    def __init__(self, pipe):
        nets = pipe.controlnet.nets if hasattr(pipe.controlnet, "nets") else [pipe.controlnet]
        self.rows = [[] for _ in nets]
        self.handles = [
            net.register_forward_pre_hook(lambda m, args, k=k: self.rows[k].append(args[0].shape[0]))
            for k, net in enumerate(nets)
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def test_every_controlnet_keeps_running_after_a_cutoff(request):
    """The classic list slice ``image[-1:]`` would leave one ControlNet; here both run on every step,
    on the conditional rows only after the cutoff."""
    ours, _ = _pipes("sdxl", 2, request)
    calls = ControlNetCalls(ours)
    try:
        ours(**_kw(2, ["a cat", "a dog"], callback_on_step_end=classic.SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5)))
    finally:
        calls.close()
    assert calls.rows == [[4, 4, 4, 2], [4, 4, 4, 2]]


def test_guess_mode_runs_controlnets_on_conditional_rows_only(request):
    ours, _ = _pipes("sd", 2, request)
    calls = ControlNetCalls(ours)
    try:
        ours(**_kw(2, ["a cat", "a dog"], guess_mode=True, callback_on_step_end=CFGCutoffCallback(0.5)))
    finally:
        calls.close()
    assert calls.rows == [[2, 2, 2, 2], [2, 2, 2, 2]]  # the UNet sees 4, 4, 4, 2 rows


def test_controlnet_outside_its_window_is_not_run(request):
    ours, _ = _pipes("sd", 2, request)
    calls = ControlNetCalls(ours)
    try:
        ours(**_kw(2, ["a cat"], control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0]))
    finally:
        calls.close()
    assert [len(r) for r in calls.rows] == [2, 2]


def test_scale_set_in_a_callback_applies_to_this_run_only(request):
    ours, _ = _pipes("sd", 1, request)

    def half_after_1(pipe, i, t, kw):
        if i == 1:
            assert pipe.controlnet_conditioning_scale == 1.0
            pipe.controlnet_conditioning_scale = 0.0
        return kw

    cut = ours(**_kw(1, ["a cat"], callback_on_step_end=half_after_1)).images
    plain = ours(**_kw(1, ["a cat"])).images
    windowed = ours(**_kw(1, ["a cat"], control_guidance_end=0.5)).images
    assert np.abs(cut - windowed).max() <= 1e-6  # scale 0 from step 2 == the ControlNet's window ending at 0.5
    assert np.abs(cut - plain).max() > 1e-3  # and the next run started from its own scale again
    with pytest.raises(AttributeError, match="per-call argument"):
        ours.controlnet_conditioning_scale = 0.5


def test_image_callback_tensor_is_one_row_per_image(request):
    ours, _ = _pipes("sdxl", 2, request)
    seen = []

    def look(pipe, i, t, kw):
        seen.append([tuple(x.shape) for x in kw["image"]])
        return {"image": [torch.zeros_like(x) for x in kw["image"]]} if i == 1 else kw

    ours(**_kw(2, ["a cat", "a dog"], callback_on_step_end=look, callback_on_step_end_tensor_inputs=["image"]))
    assert seen[0] == [(2, 3, 32, 32), (2, 3, 32, 32)]
    with pytest.raises(ValueError, match=r"'image' with shape \(1, 3, 32, 32\) at step 0"):
        ours(**_kw(2, ["a cat", "a dog"], callback_on_step_end=lambda p, i, t, kw: {"image": [x[-1:] for x in kw["image"]]},
                   callback_on_step_end_tensor_inputs=["image"]))


@pytest.mark.parametrize("nets", [1, 2])
@pytest.mark.parametrize("bad,message", [
    (lambda x: x.double(), r"'image' as torch.float64 on cpu at step 0(?: \(control image 0 of 2\))?; expected torch.float32 "
     r"on cpu"),
    (lambda x: torch.empty_like(x, device="meta"), r"'image' as torch.float32 on meta at step 0(?: \(control image 0 of "
     r"2\))?; expected torch.float32 on cpu"),
])
def test_control_image_from_a_callback_on_another_dtype_or_device_is_refused(request, nets, bad, message):
    """A callback returning the control image in float64 was converted silently, one on another device failed deep
    in torch; both raise naming the key and the step (docs/callbacks.md), and change nothing of the run."""
    ours, _ = _pipes("sd", nets, request)

    def swap(pipe, i, t, kw):
        images = kw["image"]
        return {"image": bad(images) if nets == 1 else [bad(images[0]), images[1]]}

    with pytest.raises(ValueError, match=message):
        ours(**_kw(nets, ["a cat"], callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["image"]))


def test_auto_pipeline_with_controlnet(request, sd_folder, sd_controlnet_folder):
    net = ControlNetModel.from_pretrained(sd_controlnet_folder)
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(sd_folder, controlnet=net)
    assert type(pipe) is stepdiff.StableDiffusionControlNetPipeline and pipe.controlnet is net
    plain = stepdiff.AutoPipelineForText2Image.from_pretrained(sd_folder)
    assert type(plain) is stepdiff.StableDiffusionPipeline
    assert type(stepdiff.AutoPipelineForText2Image.from_pipe(plain, controlnet=net)) is stepdiff.StableDiffusionControlNetPipeline
    assert type(stepdiff.AutoPipelineForImage2Image.from_pipe(pipe)) is stepdiff.StableDiffusionControlNetImg2ImgPipeline
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", image=torch.rand(1, 3, 48, 40), num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 48, 40, 3)  # the output size defaults to the control image's


# ------------------------------------------------------------------ bad input, before any model work

def test_controlnet_for_another_base_model_is_refused(sd_folder, sdxl_controlnet_folder):
    net = ControlNetModel.from_pretrained(sdxl_controlnet_folder)
    with pytest.raises(ValueError, match="controlnet does not fit this base model: its cross_attention_dim is 64 but the UNet's is 32"):
        stepdiff.StableDiffusionControlNetPipeline.from_pretrained(sd_folder, controlnet=net)
    with pytest.raises(TypeError, match="controlnet must be a diffusers ControlNetModel"):
        stepdiff.StableDiffusionControlNetPipeline.from_pretrained(sd_folder, controlnet="canny")


@pytest.mark.parametrize("nets,kwargs,error,message", [
    (1, dict(image=None), ValueError, "image \\(the control image\\) is required"),
    (1, dict(image="mask.png"), TypeError, "image must be a PIL image"),
    (1, dict(image=torch.rand(1, 1, 32, 32)), ValueError, "image has 1 channels .* the ControlNet takes 3"),
    (1, dict(image=torch.rand(1, 3, 4, 4)), ValueError, "image is 4x4 .* cannot generate at"),
    (1, dict(image=torch.rand(3, 3, 32, 32)), ValueError, "image holds 3 control images but the call has 1 prompts"),
    (2, dict(image=IMAGES[0]), TypeError, "with 2 ControlNets, image must be a list of 2"),
    (2, dict(image=[IMAGES[0]]), ValueError, "image has 1 control images but there are 2 ControlNets"),
    (2, dict(image=[IMAGES[0], torch.rand(1, 3, 48, 48)]), ValueError, "the control images have different sizes"),
    (2, dict(controlnet_conditioning_scale=[1.0]), ValueError, "controlnet_conditioning_scale has 1 values"),
    (1, dict(controlnet_conditioning_scale="1"), TypeError, "controlnet_conditioning_scale must be a finite real"),
    (1, dict(control_guidance_start=0.6, control_guidance_end=0.5), ValueError, "must satisfy 0 <= start < end <= 1"),
    (1, dict(guess_mode="yes"), TypeError, "guess_mode must be True or False"),
])
def test_bad_control_input_fails_before_model_work(nets, kwargs, error, message, request, count_calls):
    ours, _ = _pipes("sd", nets, request)
    calls = count_calls(ours)
    with pytest.raises(error, match=message):
        ours(**_kw(nets, ["a cat"], **kwargs))
    assert calls.calls == 0


# ------------------------------------------------------------------ image-to-image with ControlNets

I2I_CLASSES = {
    "sd": (stepdiff.StableDiffusionControlNetImg2ImgPipeline, diffusers.StableDiffusionControlNetImg2ImgPipeline),
    "sdxl": (stepdiff.StableDiffusionXLControlNetImg2ImgPipeline, diffusers.StableDiffusionXLControlNetImg2ImgPipeline),
}
INIT = control_image(seed=7)


def _i2i_pipes(family, nets, request):
    key = ("i2i", family, nets)
    if key not in _cache:
        base, cns = _controlnets(family, request)
        pair = tuple(cls.from_pretrained(base, controlnet=cns[0] if nets == 1 else cns) for cls in I2I_CLASSES[family])
        for p in pair:
            p.set_progress_bar_config(disable=True)
        _cache[key] = pair
    return _cache[key]


def _i2i_kw(nets, prompts, **kw):
    kw = _kw(nets, prompts, **kw)
    kw["control_image"] = kw.pop("image")
    return {"image": INIT, **kw}


I2I_PARITY = {
    "batch1": dict(prompts=["a photo of a cat"]),
    "batch2-guess-strength": dict(prompts=["a cat", "a dog"], strength=0.6, guess_mode=True),
    "resized-window": dict(prompts=["a cat"], height=48, width=48, control_guidance_end=0.5),
}


@pytest.mark.parametrize("case", I2I_PARITY)
@pytest.mark.parametrize("nets", [1, 2])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_img2img_matches_diffusers(family, nets, case, request):
    ours, theirs = _i2i_pipes(family, nets, request)
    args = dict(I2I_PARITY[case])
    a = ours(**_i2i_kw(nets, args.pop("prompts"), **args)).images
    args = dict(I2I_PARITY[case])
    b = theirs(**_i2i_kw(nets, args.pop("prompts"), **args)).images
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("nets", [1, 2])
def test_controlnet_cutoff_works_on_sdxl_img2img(nets, request):
    """The classic SDXL ControlNet img2img pipeline calls its tensor ``control_image``, so the official
    ControlNet callback (which asks for ``image``) fails its input check there; here it runs, at batch 2 too."""
    ours, theirs = _i2i_pipes("sdxl", nets, request)
    cb = classic.SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        theirs(**_i2i_kw(nets, ["a cat"], callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs))
    both = ours(**_i2i_kw(nets, ["a cat", "a dog"], callback_on_step_end=cb))
    alone = ours(**_i2i_kw(nets, ["a dog"], generator=[gen(1)], callback_on_step_end=CFGCutoffCallback(0.5)))
    assert both.record.rows_per_step[-1] == 2 and np.abs(both.images[1] - alone.images[0]).max() <= 1e-4


def test_img2img_control_image_of_another_size_is_refused(request, count_calls):
    ours, _ = _i2i_pipes("sd", 1, request)
    calls = count_calls(ours)
    with pytest.raises(ValueError, match="control_image is 48x48 but image is 32x32"):
        ours(**_i2i_kw(1, ["a cat"], image=torch.rand(1, 3, 48, 48)))
    assert calls.calls == 0


# ------------------------------------------------------------------ scale schedules and threads

def test_scale_schedule_is_per_step_and_per_run(request):
    from stepdiff.callbacks import ControlNetScaleScheduleCallback, linear_ramp

    ours, _ = _pipes("sd", 2, request)
    seen = []

    def spy(pipe, i, t, kw):
        seen.append(pipe.controlnet_conditioning_scale)

    cb = ControlNetScaleScheduleCallback([1.0, [0.5, 1.0], 0.0, 0.0])
    scheduled = ours(**_kw(2, ["a cat"], callback_on_step_end=[spy, cb])).images
    assert seen == [[1.0, 1.0], [0.5, 1.0], [0.0, 0.0], [0.0, 0.0]]  # what the model call of each step used
    windowed = ours(**_kw(2, ["a cat"], controlnet_conditioning_scale=[0.0, 0.0])).images
    assert np.abs(scheduled - windowed).max() > 1e-3
    assert ours.controlnet_conditioning_scale == [0.0, 0.0]  # this thread's last run ended there...
    plain = ours(**_kw(2, ["a cat"])).images  # ...and the next call starts from its own scale
    again = ours(**_kw(2, ["a cat"])).images
    assert np.array_equal(plain, again)
    ramp = ours(**_kw(2, ["a cat"], callback_on_step_end=ControlNetScaleScheduleCallback(linear_ramp(1.0, 0.0))))
    assert ramp.record.steps_completed == STEPS
    with pytest.raises(ValueError, match="schedule has 2 scales but this run has 4 steps"):
        ours(**_kw(2, ["a cat"], callback_on_step_end=ControlNetScaleScheduleCallback([1.0, 0.5])))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 values but there are 2 ControlNets"):
        ours(**_kw(2, ["a cat"], callback_on_step_end=ControlNetScaleScheduleCallback([[1, 1, 1]] * 4)))


def test_threads_sharing_a_controlnet_pipeline_keep_their_own_scales(request):
    import threading

    ours, _ = _pipes("sdxl", 1, request)
    solo = {s: ours(**_kw(1, ["a cat"], controlnet_conditioning_scale=s, guess_mode=s > 0.5)).images for s in (0.3, 1.0)}
    results, errors = {}, []

    def work(s):
        try:
            for _ in range(2):
                results[s] = ours(**_kw(1, ["a cat"], controlnet_conditioning_scale=s, guess_mode=s > 0.5)).images
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (0.3, 1.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in (0.3, 1.0):
        assert np.abs(results[s] - solo[s]).max() <= 1e-6


def test_per_prompt_control_images_match_diffusers(request):
    """Several ControlNets with one control image per prompt (the classic nested list: per prompt, one per ControlNet)."""
    ours, theirs = _pipes("sd", 2, request)
    nested = [[control_image(seed=5), control_image(seed=6)], [control_image(seed=7), control_image(seed=8)]]
    a = ours(**_kw(2, ["a cat", "a dog"], image=nested)).images
    b = theirs(**_kw(2, ["a cat", "a dog"], image=nested)).images
    swapped = ours(**_kw(2, ["a cat", "a dog"], image=nested[::-1])).images
    assert np.abs(a - b).max() <= 1e-4 and np.abs(a - swapped).max() > 1e-3


def test_guidance_interval_on_controlnet_runs_is_batch_safe(request):
    from stepdiff.callbacks import GuidanceIntervalCallback

    ours, _ = _pipes("sdxl", 2, request)
    cb = GuidanceIntervalCallback(start_step=1, end_step=3)
    both = ours(**_kw(2, ["a cat", "a dog"], guess_mode=True, callback_on_step_end=cb))
    assert both.record.rows_per_step == [2, 4, 4, 2]
    for i, prompt in enumerate(["a cat", "a dog"]):
        alone = ours(**_kw(2, [prompt], generator=[gen(i)], guess_mode=True, callback_on_step_end=cb)).images
        assert np.abs(both.images[i] - alone[0]).max() <= 1e-4
