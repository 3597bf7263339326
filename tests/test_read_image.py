"""stepdiff.images.read_image: every picture read from a file (CLI, batch, studio) as it is displayed - any bit
depth and mode, EXIF orientation applied, animations refused, a size limit read from the header, regular files
only - and every bad file refused with the argument, the path and what is allowed (issue 24)."""

import os
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from stepdiff.images import MAX_IMAGE_PIXELS, read_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path, width: int, height: int):
    """A PNG that declares width x height and holds almost no data: a size check must not need the pixels."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))
    return path


def grey16(path, values: np.ndarray, exif: Image.Exif | None = None):
    """A 16-bit greyscale PNG (Pillow mode I;16)."""
    image = Image.fromarray(values.astype(np.uint16))
    assert image.mode == "I;16"
    image.save(path, **({"exif": exif} if exif is not None else {}))
    with Image.open(path) as check:
        assert check.mode == "I;16"
    return path


def orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# ------------------------------------------------------------------------------------------- depth and mode


def test_16_bit_grey_reads_as_its_grey_not_white(tmp_path):
    """Issue 24: a 16-bit PNG read as pure white for --init-image and --control (50% grey read 255)."""
    path = grey16(tmp_path / "g.png", np.array([[0, 16384, 32768, 65535]] * 4))
    assert np.asarray(read_image(path)).tolist() == [[[v] * 3 for v in (0, 64, 128, 255)]] * 4
    assert np.asarray(read_image(path, mode="L")).tolist() == [[0, 64, 128, 255]] * 4


@pytest.mark.parametrize(("mode", "values", "expected"), [
    ("I;16B", np.array([[0, 32768, 65535]]), [0, 128, 255]),  # 16-bit big-endian TIFF
    ("I", np.array([[0, 32768, 70000]]), [0, 128, 255]),  # 32-bit integer: read as 16-bit, clipped
    ("F", np.array([[0.0, 0.5, 1.0]]), [0, 128, 255]),  # float: 0 black, 1 white
])
def test_other_deep_modes(tmp_path, mode, values, expected):
    image = Image.fromarray(values.astype(np.float32)).convert(mode) if mode != "F" else Image.fromarray(
        values.astype(np.float32), "F")
    if mode == "I;16B":
        image = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    image.save(tmp_path / "p.tif")
    with Image.open(tmp_path / "p.tif") as check:
        assert check.mode == mode
    assert np.asarray(read_image(tmp_path / "p.tif", mode="L")).tolist() == [expected]


def test_cmyk_palette_with_transparency_and_lab(tmp_path):
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert read_image(tmp_path / "cmyk.jpg").getpixel((0, 0)) == (255, 255, 255)  # no ink: white
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=0)
    assert read_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 0, 0)
    from PIL import ImageCms

    lab = ImageCms.profileToProfile(Image.new("RGB", (4, 4), (200, 100, 50)), ImageCms.createProfile("sRGB"),
                                    ImageCms.createProfile("LAB"), outputMode="LAB")
    lab.save(tmp_path / "lab.tif")
    assert all(abs(a - b) <= 2 for a, b in zip(read_image(tmp_path / "lab.tif").getpixel((0, 0)), (200, 100, 50)))


# ------------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(("value", "turn"), [
    (1, lambda a: a), (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
    (2, lambda a: a[:, ::-1]), (5, lambda a: np.rot90(a, 1)[::-1]),
])
def test_exif_orientation_is_applied(tmp_path, value, turn):
    """Issue 24: a phone JPEG's orientation was ignored: the picture came out sideways and a mask drawn on the
    picture as displayed was refused as the wrong size."""
    stored = np.zeros((16, 24, 3), np.uint8)
    stored[:4, :6] = (255, 0, 0)  # a red corner, top left as stored
    stored[12:, 20:] = (0, 0, 255)
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=orientation(value))
    shown = np.asarray(read_image(tmp_path / "photo.png"))
    assert np.array_equal(shown, turn(stored)), value


def test_exif_orientation_of_a_16_bit_picture_and_a_jpeg(tmp_path):
    values = np.zeros((16, 24))
    values[:, :12] = 65535
    shown = np.asarray(read_image(grey16(tmp_path / "g.png", values, orientation(6)), mode="L"))
    assert shown.shape == (24, 16) and shown[:12].min() == 255 and shown[12:].max() == 0
    Image.new("RGB", (40, 16), "red").save(tmp_path / "photo.jpg", exif=orientation(6))
    assert read_image(tmp_path / "photo.jpg").size == (16, 40)


# ------------------------------------------------------------------------------------------- frames


@pytest.mark.parametrize("suffix", [".gif", ".png", ".webp", ".tif"])
def test_animated_and_multi_page_pictures_are_refused(tmp_path, suffix):
    """Issue 24: an animated GIF or WebP silently used its first frame."""
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / f"a{suffix}", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError) as info:
        read_image(tmp_path / f"a{suffix}", what="--init-image")
    kind = "multi-page" if suffix == ".tif" else "animated"
    assert str(info.value).startswith(f"--init-image {str(tmp_path / f'a{suffix}')!r} is an {kind} ")
    assert "of 3 frames; give a still picture" in str(info.value)
    frames[1].save(tmp_path / f"one{suffix}")  # one frame is a picture like any other
    assert read_image(tmp_path / f"one{suffix}").getpixel((0, 0))[1] > 100


def test_a_cameras_multi_picture_jpeg_is_its_first_picture(tmp_path):
    photo, preview = Image.new("RGB", (16, 8), "red"), Image.new("RGB", (8, 4), "blue")
    photo.save(tmp_path / "camera.mpo", format="MPO", save_all=True, append_images=[preview])
    with Image.open(tmp_path / "camera.mpo") as check:
        assert check.format == "MPO" and check.n_frames == 2
    image = read_image(tmp_path / "camera.mpo")
    assert image.size == (16, 8) and image.getpixel((8, 4))[0] > 200


# ------------------------------------------------------------------------------------------- size, files


def test_a_picture_over_the_limit_is_refused_from_its_header(tmp_path):
    """Issue 24: a 20000x20000 PNG hit Pillow's decompression-bomb error (exit 1 through the catch-all)."""
    with pytest.raises(ValueError, match=r"^--init-image '.*huge.png' is 400 megapixels; at most 67 megapixels "
                                         r"\(8192x8192\) are read: scale it down first$"):
        read_image(png_header_only(tmp_path / "huge.png", 20000, 20000), what="--init-image")
    with pytest.raises(ValueError, match=r"'.*big.png' is 9000x9000 pixels, 81 megapixels; at most 67"):
        read_image(png_header_only(tmp_path / "big.png", 9000, 9000))
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"is 20x10 pixels, 0 megapixels; at most 0 megapixels \(14x14\)"):
        read_image(tmp_path / "small.png", max_pixels=199)
    assert read_image(tmp_path / "small.png", max_pixels=200).size == (20, 10)
    assert MAX_IMAGE_PIXELS == 8192 * 8192


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    """Issue 24: --init-image pointing at a FIFO blocked forever."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            read_image(fifo, what="--mask")
        except Exception as e:  # whatever it is, the test reports it
            result["error"] = e

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_image waited on a FIFO")
    assert isinstance(result["error"], ValueError)
    assert str(result["error"]) == (f"--mask {str(fifo)!r} is a named pipe (FIFO), not a regular file; give a picture "
                                    "file (PNG, JPEG, WebP, ...)")


@pytest.mark.parametrize(("name", "error", "words"), [
    ("missing.png", FileNotFoundError, "does not exist"),
    ("picture.png/x.png", FileNotFoundError, "does not exist (a part of the path is not a folder)"),
    (".", IsADirectoryError, "is a folder; give a picture file"),
    ("/dev/null", ValueError, "is a character device, not a regular file"),
    ("empty.png", ValueError, "is empty (0 bytes)"),
    ("notes.png", ValueError, "is not a readable picture (not a picture format Pillow knows)"),
    ("cut.png", ValueError, "is not a readable picture (OSError: image file is truncated"),
    ("a\x00b.png", ValueError, "is not a valid path (embedded null byte)"),
])
def test_bad_files_name_the_argument_the_path_and_the_problem(tmp_path, name, error, words):
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a picture")
    png_header_only(tmp_path / "cut.png", 64, 64)
    path = name if name.startswith("/") else tmp_path / name
    with pytest.raises(error) as info:
        read_image(path, what="--control")
    assert str(info.value).startswith(f"--control {str(path)!r} ")
    assert words in str(info.value)


def test_mode_must_be_rgb_rgba_or_l(tmp_path):
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png", mode="RGBA").getpixel((0, 0)) == (10, 20, 30, 0)
    assert read_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 20, 30)  # alpha dropped
    with pytest.raises(ValueError, match="mode must be 'RGB', 'RGBA' or 'L', got 'CMYK'"):
        read_image(tmp_path / "p.png", mode="CMYK")
