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
``"tweedie-jvp"``
    one Jacobian-vector product ``J e`` of the score with a Rademacher probe ``e``
    (replacing the score pass) estimates ``div s ~ e.Je`` and ``tr(J^2) ~ |J e|^2``
    (``J`` symmetric). The variance uses the estimated divergence,
    ``kappa = -c e.Je / D`` (clamped as above), and the step's mean error, the Gaussian
    ``KL(N(m, vI) || N(m, (c/a^2)(I + c J)))``, expanded to second order in the spread of
    the spectrum ``w_i`` of ``c J`` around the kernel's own ``-kappa``,

        KL ~ (1/4) sum_i (kappa + w_i)^2 / (1 - kappa)^2
           = (D kappa^2 + 2 kappa c div s + c^2 tr J^2) / (4 (1 - kappa)^2),

    is subtracted from the increment (``logp_bias``). On learned networks, where
    ``div s`` and ``-|s|^2`` differ and the spread is large near the data end, this
    removes most of the upward drift of ``"tweedie"`` (``docs/sampling.md``).

The derivation and the error of each (the *spread* of the Hessian's spectrum for
``"tweedie"``) are in :mod:`diffdensity.sde`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GaussianKernel", "KERNEL_SCHEMES", "tweedie_kernel"]

KERNEL_SCHEMES = ("tweedie", "tweedie-jvp", "ancestral")
"""Names of the isotropic Gaussian reverse kernels :func:`tweedie_kernel` builds."""


@dataclass
class GaussianKernel:
    """A reverse kernel ``N(mean, var I)`` from ``(t, x)`` to ``t_next`` and the forward kernel's ``(a, c)``.

    ``mean``: float64, the shape of ``x``. ``var``: float64 ``(B,)``. ``a``, ``c``: floats
    of ``q(x | x') = N(a x', c I)``. ``logp_bias``: float64 ``(B,)`` or ``None``, an
    estimate of the step's mean log-density error ``E[log p^(x'|x) - log p(x'|x)]``
    that the integrator subtracts; ``logp_var`` float64 ``(B,)`` or ``None``, the
    variance of that estimate's Hutchinson part.
    """

    mean: Tensor
    var: Tensor
    a: float
    c: float
    logp_bias: Tensor | None = None
    logp_var: Tensor | None = None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.to(torch.float64) * b.to(torch.float64)).reshape(a.shape[0], -1).sum(1)


def tweedie_kernel(
    schedule, t: float, t_next: float, x: Tensor, s: Tensor, scheme: str = "tweedie", probe: tuple[Tensor, Tensor] | None = None
) -> GaussianKernel:
    """The Gaussian reverse kernel of ``scheme`` (one of :data:`KERNEL_SCHEMES`) from ``(t, x)`` to ``t_next < t``.

    ``s`` is the score at ``(t, x)``, of the shape of ``x`` ``(B, *event_shape)``;
    ``probe = (e, J e)`` (same shape) for ``"tweedie-jvp"``.
    """
    a, c = schedule.transition(t_next, t)
    if not c > 0:
        raise ValueError(f"a reverse step needs t_next < t with decreasing logSNR, got t={t:g}, t_next={t_next:g}")
    sig2 = float(schedule(torch.tensor(t, dtype=torch.float64)).sigma) ** 2
    x64, s64 = x.to(torch.float64), s.to(torch.float64)
    mean = (x64 + c * s64) / a
    dim = math.prod(x.shape[1:])
    bias = None
    if scheme == "ancestral":
        kappa = torch.full((x.shape[0],), c / sig2, dtype=torch.float64, device=x.device)
    elif scheme == "tweedie":
        kappa = (c * _dot(s64, s64) / dim).clamp(0.0, c / sig2)
    elif scheme == "tweedie-jvp":
        if probe is None:
            raise ValueError("scheme 'tweedie-jvp' needs probe=(e, J e), a Jacobian-vector product of the score")
        e, je = probe
        div, tr2 = _dot(e, je), _dot(je, je)
        kappa = (-c * div / dim).clamp(0.0, c / sig2)
        scale = 4 * (1 - kappa) ** 2
        bias = (dim * kappa**2 + 2 * c * kappa * div + c**2 * tr2) / scale
        # Hutchinson part: unclamped, bias = c^2 (tr2 - div^2 / D) / scale, so d bias / d div = -2 c^2 div / (D scale),
        # times Var(e.Je) = 2 sum_{i != j} J_ij^2 <= 2 |J - a I|_F^2 for any a; with a = div / D,
        # |J e - a e|^2 = tr2 - div^2 / D estimates it (docs/math.md s.9; exact for a constant diagonal)
        var = (2 * c**2 * div / (dim * scale)) ** 2 * 2 * (tr2 - div**2 / dim).clamp_min(0.0)
        return GaussianKernel(mean, (c / a**2) * (1 - kappa), a, c, bias, var)
    else:
        raise ValueError(f"unknown kernel scheme {scheme!r}; expected one of {KERNEL_SCHEMES}")
    return GaussianKernel(mean, (c / a**2) * (1 - kappa), a, c, bias)
