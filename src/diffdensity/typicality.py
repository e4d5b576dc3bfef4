"""The typicality statistic (MATH.md s.4a).

For ``x ~ p_t`` the identity ``E[div s + |s|^2] = 0`` holds at every t, and in high
dimension the sum concentrates with standard deviation about ``sqrt(2D) / sigma_t^2``:

    h_t(x) = sigma_t^2 (div s(x) + |s(x)|^2) / sqrt(2 D)  ~approx~  N(0, 1).

``h_t`` far above 0 flags points denser than typical (smooth, mode-like), far below 0
points of lower density than typical (noisy, over-detailed).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _validation as v
from .divergence import DivergenceEstimator, make_divergence, model_fn
from .models import Model, broadcast_time

__all__ = ["typicality"]


def typicality(
    model: Model,
    x: Tensor,
    t: Tensor | float,
    *,
    divergence: str | DivergenceEstimator = "hutchinson",
    probes: int = 8,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """``h_t(x)``, float64 ``(B,)``, for ``x`` of shape ``(B, *event_shape)`` at time ``t``.

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
    return sigma2 * (lap + sq) / math.sqrt(2 * dim)
