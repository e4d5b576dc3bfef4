"""Preparing your own images for a model: size, channels and transparency, never silently.

A model scores 8-bit images of exactly its ``event_shape`` ``(C, H, W)``. :func:`prepare`
turns a decoded image into that shape with documented, opt-in steps and reports each one:

* **size** -- ``resize=None`` (default): the image must already be ``H x W``, otherwise
  :class:`PreprocessError` says so and names the fix. ``resize="lanczos"`` (or
  ``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"box"``, ``"hamming"``; Pillow's
  filters, antialiased when shrinking) rescales: with ``fit="crop"`` (default) the shorter
  side is scaled to the model's and the centre is cut out (aspect kept, edges lost); with
  ``fit="stretch"`` each side is scaled on its own (nothing lost, aspect changed).
* **channels** -- a greyscale image for an RGB model is replicated to three equal
  channels (lossless). An RGB image for a one-channel model is accepted only if it is grey
  already (equal channels); converting colour to grey is your call.
* **transparency** -- an alpha channel that is fully opaque is dropped (lossless). Any
  transparent pixel is refused unless ``alpha="white"`` or ``alpha="black"`` composites
  the image onto that background.

Everything else (16-bit, CMYK, palette without a colour table) is refused with the
reason. Rescaling changes what is scored: the log-density is that of the resized image
under the model, not of the original file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["RESIZE_FILTERS", "FITS", "ALPHAS", "PreprocessError", "Preprocessing", "prepare", "load_images"]

RESIZE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
FITS = ("crop", "stretch")
ALPHAS = ("refuse", "white", "black")


class PreprocessError(ValueError):
    """An image that cannot be brought to the model's shape with the chosen options (the message names the fix)."""


