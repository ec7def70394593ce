"""Decoding real files of every format and mode, and rejecting broken ones with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ae_core.decode import Preprocess, decode_image, fingerprint, read_header
from ae_core.errors import DecodeError
from conftest import COIL, MNIST
from corpora import broken_files, good_files

GRAY64 = Preprocess(image_size=64, channels=1)
RGB32 = Preprocess(image_size=32, channels=3)


def test_real_mnist_png_round_trips_pixel_exact():
    data = (MNIST / "00000.png").read_bytes()
    dec = decode_image(data, Preprocess(image_size=28, channels=1))
    assert dec.pixels.shape == (1, 28, 28) and dec.pixels.dtype == np.uint8
    assert np.array_equal(dec.pixels[0], np.asarray(Image.open(MNIST / "00000.png")))
    assert (dec.width, dec.height, dec.mode, dec.format) == (28, 28, "L", "PNG")


def test_real_coil_photo_resized_to_input():
    dec = decode_image((COIL / "obj5__10.png").read_bytes(), GRAY64)
    assert dec.pixels.shape == (1, 64, 64)
    assert (dec.width, dec.height) == (128, 128)
    ref = np.asarray(Image.open(COIL / "obj5__10.png").convert("L").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(dec.pixels[0].astype(int) - ref).mean() < 2.0


@pytest.mark.parametrize("key", sorted(good_files(COIL, MNIST)))
@pytest.mark.parametrize("spec", [GRAY64, RGB32], ids=["gray64", "rgb32"])
def test_every_format_and_mode_decodes(key, spec):
    data = good_files(COIL, MNIST)[key]
    dec = decode_image(data, spec)
    assert dec.pixels.shape == (spec.channels, spec.image_size, spec.image_size)
    assert dec.pixels.dtype == np.uint8
    assert dec.width >= 1 and dec.height >= 1


def test_exif_orientation_is_applied():
    data = good_files(COIL, MNIST)["jpeg/exif-rotated.jpg"]
    head = read_header(data)
    assert (head.width, head.height) == (96, 128)  # stored 128x96, displayed rotated
    dec = decode_image(data, Preprocess(image_size=32, channels=1, resize="pad"))
    # Padded to a square: a portrait image leaves black columns left and right.
    assert dec.pixels[0, :, 0].max() == 0 and dec.pixels[0, :, 16].max() > 0


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    dec = decode_image(buf.getvalue(), Preprocess(image_size=16, channels=3))
    assert dec.pixels.min() == 255


def test_sixteen_bit_keeps_its_range():
    arr = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    dec = decode_image(buf.getvalue(), Preprocess(image_size=32, channels=1))
    assert dec.pixels.min() <= 1 and dec.pixels.max() >= 254


@pytest.mark.parametrize("key", sorted(broken_files(COIL, MNIST)))
def test_broken_files_raise_decode_error_with_reason(key):
    data, reason = broken_files(COIL, MNIST)[key]
    with pytest.raises(DecodeError) as info:
        decode_image(data, GRAY64)
    assert info.value.reason == reason
    assert info.value.detail


def test_pixel_limit_is_a_setting():
    data = (COIL / "obj1__0.png").read_bytes()
    with pytest.raises(DecodeError, match="decompression_bomb"):
        decode_image(data, Preprocess(image_size=32, channels=1, max_image_pixels=128 * 127))


def test_fingerprint_is_content_based():
    a = (MNIST / "00000.png").read_bytes()
    assert fingerprint(a) == fingerprint(bytes(a))
    assert fingerprint(a) != fingerprint(a + b"\0")
    assert len(fingerprint(a)) == 32
