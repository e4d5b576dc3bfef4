"""Inputs of dataset scoring: image files (listed and decoded) or an 8-bit tensor, by index."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "list_images", "read_image", "Source", "FileSource", "TensorSource", "first_image_shape"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike], *, recursive: bool = False) -> list[str]:
    """Files in input order: a folder expands to its PNG/JPEG files, sorted by path.

    Files named explicitly are kept whatever their suffix (and reported later if they
    cannot be read); ``recursive`` also descends into sub-folders.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            files += sorted(str(p) for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(str(path))
    return files


_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def read_image(path: str, event_shape: tuple[int, ...]) -> tuple[np.ndarray | None, str, str]:
    """``(uint8 (C, H, W) array or None, status, message)`` for one file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: truncated or corrupt data fails here
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "1":
                im = im.convert("L")
            arr = np.asarray(im) if im.mode in _CHANNEL_MODES.values() else None
    except Exception as e:  # PIL raises many types for damaged files (OSError, SyntaxError, ...)
        return None, "unreadable", f"{type(e).__name__}: {e}"
    c, h, w = event_shape
    want = f"{w}x{h} {_CHANNEL_MODES.get(c, f'{c}-channel')}"
    if arr is None:
        return None, "wrong_shape", f"pixel format {mode} is not 8-bit L/LA/RGB/RGBA; the model expects {want}"
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if arr.shape != (h, w, c):
        got = f"{arr.shape[1]}x{arr.shape[0]} {im.mode}"
        return None, "wrong_shape", f"image is {got}; the model expects {want}"
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), "ok", ""


class Source:
    """Inputs by index: ``names[i]`` and ``load(indices) -> (uint8 (b, *event), ok_indices, failures)``."""

    names: list[str]
    event_shape: tuple[int, ...]
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.names)

    def load(self, indices: list[int]) -> tuple[Tensor, list[int], dict[int, tuple[str, str]]]:
        raise NotImplementedError


class FileSource(Source):
    def __init__(self, files: list[str], event_shape: tuple[int, ...]):
        self.names, self.event_shape = files, event_shape

    def load(self, indices):
        arrays, ok, failures = [], [], {}
        for i in indices:
            arr, status, message = read_image(self.names[i], self.event_shape)
            if arr is None:
                failures[i] = (status, message)
            else:
                arrays.append(arr)
                ok.append(i)
        images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, *self.event_shape, dtype=torch.uint8)
        return images, ok, failures


class TensorSource(Source):
    def __init__(self, data: Tensor, event_shape: tuple[int, ...]):
        if data.ndim < 2 or tuple(data.shape[1:]) != tuple(event_shape):
            raise ValueError(f"data must have shape (N, *{tuple(event_shape)}), got {tuple(data.shape)}")
        u = data.detach().cpu()
        if u.is_floating_point():
            if not torch.isfinite(u).all() or (u != u.round()).any():
                raise ValueError("data must hold integer values in [0, 255] (8-bit images)")
        elif u.dtype == torch.bool or u.is_complex():
            raise TypeError(f"data must be an integer (uint8) tensor, got {u.dtype}")
        if u.numel() and (u.min() < 0 or u.max() > 255):
            raise ValueError("data must hold integer values in [0, 255] (8-bit images)")
        self.data, self.event_shape = u.to(torch.uint8).contiguous(), tuple(event_shape)
        self.names = [""] * len(u)
        self.fingerprint = hashlib.sha256(self.data.numpy().tobytes()).hexdigest()
        self.fingerprint += f":{tuple(u.shape)}"

    def load(self, indices):
        return self.data[indices], list(indices), {}



def first_image_shape(files: list[str]) -> tuple[int, int, int]:
    """``(C, H, W)`` of the first readable image (for models without ``event_shape``)."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                return len(im.getbands()), im.height, im.width
        except Exception:
            continue
    return 3, 1, 1

