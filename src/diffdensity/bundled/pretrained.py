"""The bundled pretrained model(s): ``load_pretrained("patches16")``.

Weights ship inside the package as ``diffdensity/bundled/weights/NAME.safetensors`` with the
architecture and training record in ``NAME.json``; they are read with safetensors only,
a format of plain tensors that runs no code on loading. ``patches16`` is a v-prediction U-Net on 3x16x16
RGB patches in ``[-1, 1]`` under :class:`diffdensity.VP` (logSNR in [-10, 10]),
trained by :func:`diffdensity.bundled.training.train` on :mod:`diffdensity.bundled.data`; see
``docs/model.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models import ScoreModel
from .nets import UNet, UNetConfig
from ..schedules import VP

__all__ = ["available", "load_pretrained", "weights_dir", "BundledModel"]

FORMAT = "diffdensity-unet-v1"


def weights_dir() -> Path:
    """Folder of the bundled weights inside the installed package."""
    return Path(__file__).resolve().parent / "weights"


def available() -> list[str]:
    """Names of the bundled models."""
    return sorted(p.stem for p in weights_dir().glob("*.safetensors") if p.with_suffix(".json").exists())


def _resolve(name: str | os.PathLike) -> Path:
    path = Path(name)
    if path.suffix == ".safetensors" or path.exists():
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give the .safetensors file or a bundled name")
        if not path.exists():
            raise FileNotFoundError(f"weight file {path} does not exist")
        return path
    path = weights_dir() / f"{name}.safetensors"
    if not path.exists():
        raise ValueError(f"unknown pretrained model {str(name)!r}; bundled: {available()}")
    return path


class BundledModel(ScoreModel):
    """The bundled network as a score model, with its inputs checked at the door.

    The network works in float32 on images in ``[-1, 1]`` (noised: ``x_t = alpha x_0 +
    sigma eps``). Inputs of another floating dtype (float16, bfloat16, float64) are
    converted to float32 for the network and the score is returned in the input's
    dtype; integer inputs and values far outside the model space (e.g. 8-bit pixels in
    ``[0, 255]``) raise ``ValueError`` with the fix.
    """

    #: no input of the noised model space exceeds this (|x_0| <= 1 plus noise of std <= 1)
    MAX_ABS = 50.0

    def score(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        check_input(x, self.MAX_ABS)
        return super().score(x.to(torch.float32), t, **cond).to(x.dtype)


def check_input(x: Tensor, max_abs: float) -> None:
    """Refuse what the bundled network would silently mis-score: non-float tensors and values outside the model space."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(
            f"the bundled model takes floating-point images in [-1, 1], got {what}; "
            "map 8-bit values u with diffdensity.likelihood.dequantize(u) (2 (u + 1/2) / 256 - 1)"
        )
    big = float(x.detach().abs().amax()) if x.numel() else 0.0
    if big > max_abs:
        hint = (
            "these look like 8-bit pixel values in [0, 255]; map them with diffdensity.likelihood.dequantize(u)"
            if big <= 255.5 and float(x.detach().amin()) >= 0
            else "scale the images to [-1, 1] first"
        )
        raise ValueError(f"the bundled model works on images in [-1, 1], but the input reaches {big:g}: {hint}")


def _read_info(path: Path) -> dict:
    """The JSON record beside the weights, validated: format, sha256, net, schedule, event_shape."""
    cfg_path = path.with_suffix(".json")
    if not cfg_path.exists():
        raise ValueError(f"{cfg_path} (the architecture of {path.name}) is missing")
    try:
        info = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{cfg_path}: unsupported format {got!r}, expected {FORMAT!r}")
    digest = info.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"{cfg_path}: no valid 'sha256' of {path.name}; the weights cannot be verified (re-export them with training)")
    if not isinstance(info.get("net"), dict):
        raise ValueError(f"{cfg_path}: the architecture record 'net' (the UNetConfig fields) is missing")
    sched = info.get("schedule")
    if info.get("parametrization") not in ("eps", "v") or not isinstance(sched, dict) or sched.get("name") != "VP":
        raise ValueError(f"{cfg_path}: expected an eps- or v-prediction VP model")
    for k in ("log_snr_min", "log_snr_max"):
        if not isinstance(sched.get(k), (int, float)) or not math.isfinite(sched[k]):
            raise ValueError(f"{cfg_path}: schedule.{k} must be a finite number, got {sched.get(k)!r}")
    try:
        info["config"] = UNetConfig.from_dict(info["net"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid architecture record 'net': {e}") from e
    c = info["config"]
    want = [c.in_channels, c.image_size, c.image_size]
    if info.get("event_shape") != want:
        raise ValueError(f"{cfg_path}: event_shape {info.get('event_shape')!r} does not match the network's {want}")
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise ValueError(f"weights {path} are corrupted: their SHA-256 does not match the one recorded in {cfg_path.name}")
    return info


def _read_state(path: Path, net: UNet) -> dict[str, Tensor]:
    """The tensors of the weight file, checked against the network's names, shapes and finite values."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read weights {path}: the file is corrupted or truncated ({e})") from e
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"weights {path} do not match the architecture in {path.with_suffix('.json').name}: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"weights {path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise ValueError(f"weights {path}: {k} is not finite floating-point data (corrupted file)")
    return state


def load_pretrained(name: str | os.PathLike = "patches16", device: torch.device | str | None = None) -> BundledModel:
    """The bundled model ``name`` (or a ``.safetensors`` file written by training) as a score model.

    Returns a :class:`BundledModel` (a ``ScoreModel(net, VP(lmin, lmax),
    parametrization="v", event_shape=(3, 16, 16))`` that checks its inputs) with the
    network in eval mode and its parameters frozen; ``model.fn`` is the
    :class:`~diffdensity.bundled.nets.UNet`, ``model.info`` the JSON record.

    Raises ``ValueError`` naming the file when the weights are missing, unverifiable
    (no SHA-256 in ``NAME.json``), corrupted (SHA-256 mismatch), truncated or do not
    match the architecture and event shape in ``NAME.json``.
    """
    path = _resolve(name)
    info = _read_info(path)
    net = UNet(info.pop("config"))
    net.load_state_dict(_read_state(path, net))
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    sched = info["schedule"]
    model = BundledModel(
        net,
        VP(sched["log_snr_min"], sched["log_snr_max"]),
        parametrization=info["parametrization"],
        event_shape=tuple(info["event_shape"]),
    )
    model.info = info
    return model
