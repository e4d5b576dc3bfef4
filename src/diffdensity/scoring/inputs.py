"""Inputs of dataset scoring: image files (listed and decoded) or an 8-bit tensor, by index."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "list_images", "read_image", "decode_image", "pixel_id", "Batch", "Source", "FileSource", "TensorSource", "first_image_shape"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike], *, recursive: bool = False) -> list[str]:
    """Files in input order: a folder expands to its PNG/JPEG files, sorted by path.

    Files named explicitly are kept whatever their suffix (and reported later if they
    cannot be read); ``recursive`` also descends into sub-folders. A file named twice
    is listed once. Raises ``FileNotFoundError`` for a folder without images and for an
    empty list.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            images = sorted(str(p) for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                where = "it or its sub-folders" if recursive else "it (--recursive also searches sub-folders)"
                raise FileNotFoundError(f"folder {path} holds no PNG/JPEG images: no {', '.join(IMAGE_SUFFIXES)} files in {where}")
            files += images
        else:
            files.append(str(path))
    if not files:
        raise FileNotFoundError("no inputs: give image files or folders")
    return list(dict.fromkeys(files))


_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def read_image(path: str, event_shape: tuple[int, ...]) -> tuple[np.ndarray | None, str, str]:
    """``(uint8 (C, H, W) array or None, status, message)`` for one file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, "unreadable", f"{type(e).__name__}: {e}"
    return decode_image(data, event_shape)


def decode_image(data: bytes, event_shape: tuple[int, ...]) -> tuple[np.ndarray | None, str, str]:
    """``(uint8 (C, H, W) array or None, status, message)`` for the bytes of one PNG/JPEG file."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
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


def _pixel_hash(arr: np.ndarray) -> str:
    return hashlib.sha256(repr(tuple(arr.shape)).encode() + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()).hexdigest()


def pixel_id(arr: np.ndarray) -> int:
    """The 63-bit id of an 8-bit image ``(C, H, W)`` that keys its random numbers (noise, probes).

    A function of the shape and pixel values only: the same image gets the same noise
    as a file (in any encoding, at any position) or as a tensor row.
    """
    return int(_pixel_hash(arr)[:16], 16) >> 1


@dataclass
class Batch:
    """Loaded inputs: ``images`` uint8 ``(b, *event)`` of the positions ``ok``; ``failures[i] = (status, message)``;
    ``hashes[i]``: SHA-256 hex digest of every input that could be read (decoded or not);
    ``ids``: the :func:`pixel_id` of each decoded image (``ids[j]`` for ``ok[j]``)."""

    images: Tensor
    ok: list[int]
    failures: dict[int, tuple[str, str]]
    hashes: dict[int, str]
    ids: list[int]


class Source:
    """Inputs by position: ``names[i]``, ``content_hash(i)`` and ``load(positions) -> Batch``."""

    names: list[str]
    event_shape: tuple[int, ...]
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.names)

    def content_hash(self, i: int) -> str | None:
        """SHA-256 hex digest of input ``i`` as it is now (``None`` if it cannot be read)."""
        raise NotImplementedError

    def load(self, positions: list[int]) -> Batch:
        raise NotImplementedError


class FileSource(Source):
    """Image files; each is read once per load, hashed and decoded from the same bytes."""

    def __init__(self, files: list[str], event_shape: tuple[int, ...], *, decode: Callable | None = None):
        """``decode(bytes, event_shape) -> (uint8 (C, H, W) array or None, status, message)``:
        :func:`decode_image` by default, or a preprocessing's ``decode``."""
        self.names, self.event_shape = files, event_shape
        self.decode = decode or decode_image

    def content_hash(self, i: int) -> str | None:
        h = hashlib.sha256()
        try:
            with open(self.names[i], "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return None
        return h.hexdigest()

    def load(self, positions: list[int]) -> Batch:
        arrays, ok, failures, hashes = [], [], {}, {}
        for i in positions:
            try:
                data = Path(self.names[i]).read_bytes()
            except OSError as e:
                failures[i] = ("unreadable", f"{type(e).__name__}: {e}")
                continue
            hashes[i] = hashlib.sha256(data).hexdigest()
            arr, status, message = self.decode(data, self.event_shape)
            if arr is None:
                failures[i] = (status, message)
            else:
                arrays.append(arr)
                ok.append(i)
        images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, *self.event_shape, dtype=torch.uint8)
        return Batch(images, ok, failures, hashes, [pixel_id(a) for a in arrays])


class TensorSource(Source):
    """An 8-bit tensor ``(N, *event_shape)``; rows are hashed by their ``uint8`` values and shape."""

    def __init__(self, data: Tensor, event_shape: tuple[int, ...]):
        if data.ndim < 2 or tuple(data.shape[1:]) != tuple(event_shape):
            raise ValueError(f"data must have shape (N, *{tuple(event_shape)}), got {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise ValueError("data holds no images (shape (0, ...)); pass at least one")
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
        self._hashes = [_pixel_hash(row.numpy()) for row in self.data]

    def content_hash(self, i: int) -> str | None:
        return self._hashes[i]

    def load(self, positions: list[int]) -> Batch:
        ids = [int(self._hashes[i][:16], 16) >> 1 for i in positions]
        return Batch(self.data[positions], list(positions), {}, {i: self._hashes[i] for i in positions}, ids)


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

