"""16x16 RGB patches from the public-domain photos and textures bundled with scikit-image.

Nothing is downloaded: every image ships inside the ``scikit-image`` wheel
(``skimage.data``), so the data set can be rebuilt offline on any machine with
``pip install scikit-image`` (the ``train`` extra).

Images and licences (from the ``skimage.data`` docstrings):

==============  =============  ==========================================================
name            kind           licence
==============  =============  ==========================================================
astronaut       RGB photo      public domain (NASA; "no known copyright restrictions")
chelsea         RGB photo      CC0 (Stefan van der Walt)
coffee          RGB photo      CC0 (Rachel Michetti)
rocket          RGB photo      public domain (SpaceX)
brick           grey texture   CC0 (CC0Textures, Bricks25)
grass           grey texture   CC0 (DeviantArt, linolafett)
gravel          grey texture   CC0 (CC0Textures, Gravel04)
camera          grey photo     CC0 (Lav Varshney)
==============  =============  ==========================================================

Grey images are repeated over the three channels. Each image is used at three scales
(1, 1/2 and 1/4, by box averaging, rounded back to 8 bits) so that patches range from
smooth sky and skin to dense texture.

Split. Every scaled image is tiled into 32x32 blocks; a block is *held out* when
``(3 * row + 5 * col) % 8 == 0`` (one block in eight, spread over the whole image).
A training patch lies entirely inside training blocks and a held-out patch entirely
inside one held-out block, so the two sets never share a pixel. Patches are cropped on
a grid with stride 4 (scale 1: stride 8). The split is deterministic: no randomness is
involved in building either set.

Values. Patches are stored as ``uint8`` tensors ``(N, 3, 16, 16)``;
:func:`to_model_space` maps them to ``[-1, 1]`` as ``x = 2 (u + 0.5) / 256 - 1`` (or with
uniform dequantisation noise ``U(0, 1)`` in place of 0.5, which is what training and
:func:`diffdensity.bits_per_dim` use).

The patch tensors are cached as ``.npy`` files under :func:`cache_dir`
(``$DIFFDENSITY_CACHE``, else ``$XDG_CACHE_HOME/diffdensity``, else
``~/.cache/diffdensity``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._files import atomic_write
from ..likelihood import dequantize

__all__ = ["IMAGES", "PATCH_SIZE", "cache_dir", "load_images", "patches", "to_model_space", "split_mask"]

IMAGES: dict[str, str] = {
    "astronaut": "public domain",
    "chelsea": "CC0",
    "coffee": "CC0",
    "rocket": "public domain",
    "brick": "CC0",
    "grass": "CC0",
    "gravel": "CC0",
    "camera": "CC0",
}
PATCH_SIZE = 16
SCALES = (1, 2, 4)  # downscaling factors
BLOCK = 32
_STRIDES = {1: 8, 2: 4, 4: 4}
_VERSION = 1
SPLITS = ("train", "heldout")


def cache_dir() -> Path:
    """Folder for cached patch tensors (created on demand)."""
    root = os.environ.get("DIFFDENSITY_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "diffdensity"


def _skimage_data():
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building the patch data set needs scikit-image: pip install 'diffdensity[train]'"
        ) from e
    return skimage.data


def load_images(names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The bundled images as ``uint8`` arrays ``(H, W, 3)`` (grey ones repeated)."""
    data = _skimage_data()
    out = {}
    for name in names or tuple(IMAGES):
        if name not in IMAGES:
            raise ValueError(f"unknown image {name!r}; expected one of {tuple(IMAGES)}")
        im = np.asarray(getattr(data, name)())
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        out[name] = np.ascontiguousarray(im[..., :3].astype(np.uint8))
    return out


def _downscale(im: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return im
    h, w = (im.shape[0] // factor) * factor, (im.shape[1] // factor) * factor
    x = im[:h, :w].astype(np.float64).reshape(h // factor, factor, w // factor, factor, 3).mean((1, 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def split_mask(height: int, width: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask, True on held-out pixels (32x32 blocks, one in eight)."""
    rows = np.arange(height) // BLOCK
    cols = np.arange(width) // BLOCK
    return ((3 * rows[:, None] + 5 * cols[None, :]) % 8) == 0


def _crop(im: np.ndarray, split: str, stride: int) -> np.ndarray:
    h, w, _ = im.shape
    p = PATCH_SIZE
    held = split_mask(h, w).astype(np.int64)
    # number of held-out pixels in each p x p window, from a summed-area table
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = held.cumsum(0).cumsum(1)
    ys = np.arange(0, h - p + 1, stride)
    xs = np.arange(0, w - p + 1, stride)
    count = sat[ys[:, None] + p, xs[None, :] + p] - sat[ys[:, None], xs[None, :] + p] - sat[ys[:, None] + p, xs[None, :]] + sat[ys[:, None], xs[None, :]]
    keep = count == 0 if split == "train" else count == p * p
    if split == "heldout":
        # one block per patch: held-out blocks may touch diagonally
        same = ((ys[:, None] // BLOCK) == ((ys[:, None] + p - 1) // BLOCK)) & ((xs[None, :] // BLOCK) == ((xs[None, :] + p - 1) // BLOCK))
        keep &= same
    iy, ix = np.nonzero(keep)
    out = np.empty((len(iy), 3, p, p), dtype=np.uint8)
    for k, (a, b) in enumerate(zip(ys[iy], xs[ix])):
        out[k] = im[a : a + p, b : b + p].transpose(2, 0, 1)
    return out


def _build(split: str) -> np.ndarray:
    parts = []
    for im in load_images().values():
        for factor in SCALES:
            parts.append(_crop(_downscale(im, factor), split, _STRIDES[factor]))
    return np.concatenate(parts)


def _cache_key() -> str:
    import skimage

    spec = dict(v=_VERSION, images=list(IMAGES), scales=SCALES, strides=_STRIDES, block=BLOCK, p=PATCH_SIZE, sk=skimage.__version__)
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def patches(split: str = "train", *, cache: bool = True) -> Tensor:
    """All patches of a split as a ``uint8`` tensor ``(N, 3, 16, 16)`` in a fixed order.

    ``split``: ``"train"`` or ``"heldout"`` (disjoint image regions, see the module
    docstring). With ``cache=True`` the array is read from / written to :func:`cache_dir`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    _skimage_data()
    path = cache_dir() / f"patches16_{_cache_key()}_{split}.npy"
    if cache and path.exists():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[1:] == (3, PATCH_SIZE, PATCH_SIZE):
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # rebuild a damaged cache file
    arr = _build(split)
    if cache:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write(path, buf.getvalue())
    return torch.from_numpy(arr)


def to_model_space(u: Tensor, *, noise: Tensor | None = None) -> Tensor:
    """8-bit values ``u`` -> ``[-1, 1]``: ``2 (u + noise) / 256 - 1`` (``noise`` default 0.5, the bin centre)."""
    u = u.to(torch.float32)
    return dequantize(u, 0.5 if noise is None else noise)
