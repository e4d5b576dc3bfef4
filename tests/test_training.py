"""Training: a tiny run writes safetensors checkpoints and resumes from them; the data split."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from diffdensity.bundled.nets import UNet, UNetConfig
from diffdensity.bundled.pretrained import load_pretrained
from diffdensity.bundled.training import PRESETS, _batch, train


def _handful(n: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8)


def test_tiny_run_resumes_from_checkpoint(tmp_path):
    data = _handful()
    r1 = train("tiny", tmp_path / "a", data=data, steps=2, progress=False)
    assert r1.step == 2
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"checkpoint.safetensors", "checkpoint.json", "tiny.safetensors", "tiny.json", "train_log.csv"} <= files
    assert json.loads((tmp_path / "a" / "checkpoint.json").read_text())["step"] == 2
    # resume to 4 steps, and compare with an uninterrupted 4-step run
    r2 = train("tiny", tmp_path / "a", data=data, steps=4, progress=False)
    assert r2.step == 4
    r3 = train("tiny", tmp_path / "b", data=data, steps=4, progress=False)
    wa = load_pretrained(tmp_path / "a" / "tiny.safetensors").fn.state_dict()
    wb = load_pretrained(tmp_path / "b" / "tiny.safetensors").fn.state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    with open(tmp_path / "a" / "train_log.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4]
    # a finished run is a no-op
    assert train("tiny", tmp_path / "a", data=data, steps=4, progress=False).step == 4
    assert r3.last_loss == pytest.approx(r2.last_loss, rel=1e-4)


def test_resume_refuses_other_settings(tmp_path):
    data = _handful()
    train("tiny", tmp_path, data=data, steps=1, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train("tiny", tmp_path, data=data, steps=2, batch_size=4, progress=False)
    assert train("tiny", tmp_path, data=data, steps=1, batch_size=4, resume=False, progress=False).step == 1


def test_train_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        train("nope", tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        train("tiny", tmp_path, data=torch.zeros(4, 3, 16, 16), progress=False)


def test_batches_depend_on_seed_and_step_only():
    data = _handful()
    p = PRESETS["tiny"]
    from diffdensity import VP

    a = _batch(data, p, 7, 8, VP())
    b = _batch(data, p, 7, 8, VP())
    c = _batch(data, p, 8, 8, VP())
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    assert not torch.equal(a[0], c[0])
    t = a[1]
    assert ((t >= 0) & (t < 1)).all()
    # stratified: exactly one t in each of the 8 equal bins
    assert torch.equal(torch.sort((t * 8).floor()).values, torch.arange(8.0))


@pytest.mark.parametrize("config", [UNetConfig(), UNetConfig(**PRESETS["tiny"].net)])
def test_network_supports_forward_and_reverse_mode(config):
    torch.manual_seed(0)
    net = UNet(config).double()
    with torch.no_grad():  # the zero-initialised output layers would hide errors
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    v = torch.randn_like(x)
    out, jv = torch.func.jvp(lambda y: net(y, t), (x,), (v,))
    torch.testing.assert_close(out, net(x, t))
    # reverse mode: <v, J v> from a vector-Jacobian product agrees with forward mode
    xr = x.clone().requires_grad_(True)
    (vj,) = torch.autograd.grad(net(xr, t), xr, v, create_graph=True)
    torch.testing.assert_close((vj * v).sum(), (jv * v).sum())
    # double backward (gradient of a Jacobian product) works too
    (g2,) = torch.autograd.grad((vj * v).sum(), xr)
    assert torch.isfinite(g2).all() and g2.abs().sum() > 0
    # finite differences check the forward-mode product
    h = 1e-6
    fd = (net(x + h * v, t) - net(x - h * v, t)) / (2 * h)
    torch.testing.assert_close(jv, fd, rtol=1e-4, atol=1e-6)


def test_default_network_is_small_and_fast():
    net = UNet().eval()
    n_bytes = sum(p.numel() for p in net.parameters()) * 4
    assert n_bytes < 20e6
