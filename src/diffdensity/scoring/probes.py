"""Hutchinson's divergence estimator with probes drawn from per-sample keys."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..divergence import Hutchinson
from .keys import advance_keys, normal, rademacher

__all__ = ["PerSampleHutchinson"]


class PerSampleHutchinson(Hutchinson):
    """Hutchinson's estimator whose probes are a function of each sample's key and the call.

    Call :meth:`bind` with the keys ``(B, 2)`` of the batch's samples (see
    :func:`sample_keys`) before a solve. Probes are fresh at every call (every stage of a
    fixed-step solver), like ``Hutchinson(resample="call")``, but sample ``b`` at draw
    ``k`` always gets the same probes whatever batch it is in, so likelihoods do not
    depend on the batch composition, the batch size or the number of processes.
    """

    def __init__(self, probes: int = 1, *, noise: str = "rademacher", mode: str = "auto", basis="auto"):
        super().__init__(probes, noise=noise, resample="call", mode=mode, basis=basis)
        self.keys: Tensor | None = None
        self._draws = 0

    def __repr__(self) -> str:
        basis = "" if self.basis == "auto" else f", basis={self.basis!r}"
        return f"PerSampleHutchinson(probes={self.probes}, noise={self.noise!r}, mode={self.mode!r}{basis})"

    def bind(self, keys: Tensor) -> None:
        """Use ``keys`` ``(B, 2)`` for the samples of the next solve."""
        if keys.ndim != 2 or keys.shape[1] != 2:
            raise ValueError(f"keys must have shape (B, 2), got {tuple(keys.shape)}")
        self.keys = keys

    def reset(self, generator: torch.Generator | None = None) -> None:
        super().reset(None)  # the generator is not used: probes come from the keys
        self._draws = 0

    def draw(self, x: Tensor) -> Tensor:
        if self.keys is None or self.keys.shape[0] != x.shape[0]:
            raise RuntimeError(f"bind() keys for the {x.shape[0]} samples of the batch before solving")
        keys = advance_keys(self.keys.to(x.device), self._draws)
        self._draws += 1
        n = self.probes * math.prod(x.shape[1:])
        e = normal(keys, n) if self.noise == "gaussian" else rademacher(keys, n)
        return e.reshape(x.shape[0], self.probes, *x.shape[1:]).transpose(0, 1).to(x.dtype)

