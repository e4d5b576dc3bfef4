"""Controlling log-density: density guidance and prior guidance (MATH.md s.4a-4c).

Density guidance asks the sampler for a chosen rate ``b_t`` of ``d/dt log p_t(x_t)``.
Among ODEs with that rate the one closest to the PF-ODE moves along the score:

    u~ = u_PF + k s,    k = (div u_PF + b) / |s|^2   =>   u~ = f x - (1/2) g^2 eta s,
    eta = 1 - 2 k / g^2.

The quantile rate ``b^q = -div u_PF - (1/2) g^2 sqrt(2D) Phi^-1(q) / sigma^2`` cancels the
divergence, ``eta = 1 + sqrt(2D) Phi^-1(q) / |sigma s|^2``, so DG-ODE costs exactly what
the PF-ODE costs. ``q > 0.5`` raises ``log p_0`` (smoother samples), ``q < 0.5`` lowers
it (more detail), ``q = 0.5`` is the PF-ODE.

Guard: near a mode ``|s|`` vanishes and ``eta`` blows up (low dimension, ``q > 0.5``).
``eta - 1`` is clamped to ``[-eta_cap, eta_cap]``; the tracked log-density always
uses the clamped ``eta``, i.e. the dynamics actually integrated (MATH.md s.3b):

    d/dt log p_t(x_t) = -div u_PF + s . (u~ - u_PF) = -div u_PF - (1/2) g^2 (eta - 1) |s|^2.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .dynamics import Dynamics, _expand
from .schedules import Schedule

__all__ = ["DensityGuidedODE", "chi_quantile", "normal_quantile", "rescale_latent"]


def normal_quantile(q: Tensor | float) -> Tensor:
    """``Phi^-1(q)`` for ``q`` in (0, 1), float64."""
    q = torch.as_tensor(q, dtype=torch.float64)
    if not ((q > 0) & (q < 1)).all():
        raise ValueError(f"q must lie strictly between 0 and 1, got {q.tolist()}")
    return torch.special.ndtri(q)


def chi_quantile(q: float, dim: int) -> float:
    """Quantile of the chi distribution with ``dim`` degrees of freedom (norm of a standard normal in R^dim).

    Solves ``P(dim/2, r^2/2) = q`` (regularised lower incomplete gamma) by bisection on
    a Wilson-Hilferty bracket, to float64 precision.
    """
    if not 0 < q < 1:
        raise ValueError(f"q must lie strictly between 0 and 1, got {q}")
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    a = torch.tensor(dim / 2, dtype=torch.float64)
    z = float(normal_quantile(q))
    guess = dim * max(1 - 2 / (9 * dim) + z * math.sqrt(2 / (9 * dim)), 1e-3) ** 3  # chi^2 quantile
    lo, hi = 0.0, max(4 * guess, 50.0)
    while float(torch.special.gammainc(a, torch.tensor(hi / 2, dtype=torch.float64))) < q:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.special.gammainc(a, torch.tensor(mid / 2, dtype=torch.float64))) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return math.sqrt(0.5 * (lo + hi))


def rescale_latent(x_T: Tensor, q: float, schedule: Schedule) -> Tensor:
    """Prior guidance (MATH.md s.4c): ``x_T * sigma_T chi_D^-1(q) / |x_T|``, per sample.

    ``q = 0.5`` puts every latent at the prior's median norm.
    """
    dim = math.prod(x_T.shape[1:])
    norm = x_T.reshape(x_T.shape[0], -1).to(torch.float64).norm(dim=1)
    if (norm == 0).any():
        raise ValueError("cannot rescale a latent of norm 0")
    scale = schedule.prior_std * chi_quantile(q, dim) / norm
    return x_T * scale.to(x_T.dtype).reshape(-1, *([1] * (x_T.ndim - 1)))


class DensityGuidedODE(Dynamics):
    """Density-guided probability-flow ODE ``u = f x - (1/2) g^2 eta s``.

    Give either ``q`` (a quantile in (0, 1), scalar or ``(B,)``: the DG-ODE) or ``rate``
    (``b(x, t) -> (B,)``, the wanted ``d/dt log p_t``; needs ``divergence``). With a
    ``divergence`` estimator the log-density is tracked. ``eta_cap`` bounds ``|eta - 1|``;
    ``capped`` records, per sample, whether the bound was ever active.
    """

    def __init__(
        self,
        model,
        *,
        q: Tensor | float | None = None,
        rate: Callable[[Tensor, Tensor], Tensor] | None = None,
        eta_cap: float = 10.0,
        **kwargs: Any,
    ):
        super().__init__(model, **kwargs)
        if (q is None) == (rate is None):
            raise ValueError("give exactly one of q (quantile) or rate (a callable b(x, t))")
        if rate is not None and self.divergence is None:
            raise ValueError("a user rate b(x, t) needs a divergence estimator (div u_PF enters the drift)")
        if not eta_cap > 0:
            raise ValueError(f"eta_cap must be positive, got {eta_cap}")
        self.z = None if q is None else normal_quantile(q)
        self.rate_fn, self.eta_cap = rate, float(eta_cap)
        self.capped: Tensor | None = None

    def __call__(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        sv = self.schedule(t)
        dim = math.prod(x.shape[1:])
        b = x.shape[0]
        if self.divergence is None:
            s, div_u = self.score(t, x), None
        else:
            s, lap = self.score_and_laplacian(t, x)
            div_u = dim * sv.f - 0.5 * sv.g2 * lap
        s2 = s.reshape(b, -1).to(torch.float64).square().sum(1).clamp_min(torch.finfo(torch.float64).tiny)
        if self.z is not None:
            shift = math.sqrt(2 * dim) * self.z.to(x.device) / (sv.sigma**2 * s2)
        else:
            wanted = self.rate_fn(x, t.expand(b)).to(torch.float64)
            shift = -2 * (div_u + wanted) / (sv.g2 * s2)
        over = shift.abs() > self.eta_cap
        if self.capped is None or self.capped.shape != over.shape:
            self.capped = torch.zeros_like(over)
        self.capped |= over
        shift = shift.clamp(-self.eta_cap, self.eta_cap)
        u = _expand(sv.f, x) * x - 0.5 * _expand(sv.g2, x) * _expand(1 + shift, x) * s
        rate = None if div_u is None else -div_u - 0.5 * sv.g2 * shift * s2
        return u, rate

    def warn_if_capped(self) -> None:
        """Warn once if the eta bound was active for any sample."""
        if self.capped is not None and self.capped.any():
            n = int(self.capped.sum())
            warnings.warn(
                f"density guidance asked for more than the model can give for {n} of {self.capped.numel()} samples "
                f"(|sigma s|^2 too small near a mode); |eta - 1| was capped at {self.eta_cap:g}, and the tracked "
                f"log-density is that of the capped dynamics",
                RuntimeWarning,
                stacklevel=3,
            )
