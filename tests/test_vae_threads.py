"""A float16 VAE marked ``force_upcast`` is cast to float32 for each encode and decode, as the classic SDXL
pipelines do. A pipeline is shared by server threads: one thread's cast must never change the dtype under another
thread's call (before the fix, a second thread saw the float32 VAE, skipped its own cast, and had the VAE cast back to
float16 in the middle of its decode)."""

import threading
import time

import torch
from diffusers import AutoencoderKL

from stepdiff.vae import decode_latents, encode_images


def _vae(force_upcast: bool) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        force_upcast=force_upcast,
    )
    return vae.to(torch.float16)


def _watch(vae, method: str, seen: list) -> None:
    """Record the VAE's dtype when each call enters and leaves ``vae.<method>``, with a pause inside."""
    inner = getattr(vae, method)

    def watched(*args, **kwargs):
        entered = vae.dtype
        time.sleep(0.05)  # long enough for the other thread to arrive
        out = inner(*args, **kwargs)
        seen.append((entered, vae.dtype))
        return out

    setattr(vae, method, watched)


def _in_threads(fn, n: int = 3) -> list[BaseException]:
    errors: list[BaseException] = []

    def work():
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_decoding_with_an_upcast_vae_never_see_its_dtype_change():
    vae, seen = _vae(force_upcast=True), []
    _watch(vae, "decode", seen)
    latents = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    errors = _in_threads(lambda: decode_latents(vae, latents))
    assert errors == []
    assert seen == [(torch.float32, torch.float32)] * 3  # every decode ran in float32 from start to end
    assert vae.dtype == torch.float16  # cast back once all are done


def test_threads_encoding_with_an_upcast_vae_never_see_its_dtype_change():
    vae, seen = _vae(force_upcast=True), []
    _watch(vae, "encode", seen)
    images = torch.rand(1, 3, 32, 32, dtype=torch.float16) * 2 - 1
    errors = _in_threads(lambda: encode_images(vae, images, sample=False))
    assert errors == []
    assert seen == [(torch.float32, torch.float32)] * 3
    assert vae.dtype == torch.float16


def test_a_failed_decode_casts_the_vae_back():
    vae = _vae(force_upcast=True)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    vae.decode = broken
    try:
        decode_latents(vae, torch.randn(1, 4, 8, 8, dtype=torch.float16))
    except RuntimeError:
        pass
    assert vae.dtype == torch.float16


def test_a_vae_without_force_upcast_is_never_cast():
    vae, seen = _vae(force_upcast=False), []
    _watch(vae, "decode", seen)
    out = decode_latents(vae, torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert seen == [(torch.float16, torch.float16)] and out.dtype == torch.float16
