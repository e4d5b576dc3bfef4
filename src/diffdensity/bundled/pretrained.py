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
import os
from pathlib import Path

import torch

from ..models import ScoreModel
from .nets import UNet, UNetConfig
from ..schedules import VP

__all__ = ["available", "load_pretrained", "weights_dir"]

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


def load_pretrained(name: str | os.PathLike = "patches16", device: torch.device | str | None = None) -> ScoreModel:
    """The bundled model ``name`` (or a ``.safetensors`` file written by training) as a score model.

    Returns ``ScoreModel(net, VP(lmin, lmax), parametrization="v", event_shape=(3, 16, 16))``
    with the network in eval mode and its parameters frozen; ``model.fn`` is the
    :class:`~diffdensity.bundled.nets.UNet`, ``model.info`` the JSON record.

    Raises ``ValueError`` naming the file when the weights are missing, corrupted
    (checked against the SHA-256 recorded in ``NAME.json``), truncated or do not match
    the architecture in ``NAME.json``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _resolve(name)
    cfg_path = path.with_suffix(".json")
    if not cfg_path.exists():
        raise ValueError(f"{cfg_path} (the architecture of {path.name}) is missing")
    try:
        info = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if info.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: unsupported format {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("parametrization") not in ("eps", "v") or info.get("schedule", {}).get("name") != "VP":
        raise ValueError(f"{cfg_path}: expected an eps- or v-prediction VP model")
    config = UNetConfig.from_dict(info["net"])
    digest = info.get("sha256")
    if digest is not None and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise ValueError(f"weights {path} are corrupted: their SHA-256 does not match the one recorded in {cfg_path.name}")

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read weights {path}: the file is corrupted or truncated ({e})") from e
    net = UNet(config)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"weights {path} do not match the architecture in {cfg_path.name}: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"weights {path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"weights {path}: {k} contains NaN or Inf (corrupted file)")
    net.load_state_dict(state)
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    sched = info["schedule"]
    model = ScoreModel(
        net,
        VP(sched["log_snr_min"], sched["log_snr_max"]),
        parametrization=info["parametrization"],
        event_shape=tuple(info["event_shape"]),
    )
    model.info = info
    return model
