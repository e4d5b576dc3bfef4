"""Loading diffusers folders written by ``save_pretrained``, safely and offline.

Only safetensors weights are read (``use_safetensors=True``; a folder with only ``.bin``
or ``.pt`` weights is refused, because those are unpickled), only the allow-listed
classes below (and the schedulers of :data:`.schedule.SCHEDULERS`) are built from a
folder's ``config.json``, and nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .schedule import require_diffusers, scheduler_class

__all__ = ["load_parts", "MODELS", "NETWORK_FOLDERS"]

NETWORK_FOLDERS = ("unet", "transformer")
#: the network and autoencoder classes a folder's config.json may name
MODELS = (
    "UNet2DModel", "UNet2DConditionModel", "UNet1DModel", "UVit2DModel", "Transformer2DModel", "DiTTransformer2DModel",
    "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "AutoencoderKL", "AutoencoderTiny",
    "ConsistencyDecoderVAE", "VQModel",
)  # fmt: skip
UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _read_class_name(config_file: Path) -> str:
    try:
        name = json.loads(config_file.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the class name from {config_file}: {err}") from err
    if not isinstance(name, str):
        raise ValueError(f"{config_file}: _class_name must be a string, got {name!r}")
    return name


def _load(folder: Path, config_name: str, kind: str, **kwargs: Any) -> Any:
    """The allow-listed class named in ``folder/config_name``, loaded from safetensors only."""
    name = _read_class_name(folder / config_name)
    if kind != "model":
        return scheduler_class(name, str(folder / config_name)).from_pretrained(folder, local_files_only=True)
    if name not in MODELS:
        raise ValueError(f"{folder / config_name} names model class {name!r}, which is not allowed; expected one of {MODELS}")
    diffusers = require_diffusers()
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{folder / config_name} names {name!r}, which this diffusers version does not provide")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in UNSAFE_WEIGHTS)
        what = f"only {', '.join(found)}, which would be unpickled and are never loaded" if found else "no weight file"
        raise ValueError(
            f"{folder} holds no .safetensors weights ({what}); save the model with "
            "save_pretrained(..., safe_serialization=True) or convert the weights to safetensors"
        )
    if not diffusers.utils.is_accelerate_available():
        kwargs.setdefault("low_cpu_mem_usage", False)  # what diffusers falls back to, without its warning
    return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **kwargs)


def load_parts(
    path: str | os.PathLike,
    *,
    scheduler: Any = None,
    vae: Any = None,
    load_vae: bool = True,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Any, Any, Any]:
    """``(network, scheduler, vae or None)`` of a local folder (see :func:`~.wrap.from_diffusers_pretrained`)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected a folder written by save_pretrained)")
    model_kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}

    net_dir = next((root / n for n in NETWORK_FOLDERS if (root / n / "config.json").is_file()), None)
    if net_dir is None and (root / "config.json").is_file():
        net_dir = root
    if net_dir is None:
        raise FileNotFoundError(f"no unet/config.json, transformer/config.json or config.json under {root}")
    network = _load(net_dir, "config.json", "model", **model_kwargs)

    if scheduler is None:
        for folder in (root / "scheduler", net_dir, root):
            if (folder / "scheduler_config.json").is_file():
                scheduler = _load(folder, "scheduler_config.json", "scheduler")
                break
        else:
            raise FileNotFoundError(f"no scheduler/scheduler_config.json under {root}; pass scheduler=")

    if vae is None and load_vae and (root / "vae" / "config.json").is_file():
        vae = _load(root / "vae", "config.json", "model", **model_kwargs)

    for module in (network, vae):
        if module is not None:
            module.requires_grad_(False)
            if device is not None:
                module.to(device)
    return network, scheduler, vae
