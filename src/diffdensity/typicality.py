"""The typicality statistic (docs/math.md s.4a).

For ``x ~ p_t`` the identity ``E[div s + |s|^2] = 0`` holds at every t (Stein's
identity), so

    h_t(x) = sigma_t^2 (div s(x) + |s(x)|^2) / sqrt(2 D)

has mean exactly 0. Its spread is at most 1: about N(0, 1) where noise dominates
(logSNR <= -4 or so), narrower at lower noise (for Gaussian data N(0, diag(c)) its
variance is ``mean_d (sigma^2 / (alpha^2 c_d + sigma^2))^2``).

``h_t`` far above 0 flags points denser than typical (smooth, mode-like), far below 0
points of lower density than typical (noisy, over-detailed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _validation as v
from .divergence import DivergenceEstimator, Exact, make_divergence, model_fn
from .models import Model, broadcast_time

__all__ = ["typicality", "TypicalityResult"]


@dataclass
class TypicalityResult:
    """``h``: float64 ``(B,)`` the statistic; ``stderr``: float64 ``(B,)`` its standard error
    from the Hutchinson estimate of ``div s`` (zeros for the exact divergence; ``None`` for a
    single Rademacher probe, whose variance cannot be estimated from its own products)."""

    h: Tensor
    stderr: Tensor | None
    t: Tensor
    settings: dict

    def __repr__(self) -> str:
        se = "" if self.stderr is None else f", stderr up to {float(self.stderr.max()):.2g}"
        return f"TypicalityResult(h mean {float(self.h.mean()):+.3f} over {self.h.shape[0]} points{se})"


def typicality(
    model: Model,
    x: Tensor,
    t: Tensor | float,
    *,
    divergence: str | DivergenceEstimator = "hutchinson",
    probes: int = 8,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> TypicalityResult:
    """``h_t(x)``, float64 ``(B,)``, for ``x`` of shape ``(B, *event_shape)`` at time ``t``, with its error.

    ``div s`` comes from ``divergence`` (``"hutchinson"`` with ``probes`` probes, or
    ``"exact"``); Hutchinson's noise adds a variance of about
    ``Var(eigenvalues of sigma^2 grad s) / probes`` to that of ``h``.
    """
    v.check_model(model)
    x = v.check_x(x, model)
    cond = v.check_kwargs(model_kwargs)
    t = broadcast_time(t, x).to(torch.float64)
    model.schedule.check_t(t)
    est = make_divergence(divergence, probes)
    est.reset(generator)
    with torch.no_grad():
        s, lap = est(model_fn(model, t, cond), x)
    sigma2 = model.schedule(t).sigma ** 2
    dim = math.prod(x.shape[1:])
    sq = s.reshape(s.shape[0], -1).to(torch.float64).square().sum(1)
    scale = sigma2 / math.sqrt(2 * dim)
    if isinstance(est, Exact):
        stderr = torch.zeros_like(sq)
    else:
        var = getattr(est, "last_var", None)
        stderr = None if var is None else scale * var.to(torch.float64).clamp_min(0).sqrt()
    return TypicalityResult(scale * (lap + sq), stderr, t, dict(divergence=repr(est)))