@dataclass(frozen=True)
class Preprocessing:
    """The options of :func:`prepare` (see the module docstring); defaults change no pixel."""

    resize: str | None = None
    fit: str = "crop"
    alpha: str = "refuse"

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize not in RESIZE_FILTERS:
            raise ValueError(f"resize must be None or one of {RESIZE_FILTERS}, got {self.resize!r}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.alpha not in ALPHAS:
            raise ValueError(f"alpha must be one of {ALPHAS}, got {self.alpha!r}")

    def settings(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (record them with results computed from prepared images)."""
        return {"resize": self.resize, "fit": self.fit, "alpha": self.alpha}

    def __call__(self, image, event_shape: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        return prepare(image, event_shape, resize=self.resize, fit=self.fit, alpha=self.alpha)

    def decode(self, data: bytes, event_shape: Sequence[int]) -> tuple[np.ndarray | None, str, str]:
        """``(uint8 (C, H, W) array or None, status, message)`` for the bytes of one image file.

        ``status`` is ``"ok"`` (``message``: the steps applied, ``""`` if none),
        ``"unreadable"`` (not a decodable image) or ``"wrong_shape"`` (refused; ``message``
        says why and how to fix it): the contract of the dataset scorer's image reader.
        """
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                arr, notes = self(im, event_shape)
        except PreprocessError as e:
            return None, "wrong_shape", str(e)
        except Exception as e:  # PIL raises many types for damaged files (OSError, SyntaxError, ...)
            return None, "unreadable", f"{type(e).__name__}: {e}"
        return arr, "ok", "; ".join(notes)


_FIX_SIZE = "pass resize='lanczos' (CLI: --resize lanczos) to rescale it, with fit='crop' (centre crop) or 'stretch'"


def prepare(image, event_shape: Sequence[int], *, resize: str | None = None, fit: str = "crop", alpha: str = "refuse") -> tuple[np.ndarray, list[str]]:
    """Bring one image to ``event_shape`` ``(C, H, W)``, C = 1 or 3: ``(uint8 (C, H, W) array, notes)``.

    ``image``: a ``PIL.Image`` or a uint8 array ``(H, W)`` / ``(H, W, K)``, K = 1..4 (L,
    LA, RGB, RGBA). ``notes``: one short line per step applied (empty when the image
    was used as it is). Raises :class:`PreprocessError` naming the option that would
    fix a mismatch. See the module docstring for the steps.
    """
    Preprocessing(resize, fit, alpha)  # checks the options
    c, h, w = _check_shape(event_shape)
    im = _as_pil(image)
    notes: list[str] = []
    im = _flatten_alpha(im, alpha, notes)
    if im.size != (w, h):
        if resize is None:
            raise PreprocessError(f"image is {im.size[0]}x{im.size[1]}; the model expects {w}x{h}: {_FIX_SIZE}")
        im = _resize(im, w, h, resize, fit, notes)
    arr = np.asarray(im)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    arr = _match_channels(arr, c, notes)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), notes


def load_images(paths: str | os.PathLike | Sequence[str | os.PathLike], event_shape: Sequence[int], **options: Any):
    """Read image files into a uint8 tensor ``(N, C, H, W)`` with :func:`prepare` (``options``: its keywords).

    The result goes straight to :func:`diffdensity.bits_per_dim`. A file that cannot be
    read or prepared raises, naming the file.
    """
    import torch

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("no image paths given")
    prep = Preprocessing(**options)
    arrays = []
    for p in paths:
        with open(p, "rb") as f:
            arr, status, msg = prep.decode(f.read(), event_shape)
        if arr is None:
            raise PreprocessError(f"{p}: {msg}")
        arrays.append(torch.from_numpy(arr))
    return torch.stack(arrays)


def _check_shape(event_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in event_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise ValueError(f"event_shape must be (C, H, W) with C = 1 or 3, got {tuple(event_shape)}")
    return shape  # type: ignore[return-value]


_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _as_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode == "P":
            return image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode == "1":
            return image.convert("L")
        if image.mode not in _MODES.values():
            raise PreprocessError(f"pixel format {image.mode} is not 8-bit L/LA/RGB/RGBA; convert the image to 8-bit RGB first")
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise PreprocessError(f"image arrays must be uint8 (8-bit), got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in _MODES):
        raise PreprocessError(f"image arrays must be (H, W) or (H, W, K) with K = 1..4, got {arr.shape}")
    return Image.fromarray(arr, mode=_MODES[1 if arr.ndim == 2 else arr.shape[2]])


def _flatten_alpha(im, alpha: str, notes: list[str]):
    from PIL import Image

    if im.mode not in ("LA", "RGBA"):
        return im
    a = np.asarray(im.getchannel("A"))
    base = "L" if im.mode == "LA" else "RGB"
    if (a == 255).all():
        notes.append("opaque alpha channel dropped")
        return im.convert(base)
    if alpha == "refuse":
        raise PreprocessError(f"image has {int((a < 255).sum())} transparent pixels: pass alpha='white' or 'black' (CLI: --alpha white) "
                              "to composite it onto that background")
    background = Image.new(im.mode, im.size, (255,) * len(im.mode) if alpha == "white" else (0,) * (len(im.mode) - 1) + (255,))
    notes.append(f"transparency composited onto {alpha}")
    return Image.alpha_composite(background.convert("RGBA"), im.convert("RGBA")).convert(base)


def _resize(im, w: int, h: int, resize: str, fit: str, notes: list[str]):
    from PIL import Image

    resample = getattr(Image.Resampling, resize.upper())
    src = f"{im.size[0]}x{im.size[1]}"
    if fit == "stretch":
        notes.append(f"resized {src} -> {w}x{h} ({resize}, stretched)")
        return im.resize((w, h), resample=resample)
    scale = max(w / im.size[0], h / im.size[1])
    sw, sh = max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))
    im = im.resize((sw, sh), resample=resample)
    left, top = (sw - w) // 2, (sh - h) // 2
    notes.append(f"resized {src} -> {sw}x{sh} ({resize}), centre {w}x{h} kept" if (sw, sh) != (w, h) else f"resized {src} -> {w}x{h} ({resize})")
    return im.crop((left, top, left + w, top + h))


def _match_channels(arr: np.ndarray, c: int, notes: list[str]) -> np.ndarray:
    k = arr.shape[2]
    if k == c:
        return arr
    if k == 1 and c == 3:
        notes.append("greyscale replicated to RGB")
        return np.repeat(arr, 3, axis=2)
    if k == 3 and c == 1:
        if (arr == arr[:, :, :1]).all():
            notes.append("grey RGB reduced to one channel")
            return arr[:, :, :1]
        raise PreprocessError("the model takes greyscale images and this one has colour: convert it to greyscale first (e.g. PIL's convert('L'))")
    raise PreprocessError(f"image has {k} channels; the model expects {c}")
