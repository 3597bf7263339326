"""IP-Adapter on the shared loop through diffusers' IPAdapterMixin: parity with diffusers on tiny models (with and
without ControlNets), the image embeddings riding with the rows under CFG cutoffs, run-scoped scales, bad input."""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ControlNetModel
from diffusers import callbacks as classic

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, IPAdapterScaleCutoffCallback, SDXLControlnetCFGCutoffCallback
from stepdiff.testing import make_tiny_controlnet, make_tiny_ip_adapter

from .conftest import control_image, gen

STEPS = 4
REF = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
CONTROL = [control_image(seed=5), control_image(seed=6)]
OURS = {
    ("sd", 0): stepdiff.StableDiffusionPipeline, ("sd", 1): stepdiff.StableDiffusionControlNetPipeline,
    ("sdxl", 0): stepdiff.StableDiffusionXLPipeline, ("sdxl", 1): stepdiff.StableDiffusionXLControlNetPipeline,
}
THEIRS = {
    ("sd", 0): diffusers.StableDiffusionPipeline, ("sd", 1): diffusers.StableDiffusionControlNetPipeline,
    ("sdxl", 0): diffusers.StableDiffusionXLPipeline, ("sdxl", 1): diffusers.StableDiffusionXLControlNetPipeline,
}
_cache: dict = {}


def _assets(family, request):
    if family not in _cache:
        tmp = request.getfixturevalue("tmp_path_factory")
        base = request.getfixturevalue(f"{family}_folder")
        ip = make_tiny_ip_adapter(tmp.mktemp(f"{family}-ip"), base)
        nets = [ControlNetModel.from_pretrained(make_tiny_controlnet(tmp.mktemp(f"{family}-ipcn{i}"), base, seed=i))
                for i in range(2)]
        _cache[family] = (base, ip, nets)
    return _cache[family]


def _load(cls, family, nets, request, ip=True):
    base, ip_folder, cns = _assets(family, request)
    kwargs = {} if nets == 0 else {"controlnet": cns[0] if nets == 1 else cns}
    pipe = cls.from_pretrained(base, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if ip:
        pipe.load_ip_adapter(str(ip_folder), subfolder="", weight_name="ip-adapter.safetensors")
    return pipe


def _pipes(family, nets, request):
    key = ("pair", family, nets)
    if key not in _cache:
        _cache[key] = tuple(_load(table[(family, min(nets, 1))], family, nets, request) for table in (OURS, THEIRS))
    return _cache[key]


def _kw(nets, prompts, **kw):
    out = {"prompt": prompts, "ip_adapter_image": REF, "generator": [gen(i) for i in range(len(prompts))],
           "num_inference_steps": STEPS, "output_type": "np"}
    if nets:
        out["image"] = CONTROL[0] if nets == 1 else CONTROL
    return {**out, **kw}


PARITY = [("sd", 0, 1), ("sd", 0, 2), ("sd", 1, 2), ("sd", 2, 1), ("sdxl", 0, 2), ("sdxl", 1, 1), ("sdxl", 2, 2)]


@pytest.mark.parametrize("family,nets,batch", PARITY, ids=[f"{f}-{n}controlnets-batch{b}" for f, n, b in PARITY])
def test_matches_diffusers(family, nets, batch, request):
    ours, theirs = _pipes(family, nets, request)
    prompts = ["a photo of a cat", "a red car"][:batch]
    a = ours(**_kw(nets, prompts)).images
    b = theirs(**_kw(nets, prompts)).images
    no_ip = ours.set_ip_adapter_scale(0.0) or ours(**_kw(nets, prompts)).images
    ours.set_ip_adapter_scale(1.0)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - no_ip).max() > 1e-2  # the tiny adapter matters, so the parity is not trivial


def test_embeds_path_matches_image_path(request):
    ours, _ = _pipes("sd", 0, request)
    embeds = ours.prepare_ip_adapter_image_embeds(REF, None, torch.device("cpu"), 1, True)  # [negative, positive]
    a = ours(**_kw(0, ["a cat"])).images
    b = ours(**_kw(0, ["a cat"], ip_adapter_image=None, ip_adapter_image_embeds=embeds)).images
    assert np.abs(a - b).max() <= 1e-6


