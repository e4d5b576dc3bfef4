"""Orthonormal bases in which Hutchinson probes are drawn (docs/math.md s.6).

For an orthogonal ``U`` (``D x D``) and probe coefficients ``r`` with ``E[r r^T] = I``,
the probe ``e = U r`` has ``E[e e^T] = I`` too, so ``e^T J e = r^T (U^T J U) r`` is
unbiased for ``tr J`` in every basis. Its variance is not basis-free: with Rademacher
coefficients it is ``2 sum_{i != j} S'_ij^2`` for ``S' = U^T (J + J^T)/2 U``, the
off-diagonal energy of the Jacobian *in that basis*, and it vanishes where ``U``
diagonalises ``J``.

Denoisers of natural images act nearly diagonally on spatial frequencies and on
decorrelated colours (a Gaussian model of images is exactly diagonal in its principal
components, which frequencies and opponent colours approximate). Measured on the bundled
model's exact Jacobians at logSNR 2-10, :class:`ImageDCT` has 1.5-10x less off-diagonal
energy than the pixel basis (more than the principal components of its own training
data), most where the noise of tracked log-densities arises.

A basis maps a batch of tensors ``(..., *event_shape)`` both ways:
``synthesis(r) = U r`` (coefficients to probes) and ``analysis(v) = U^T v``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["Pixel", "ImageDCT", "check_basis", "resolve_basis", "BASES"]

BASES = ("auto", "pixel", "dct")

#: the opponent-colour transform (rows: luminance, red-blue, green-magenta), orthonormal;
#: close to the principal colour axes of natural RGB images.
_OPPONENT = ((1.0, 1.0, 1.0), (1.0, 0.0, -1.0), (1.0, -2.0, 1.0))


class Pixel:
    """The standard basis: probes are their coefficients."""

    def synthesis(self, r: Tensor) -> Tensor:
        return r

    def analysis(self, v: Tensor) -> Tensor:
        return v

    def __repr__(self) -> str:
        return "Pixel()"


@lru_cache(maxsize=32)
def _dct(n: int, dtype: torch.dtype, device: str) -> Tensor:
    """Orthonormal DCT-II matrix ``(n, n)``; row ``k`` is the ``k``-th cosine."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype=dtype, device=device)


@lru_cache(maxsize=8)
def _opponent(dtype: torch.dtype, device: str) -> Tensor:
    o = torch.tensor(_OPPONENT, dtype=torch.float64)
    return (o / o.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)


class ImageDCT:
    """Separable orthonormal DCT-II over the last two axes ``(H, W)``; for three channels
    ``(3, H, W)`` also the opponent-colour transform over the channel axis.

    ``analysis(v) = O (M_H v M_W^T)`` per channel mix, ``synthesis = analysis^T``; cost
    ``O(D (H + W))`` per probe, negligible next to a network evaluation.
    """

    def __init__(self, event_shape: tuple[int, ...]):
        if len(event_shape) < 2:
            raise ValueError(f"the DCT basis needs an image-shaped event (..., H, W), got {event_shape}")
        self.event_shape = tuple(event_shape)
        self.colour = len(event_shape) >= 3 and event_shape[-3] == 3

    def __repr__(self) -> str:
        return f"ImageDCT({self.event_shape})"

    def _apply(self, v: Tensor, transpose: bool) -> Tensor:
        """In float32 at least (half-precision transforms would bias the estimate by their rounding)."""
        dtype = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
        h, w = v.shape[-2:]
        mh, mw = _dct(h, dtype, str(v.device)), _dct(w, dtype, str(v.device))
        if transpose:
            mh, mw = mh.T, mw.T
        out = mh @ v.to(dtype) @ mw.T
        if self.colour:
            o = _opponent(dtype, str(v.device))
            out = torch.einsum("dc,...chw->...dhw", o.T if transpose else o, out)
        return out

    def synthesis(self, r: Tensor) -> Tensor:
        return self._apply(r, transpose=True).to(r.dtype)

    def analysis(self, v: Tensor) -> Tensor:
        return self._apply(v, transpose=False)


def check_basis(basis: object) -> None:
    """Raise unless ``basis`` is a name in :data:`BASES` or has ``synthesis`` and ``analysis``."""
    if isinstance(basis, str):
        if basis not in BASES:
            raise ValueError(f"unknown probe basis {basis!r}; expected one of {BASES} or a basis object")
    elif not (callable(getattr(basis, "synthesis", None)) and callable(getattr(basis, "analysis", None))):
        raise TypeError(f"a probe basis needs synthesis() and analysis() methods, got {basis!r}")


def resolve_basis(basis: "str | Pixel | ImageDCT", event_shape: tuple[int, ...]) -> "Pixel | ImageDCT":
    """``"auto"`` (DCT for image-shaped events ``(C, H, W)`` or ``(H, W)`` with ``H, W >= 4``,
    pixels otherwise), ``"pixel"``, ``"dct"`` or a basis object -> a basis object."""
    check_basis(basis)
    if not isinstance(basis, str):
        return basis
    if basis == "auto":
        image = len(event_shape) in (2, 3) and min(event_shape[-2:]) >= 4
        basis = "dct" if image else "pixel"
    return ImageDCT(event_shape) if basis == "dct" else Pixel()
