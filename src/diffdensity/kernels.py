r"""Gaussian reverse kernels for Bayes-rule tracking along the reverse SDE (docs/math.md s.8).

The forward process fixes the kernel from ``t' < t`` to ``t``,
``q(x | x') = N(a x', c I)`` with ``(a, c) = schedule.transition(t', t)``. Tweedie's
formulas give the moments of the true reverse kernel ``p(x' | x)`` from the score
``s`` at ``(t, x)``::

    E[x' | x]   = (x + c s) / a                        (exact)
    Cov[x' | x] = (c / a^2) (I + c grad s)             (needs the Hessian)

A kernel here is ``N(m, v I)`` with that mean and an isotropic variance
``v = (c / a^2)(1 - kappa)``:

``"tweedie"``
    ``kappa = c |s|^2 / D`` clamped to ``[0, c / sigma_t^2]``: first order in ``c`` the
    best isotropic variance is ``(c / a^2)(1 + c div s / D)``, and for ``x ~ p_t``
    ``div s = -|s|^2 (1 + O(D^-1/2))`` (the typicality statistic, s.4a), at no cost.
``"ancestral"``
    ``kappa = c / sigma_t^2`` (the DDPM posterior variance, exact for a point mass).

The derivation and the error of each (the *spread* of the Hessian's spectrum for
``"tweedie"``) are in :mod:`diffdensity.sde`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GaussianKernel", "KERNEL_SCHEMES", "tweedie_kernel"]

KERNEL_SCHEMES = ("tweedie", "ancestral")
"""Names of the isotropic Gaussian reverse kernels :func:`tweedie_kernel` builds."""


@dataclass
class GaussianKernel:
    """A reverse kernel ``N(mean, var I)`` from ``(t, x)`` to ``t_next`` and the forward kernel's ``(a, c)``.

    ``mean``: float64, the shape of ``x``. ``var``: float64 ``(B,)``. ``a``, ``c``: floats
    of ``q(x | x') = N(a x', c I)``. ``logp_bias``: float64 ``(B,)`` or ``None``, an
    estimate of the step's mean log-density error ``E[log p^(x'|x) - log p(x'|x)]``
    that the integrator subtracts.
    """

    mean: Tensor
    var: Tensor
    a: float
    c: float
    logp_bias: Tensor | None = None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.to(torch.float64) * b.to(torch.float64)).reshape(a.shape[0], -1).sum(1)


def tweedie_kernel(schedule, t: float, t_next: float, x: Tensor, s: Tensor, scheme: str = "tweedie") -> GaussianKernel:
    """The Gaussian reverse kernel of ``scheme`` (``"tweedie"`` or ``"ancestral"``) from ``(t, x)`` to ``t_next < t``.

    ``s`` is the score at ``(t, x)``, of the shape of ``x`` ``(B, *event_shape)``.
    """
    a, c = schedule.transition(t_next, t)
    if not c > 0:
        raise ValueError(f"a reverse step needs t_next < t with decreasing logSNR, got t={t:g}, t_next={t_next:g}")
    sig2 = float(schedule(torch.tensor(t, dtype=torch.float64)).sigma) ** 2
    x64, s64 = x.to(torch.float64), s.to(torch.float64)
    mean = (x64 + c * s64) / a
    dim = math.prod(x.shape[1:])
    if scheme == "ancestral":
        kappa = torch.full((x.shape[0],), c / sig2, dtype=torch.float64, device=x.device)
    elif scheme == "tweedie":
        kappa = (c * _dot(s64, s64) / dim).clamp(0.0, c / sig2)
    else:
        raise ValueError(f"unknown kernel scheme {scheme!r}; expected one of {KERNEL_SCHEMES}")
    return GaussianKernel(mean, (c / a**2) * (1 - kappa), a, c)