# ------------------------------------------------------------------ the classic defects

def test_classic_ip_scale_cutoff_leaks_into_the_next_run_on_diffusers_not_here(request):
    for pipe in _pipes("sd", 0, request):
        pipe.set_ip_adapter_scale(1.0)
        fresh = pipe(**_kw(0, ["a cat"])).images
        cut = pipe(**_kw(0, ["a cat"], callback_on_step_end=classic.IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.5)))
        after = pipe(**_kw(0, ["a cat"])).images
        if isinstance(pipe, stepdiff.StableDiffusionPipeline):
            assert np.array_equal(after, fresh)  # the scale change belonged to the cut run only
            ours_cut = cut.images
        else:
            assert np.abs(after - fresh).max() > 1e-2  # diffusers: the next run silently has no IP-Adapter
            pipe.set_ip_adapter_scale(1.0)
            theirs_cut = cut.images
    assert np.abs(ours_cut - theirs_cut).max() <= 1e-4  # within the run both do the same


class IPRows:
    """Rows of the hidden states and of the IP-Adapter image tokens reaching the first IP attention processor."""

    def __init__(self, pipe):
        attn = next(m for m in pipe.unet.modules() if isinstance(m, diffusers.models.attention_processor.Attention)
                    and type(m.processor).__name__.startswith("IPAdapter"))
        self.rows = []
        self.handle = attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        ip = kwargs["encoder_hidden_states"][1][0]  # (text, [image tokens per adapter])
        self.rows.append((hidden.shape[0], ip.shape[0]))


def test_cfg_cutoff_cannot_shrink_ip_embeds_on_diffusers_and_does_here(request):
    """diffusers keeps the IP-Adapter embeddings as one [negative, positive] tensor that no callback reaches: after a
    CFG cutoff a batch-2 run crashes, and a batch-1 run feeds 2 rows of image tokens to 1 latent row."""
    ours, theirs = _pipes("sd", 0, request)
    cb = classic.SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs(**_kw(0, ["a cat", "a dog"], callback_on_step_end=cb))
    spy = IPRows(theirs)
    try:
        theirs(**_kw(0, ["a cat"], callback_on_step_end=cb))
    finally:
        spy.handle.remove()
    assert (1, 2) in spy.rows  # one latent row, two rows of image tokens
    spy = IPRows(ours)
    try:
        both = ours(**_kw(0, ["a cat", "a dog"], callback_on_step_end=cb))
    finally:
        spy.handle.remove()
    assert all(h == i for h, i in spy.rows) and both.record.rows_per_step == [4, 4, 4, 2]
    for i, prompt in enumerate(["a cat", "a dog"]):
        alone = ours(**_kw(0, [prompt], generator=[gen(i)], callback_on_step_end=CFGCutoffCallback(0.5))).images
        assert np.abs(both.images[i] - alone[0]).max() <= 1e-4


def test_controlnet_and_ip_adapter_cutoffs_together_at_batch_2(request):
    ours, theirs = _pipes("sdxl", 2, request)
    cbs = [SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5), IPAdapterScaleCutoffCallback(cutoff_step_index=2)]
    both = ours(**_kw(2, ["a cat", "a dog"], callback_on_step_end=cbs))
    assert both.record.rows_per_step == [4, 4, 4, 2]
    for i, prompt in enumerate(["a cat", "a dog"]):
        alone = ours(**_kw(2, [prompt], generator=[gen(i)], callback_on_step_end=cbs)).images
        assert np.abs(both.images[i] - alone[0]).max() <= 1e-4
    classic_cbs = [classic.SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5),
                   classic.IPAdapterScaleCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2)]
    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs(**_kw(2, ["a cat", "a dog"], callback_on_step_end=classic.MultiPipelineCallbacks(classic_cbs),
                     callback_on_step_end_tensor_inputs=classic_cbs[0].tensor_inputs))
    theirs.set_ip_adapter_scale(1.0)


