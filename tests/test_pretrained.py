"""The bundled model: safetensors-only loading, clear errors for damaged files, data split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import diffdensity as dd
from diffdensity.bundled import pretrained
from diffdensity.bundled.pretrained import available, load_pretrained, weights_dir


def test_bundled_weights_exist_and_are_small():
    assert "patches16" in available()
    w = weights_dir() / "patches16.safetensors"
    assert w.stat().st_size <= 20e6
    info = json.loads(w.with_suffix(".json").read_text())
    assert info["parametrization"] == "v" and info["schedule"]["name"] == "VP"


def test_load_uses_safetensors_only(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    model = load_pretrained("patches16")
    assert isinstance(model, dd.ScoreModel)
    assert model.event_shape == (3, 16, 16)
    assert model.parametrization == "v"
    x = torch.randn(4, 3, 16, 16)
    s = model.score(x, torch.full((4,), 0.5))
    assert s.shape == x.shape and torch.isfinite(s).all()
    # no pickle-based loading anywhere in the loading code
    source = Path(pretrained.__file__).read_text()
    assert "torch.load" not in source and "pickle" not in source


def test_bundled_model_denoises_better_than_untrained():
    # the noise predicted from v_hat (eps_hat = sigma x_t + alpha v_hat) is close to the
    # true noise on smooth patches at moderate noise; zero output would give about alpha^2
    model = load_pretrained()
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(16, 3, 1, 1, generator=gen) * 0.6 - 0.3).expand(16, 3, 16, 16)
    t = torch.full((16,), 0.5)  # logSNR 0: alpha^2 = 1/2
    v = model.schedule(t)
    a, s = v.alpha.float()[:, None, None, None], v.sigma.float()[:, None, None, None]
    eps = torch.randn(x0.shape, generator=gen)
    xt = a * x0 + s * eps
    with torch.no_grad():
        eps_hat = s * xt + a * model.fn(xt, t)
    assert (eps_hat - eps).square().mean() < 0.1


def test_bundled_model_runs_through_the_likelihood():
    model = load_pretrained()
    u = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    res = dd.bits_per_dim(model, u, draws=1, steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(res.bpd).all() and res.nfe.jvp > 0  # forward-mode JVPs went through the network


def _copy_bundle(tmp_path: Path) -> Path:
    src = weights_dir() / "patches16.safetensors"
    dst = tmp_path / "patches16.safetensors"
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty"])
def test_corrupted_weights_give_clear_error(tmp_path, damage):
    path = _copy_bundle(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"\x07" * 64 + data[64:]
    elif damage == "flip":
        arr = bytearray(data)
        arr[-100] ^= 0xFF  # inside the tensor payload: only the checksum can tell
        data = bytes(arr)
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(ValueError, match="patches16.safetensors"):
        load_pretrained(path)


def test_missing_or_wrong_files(tmp_path):
    with pytest.raises(ValueError, match="unknown pretrained model"):
        load_pretrained("no-such-model")
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "absent.safetensors")
    path = _copy_bundle(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(path)
    path = _copy_bundle(tmp_path)
    info = json.loads(path.with_suffix(".json").read_text())
    info["net"]["channels"] = [16, 32, 48]
    info.pop("sha256")
    path.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="patches16.safetensors"):
        load_pretrained(path)


# -- data -----------------------------------------------------------------------------
def test_split_is_deterministic_and_disjoint(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    from diffdensity.bundled import data

    monkeypatch.setenv("DIFFDENSITY_CACHE", str(tmp_path))
    a = data._crop(data._downscale(data.load_images(("chelsea",))["chelsea"], 2), "train", 4)
    b = data._crop(data._downscale(data.load_images(("chelsea",))["chelsea"], 2), "train", 4)
    np.testing.assert_array_equal(a, b)
    # every held-out patch lies in held-out pixels, every training patch in training pixels
    h, w = 150, 225
    mask = data.split_mask(h, w)
    assert 0.08 < mask.mean() < 0.2
    im = np.zeros((h, w, 3), dtype=np.uint8)
    im[..., 0] = mask  # encode the mask in a channel
    tr = data._crop(im, "train", 4)
    ho = data._crop(im, "heldout", 4)
    assert len(tr) > 0 and len(ho) > 0
    assert tr[:, 0].max() == 0 and ho[:, 0].min() == 1


def test_patch_tensors_are_cached_and_valid(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    from diffdensity.bundled import data

    monkeypatch.setenv("DIFFDENSITY_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "IMAGES", {"chelsea": "CC0"})
    ho = data.patches("heldout")
    assert ho.dtype == torch.uint8 and ho.shape[1:] == (3, 16, 16) and len(ho) > 10
    assert list(tmp_path.glob("*heldout.npy"))
    torch.testing.assert_close(data.patches("heldout"), ho)
    x = data.to_model_space(ho)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="split"):
        data.patches("test")


def _edit_info(path: Path, edit) -> None:
    info = json.loads(path.with_suffix(".json").read_text())
    edit(info)
    path.with_suffix(".json").write_text(json.dumps(info))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda i: i.pop("sha256"), "sha256"),
        (lambda i: i.update(sha256="abc"), "sha256"),
        (lambda i: i.pop("net"), "'net'"),
        (lambda i: i.update(event_shape=[3, 32, 32]), "event_shape"),
        (lambda i: i["net"].update(bogus=1), "'net'"),
        (lambda i: i["schedule"].update(log_snr_min="x"), "log_snr_min"),
    ],
)
def test_weights_metadata_is_validated(tmp_path, edit, match):
    path = _copy_bundle(tmp_path)
    _edit_info(path, edit)
    with pytest.raises(ValueError, match=match):
        load_pretrained(path)


def test_huge_weight_without_checksum_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy_bundle(tmp_path)
    state = load_file(str(path))
    key = next(iter(state))
    state[key] = state[key].clone().fill_(1e30)
    save_file(state, str(path))
    with pytest.raises(ValueError, match="SHA-256"):  # the recorded digest no longer matches
        load_pretrained(path)
    _edit_info(path, lambda i: i.pop("sha256"))
    with pytest.raises(ValueError, match="sha256"):  # and without one nothing is loaded
        load_pretrained(path)


def test_inputs_are_checked_at_the_door():
    model = load_pretrained()
    t = torch.full((2,), 0.5)
    gen = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (2, 3, 16, 16), generator=gen).float()
    with pytest.raises(ValueError, match=r"\[0, 255\].*dequantize"):
        model.score(u, t)
    with pytest.raises(TypeError, match="floating-point"):
        model.score(u.to(torch.uint8), t)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    ref = model.score(x, t)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
        s = model.score(x.to(dtype), t)
        assert s.dtype == dtype and s.shape == x.shape
        assert torch.allclose(s.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    res = dd.log_likelihood(model, x.double(), steps=2, divergence=dd.Hutchinson(1, mode="forward"), generator=gen)
    assert res.logp.dtype == torch.float64 and torch.isfinite(res.logp).all()
