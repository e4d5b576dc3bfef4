"""Preprocessing your own images: exact pixel results of each step, refusals naming the fix."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffdensity.preprocess import PreprocessError, Preprocessing, load_images, prepare

RGB16 = (3, 16, 16)


def rng_image(h, w, k, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, k) if k > 1 else (h, w), dtype=np.uint8)


def test_matching_image_is_untouched():
    img = rng_image(16, 16, 3)
    arr, notes = prepare(img, RGB16)
    assert notes == [] and arr.shape == RGB16 and np.array_equal(arr, img.transpose(2, 0, 1))


def test_size_mismatch_is_refused_naming_the_option():
    with pytest.raises(PreprocessError, match="32x32.*16x16.*--resize lanczos"):
        prepare(rng_image(32, 32, 3), RGB16)


def test_box_downscale_averages_blocks():
    img = rng_image(32, 32, 3).astype(np.float64)
    arr, notes = prepare(img.astype(np.uint8), RGB16, resize="box")
    blocks = img.reshape(16, 2, 16, 2, 3).mean((1, 3)).transpose(2, 0, 1)
    assert np.abs(arr - blocks).max() <= 1.0  # Pillow rounds in fixed point and "32x32 -> 16x16 (box)" in notes[0]


def test_crop_keeps_the_centre_and_stretch_keeps_everything():
    img = rng_image(16, 32, 3)  # H 16, W 32
    arr, notes = prepare(img, RGB16, resize="nearest", fit="crop")
    assert np.array_equal(arr, img[:, 8:24].transpose(2, 0, 1)) and "centre 16x16" in notes[0]
    arr, _ = prepare(img, RGB16, resize="box", fit="stretch")
    pairs = img.astype(np.float64).reshape(16, 16, 2, 3).mean(2).transpose(2, 0, 1)
    assert np.abs(arr - pairs).max() <= 1.0  # Pillow rounds in fixed point


def test_greyscale_is_replicated_and_colour_not_made_grey():
    g = rng_image(16, 16, 1)
    arr, notes = prepare(g, RGB16)
    assert all(np.array_equal(arr[i], g) for i in range(3)) and notes == ["greyscale replicated to RGB"]
    grey_rgb = np.repeat(g[:, :, None], 3, axis=2)
    arr, _ = prepare(grey_rgb, (1, 16, 16))
    assert np.array_equal(arr[0], g)
    with pytest.raises(PreprocessError, match="greyscale"):
        prepare(rng_image(16, 16, 3), (1, 16, 16))


def test_alpha_opaque_dropped_transparent_refused_or_composited():
    rgba = np.concatenate([rng_image(16, 16, 3), np.full((16, 16, 1), 255, np.uint8)], axis=2)
    arr, notes = prepare(rgba, RGB16)
    assert np.array_equal(arr, rgba[:, :, :3].transpose(2, 0, 1)) and notes == ["opaque alpha channel dropped"]
    rgba[0, 0, 3] = 0
    with pytest.raises(PreprocessError, match="1 transparent.*alpha='white'"):
        prepare(rgba, RGB16)
    white, _ = prepare(rgba, RGB16, alpha="white")
    black, _ = prepare(rgba, RGB16, alpha="black")
    assert (white[:, 0, 0] == 255).all() and (black[:, 0, 0] == 0).all()
    assert np.array_equal(white[:, 1:], rgba[1:, :, :3].transpose(2, 0, 1))


def test_unsupported_formats_and_options_are_refused():
    with pytest.raises(PreprocessError, match="8-bit"):
        prepare(Image.new("I;16", (16, 16)), RGB16)
    with pytest.raises(PreprocessError, match="uint8"):
        prepare(np.zeros((16, 16), np.float32), RGB16)
    with pytest.raises(ValueError, match="resize"):
        Preprocessing(resize="sinc")
    with pytest.raises(ValueError, match="event_shape"):
        prepare(rng_image(16, 16, 3), (2, 16, 16))


def test_decode_reports_status_like_the_image_reader(tmp_path):
    prep = Preprocessing(resize="lanczos")
    buf = tmp_path / "a.png"
    Image.fromarray(rng_image(32, 32, 3)).save(buf)
    arr, status, msg = prep.decode(buf.read_bytes(), RGB16)
    assert status == "ok" and arr.shape == RGB16 and "lanczos" in msg
    assert Preprocessing().decode(buf.read_bytes(), RGB16)[1:2] == ("wrong_shape",)
    assert Preprocessing().decode(b"not an image", RGB16)[:2] == (None, "unreadable")


def test_bundled_model_scores_a_32px_rgb_and_a_16px_grey_image(tmp_path):
    import diffdensity as dd

    Image.fromarray(rng_image(32, 32, 3, seed=1)).save(tmp_path / "rgb32.png")
    Image.fromarray(rng_image(16, 16, 1, seed=2)).save(tmp_path / "grey16.png")
    model = dd.load_pretrained("patches16")
    u8 = load_images([tmp_path / "rgb32.png", tmp_path / "grey16.png"], model.event_shape, resize="lanczos")
    assert u8.shape == (2, 3, 16, 16) and u8.dtype == torch.uint8
    res = dd.bits_per_dim(model, u8, draws=1, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.bpd).all() and res.bpd.shape == (2,)