def test_scale_set_outside_a_run_is_where_runs_start(request):
    ours, _ = _pipes("sd", 0, request)
    ours.set_ip_adapter_scale(0.5)
    try:
        half = ours(**_kw(0, ["a cat"])).images
        seen = []

        def look(pipe, i, t, kw):
            seen.append(next(list(p.scale) for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")))
            if i == 0:
                pipe.set_ip_adapter_scale(0.0)

        cut = ours(**_kw(0, ["a cat"], callback_on_step_end=look)).images
        assert all(s == [0.5] for s in seen)  # outside its model calls the processors keep the caller's scale
        assert np.abs(cut - half).max() > 1e-3 and np.array_equal(ours(**_kw(0, ["a cat"])).images, half)
    finally:
        ours.set_ip_adapter_scale(1.0)


# ------------------------------------------------------------------ bad input, before any model work

def test_bad_ip_adapter_input_fails_before_model_work(request, count_calls, sd_folder):
    plain = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match=r"ip_adapter_image needs an IP-Adapter: call pipe.load_ip_adapter"):
        plain("a cat", ip_adapter_image=REF, num_inference_steps=2)
    ours, _ = _pipes("sd", 0, request)
    calls = count_calls(ours)
    for kwargs, message in [
        (dict(ip_adapter_image=None), "has an IP-Adapter loaded: pass ip_adapter_image"),
        (dict(ip_adapter_image=[REF, REF]), "ip_adapter_image has 2 images but 1 IP-Adapters are loaded"),
        (dict(ip_adapter_image_embeds=[torch.zeros(2, 1, 32)]), "at most one of ip_adapter_image and ip_adapter_image_embeds"),
        (dict(ip_adapter_image=None, ip_adapter_image_embeds=torch.zeros(2, 1, 32)), "must be a list of 1 tensors"),
        (dict(ip_adapter_image=None, ip_adapter_image_embeds=[torch.zeros(2, 32)]), r"ip_adapter_image_embeds\[0\] must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours(**_kw(0, ["a cat"], **kwargs))
    assert calls.calls == 0


def test_ip_adapter_without_image_encoder_is_refused(request, count_calls):
    _, ip_folder, _ = _assets("sd", request)
    pipe = _load(stepdiff.StableDiffusionPipeline, "sd", 0, request, ip=False)
    pipe.load_ip_adapter(str(ip_folder), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    calls = count_calls(pipe)
    with pytest.raises(ValueError, match="ip_adapter_image needs an image encoder"):
        pipe(**_kw(0, ["a cat"]))
    assert calls.calls == 0
    embeds = [torch.zeros(2, 1, 32)]  # embeddings computed elsewhere still work
    assert pipe(**_kw(0, ["a cat"], ip_adapter_image=None, ip_adapter_image_embeds=embeds)).record.steps_completed == STEPS


def test_every_pipeline_that_loads_ip_adapters_takes_them_as_diffusers_does():
    import inspect

    from stepdiff.pipelines.ip_adapter import IPAdapterRun

    classes = [getattr(stepdiff, n) for n in stepdiff.__all__ if isinstance(getattr(stepdiff, n), type)]
    with_ip = [c for c in classes if issubclass(c, IPAdapterRun)]
    assert stepdiff.StableDiffusionXLInpaintPipeline in with_ip and len(with_ip) >= 11
    for cls in with_ip:
        ours = list(inspect.signature(cls.__call__).parameters)
        theirs = list(inspect.signature(getattr(diffusers, cls.__name__).__call__).parameters)
        assert "ip_adapter_image" in ours and "ip_adapter_image_embeds" in ours, cls.__name__
        at = theirs.index("ip_adapter_image")
        assert ours[ours.index("ip_adapter_image") - 1] == theirs[at - 1], cls.__name__  # same place as diffusers


def test_sdxl_img2img_with_an_adapter_and_no_image_says_what_to_do(request, count_calls):
    pipe = _load(stepdiff.StableDiffusionXLImg2ImgPipeline, "sdxl", 0, request)
    calls = count_calls(pipe)
    with pytest.raises(ValueError, match="has an IP-Adapter loaded: pass ip_adapter_image .* or call pipe.unload_ip_adapter"):
        pipe("a cat", image=REF, num_inference_steps=2)
    assert calls.calls == 0
    pipe.unload_ip_adapter()
    assert pipe("a cat", image=REF, num_inference_steps=4, output_type="np").images.shape == (1, 32, 32, 3)


def test_threads_with_different_ip_scale_cutoffs_do_not_mix(request):
    import threading

    ours, _ = _pipes("sdxl", 1, request)
    cut = {i: IPAdapterScaleCutoffCallback(cutoff_step_index=i) for i in (0, 3)}
    solo = {i: ours(**_kw(1, ["a cat"], callback_on_step_end=cut[i])).images for i in cut}
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(4):
                image = ours(**_kw(1, ["a cat"], callback_on_step_end=cut[i])).images
                results.setdefault(i, []).append(image)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in cut]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and np.abs(solo[0] - solo[3]).max() > 1e-3
    for i in cut:
        assert all(np.array_equal(image, solo[i]) for image in results[i])


def test_ip_scale_schedule_is_per_step_and_per_run(request):
    from stepdiff.callbacks import IPAdapterScaleScheduleCallback, linear_ramp

    ours, _ = _pipes("sd", 0, request)
    stepped = ours(**_kw(0, ["a cat"], callback_on_step_end=IPAdapterScaleScheduleCallback([1.0, 1.0, 0.0, 0.0]))).images
    cut = ours(**_kw(0, ["a cat"], callback_on_step_end=IPAdapterScaleCutoffCallback(cutoff_step_index=1))).images
    assert np.abs(stepped - cut).max() <= 1e-6  # scale 0 from step 2 == the cutoff after step 1
    fresh = ours(**_kw(0, ["a cat"])).images
    assert np.abs(fresh - stepped).max() > 1e-3
    ramp = ours(**_kw(0, ["a cat"], callback_on_step_end=IPAdapterScaleScheduleCallback(linear_ramp(1.0, 0.0)))).images
    assert np.abs(ramp - fresh).max() > 1e-4 and np.array_equal(ours(**_kw(0, ["a cat"])).images, fresh)
    with pytest.raises(ValueError, match="needs a stepdiff run with an IP-Adapter image"):
        plain = stepdiff.StableDiffusionPipeline.from_pretrained(request.getfixturevalue("sd_folder"))
        plain("a cat", num_inference_steps=2, callback_on_step_end=IPAdapterScaleScheduleCallback([1.0, 1.0]))


@pytest.mark.parametrize("policies", ["deepcache", "deepcache+tgate"])
def test_step_caching_with_controlnet_and_ip_adapter_cutoffs_at_batch_2(request, policies):
    """The compute policies compose with the official SDXL ControlNet and IP-Adapter cutoffs: rows and cached calls
    counted, each prompt still gets its single-run image."""
    from stepdiff.caching import DeepCacheCallback, TGateCallback

    ours, _ = _pipes("sdxl", 2, request)

    def cbs():
        extra = [TGateCallback(gate_step=3)] if "tgate" in policies else []
        return [SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5), IPAdapterScaleCutoffCallback(cutoff_step_index=2),
                *extra, DeepCacheCallback(cache_interval=2, cache_branch_id=0)]

    both = ours(**_kw(2, ["a cat", "a dog"], callback_on_step_end=cbs()))
    r = both.record
    assert r.rows_per_step == [4, 4, 4, 2]
    assert r.cached_calls >= 2 and r.blocks_computed > 0 and r.blocks_skipped > 0
    for i, prompt in enumerate(["a cat", "a dog"]):
        alone = ours(**_kw(2, [prompt], generator=[gen(i)], callback_on_step_end=cbs())).images
        assert np.abs(both.images[i] - alone[0]).max() <= 1e-4
