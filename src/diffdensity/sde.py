r"""Stochastic integrators that carry ``log p`` along with ``x`` (docs/math.md s.3c, s.3d, s.8).

Sampling runs ``t`` backwards along a grid ``t_0 = t_max > t_1 > ... > t_N = t_min``.
One step goes from ``(t, x)`` to ``(t', x')`` with ``t' < t``; ``h = t - t'``. Every
scheme evaluates the score once per step: tracking adds arithmetic, never network
passes.

Integrators are named by :data:`SCHEMES`; which ones a dynamics supports (its
Gaussian reverse kernel, if it has one) the dynamics say themselves,
:func:`schemes_for`. The integrator only asks the dynamics for its terms or its
kernel; it never calls the network or the schedule itself.

``"euler-maruyama"`` (any :class:`~diffdensity.dynamics.SDEDynamics`; the reference)
    With ``z ~ N(0, I)`` shared by both lines (docs/math.md s.3c/3d)::

        x'    = x - u h + G sqrt(h) z
        logp' = logp + rate h + s . (G sqrt(h) z)

    Its log-density error is dominated by a bias of order ``D h``: every one of the D
    coordinates contributes ``O(h^2)`` per step (the drift coefficient ``f`` taken at
    the left end, the Gaussian increment's variance ``g^2 h`` against the true
    conditional variance, ...).

``"ancestral"`` and ``"tweedie"`` (dynamics with a :meth:`kernel`, e.g. the model's :class:`~diffdensity.dynamics.ReverseSDE`)
    *Bayes-rule tracking.* The forward process fixes the kernel from ``t'`` to ``t``::

        q(x | x') = N(x; a x', c I),   a = alpha_t / alpha_t',
                                       c = sigma_t^2 - a^2 sigma_t'^2 = -sigma_t^2 expm1(lambda_t - lambda_t')

    and Bayes' rule ``p_t'(x') q(x | x') = p_t(x) p(x' | x)`` holds for *every* pair,
    so, exactly and pathwise,

        log p_t'(x') = log p_t(x) + log p(x' | x) - log q(x | x').

    The true reverse kernel ``p(x' | x)`` is unknown, but we may draw ``x'`` from a
    Gaussian approximation ``p^(x' | x) = N(m, v I)`` and add
    ``log p^(x' | x) - log q(x | x')``. The only error is then
    ``e = log p^(x' | x) - log p(x' | x)`` per step, whose mean is
    ``KL(p^ || p) >= 0``: a good kernel keeps it small in any dimension.

    Tweedie's formulas for ``x = a x' + sqrt(c) eps`` give the true kernel's first two
    moments from the score at ``(t, x)``, which the step computes anyway::

        E[x' | x]   = (x + c s) / a                                (exact)
        Cov[x' | x] = (c / a^2) (I + c grad s)                     (needs the Hessian)

    The mean is the DDPM posterior mean given the predicted ``x_0``. For the
    covariance, the isotropic ``v`` minimising ``KL(N(m, vI) || N(m, Cov))`` is, to
    first order in ``c``, ``(c / a^2)(1 + c div s / D)``. For ``x ~ p_t`` the typicality
    statistic (docs/math.md s.4a) says ``div s = -|s|^2 + O(sqrt(2 D) / sigma_t^2)``, so
    ``div s / D = -|s|^2 / D`` up to a relative ``O(D^-1/2)``, at no cost::

        "tweedie":   v = (c / a^2)(1 - kappa),  kappa = c |s|^2 / D  clamped to [0, c / sigma_t^2]
        "ancestral": v = (c / a^2) exp(lambda_t - lambda_t')    (kappa = c / sigma_t^2)

    The clamp keeps ``v`` between the ancestral (DDPM posterior) variance, exact when
    the data are a point mass (``grad s = -I / sigma_t^2``), and ``c / a^2``
    (``grad s = 0``). With ``c h_i`` the eigenvalues of ``c grad s``, the mean error per
    step is about ``(1/4) sum_i c^2 (h_i - mean h)^2`` for ``"tweedie"``, only the
    *spread* of the Hessian's spectrum, against ``(1/4) sum_i c^2 (h_i + 1/sigma_t^2)^2``
    for ``"ancestral"``. Both are consistent discretisations of the reverse SDE
    (``m = x + (g^2 s - f x) h + O(h^2)``, ``v = g^2 h + O(h^2)``), and the increment,
    computed in float64 from the realised ``x'`` (whatever its rounding), is::

        logp' = logp - |x' - m|^2 / (2 v) + |x - a x'|^2 / (2 c) - (D / 2) log(v / c)

    ``"tweedie-jvp"`` turns the step's score pass into one Jacobian-vector product with a
    Rademacher probe ``e``: the variance uses the estimated ``div s ~ e.Je`` instead of
    ``-|s|^2`` (they differ on learned networks near the data end), and the step's mean
    error, the Gaussian KL expanded to second order in the spread of the spectrum of
    ``c grad s`` (``tr (grad s)^2 ~ |Je|^2``), is subtracted
    (:mod:`diffdensity.kernels`; its Hutchinson variance goes to ``logp_var``).

``"split-heun"`` (dynamics with a :meth:`split_step`, e.g. stochastic density guidance)
    A Heun step of the dynamics' deterministic part, then its noise as one kick at the
    new time (:class:`~diffdensity.guidance.StochasticDensityGuidance`).

    The tracking error of the Bayes-rule schemes is of order ``h`` (its mean; its random
    part is ``O(sqrt(h))``); on a 3072-dimensional mixture ``"tweedie"`` cuts it
    18-fold (256 steps) and 21-fold (1024 steps) against Euler-Maruyama at equal
    network passes (``benchmarks/tracking.py``, ``docs/sampling.md``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .dynamics import _dot
from .kernels import KERNEL_SCHEMES, GaussianKernel
from .solvers import Solution, StepInfo

__all__ = ["SCHEMES", "KERNEL_SCHEMES", "sdeint", "schemes_for", "check_scheme"]

SCHEMES = ("tweedie", "tweedie-jvp", "ancestral", "euler-maruyama", "split-heun", "split-exp-heun")
"""Names of the stochastic integrators; :func:`schemes_for` says which a dynamics supports."""


def schemes_for(dynamics: Any) -> tuple[str, ...]:
    """The schemes of :data:`SCHEMES` that ``dynamics`` supports, its default first."""
    return tuple(getattr(dynamics, "schemes", ("euler-maruyama",)))


def check_scheme(scheme: Any, dynamics: Any, what: str = "scheme") -> str:
    """``scheme`` (``None``: the dynamics' default) checked against the dynamics; the name to use."""
    supported = schemes_for(dynamics)
    if scheme is None:
        return supported[0]
    if scheme not in SCHEMES:
        raise ValueError(f"unknown stochastic {what} {scheme!r}; expected one of {SCHEMES}")
    if scheme not in supported:
        raise ValueError(
            f"{what} {scheme!r} needs a Gaussian reverse kernel (the model's reverse SDE) or, for 'split-heun', "
            f"a split step (stochastic density guidance); {type(dynamics).__name__} supports {supported}"
        )
    return scheme


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def kernel_logp_increment(k: GaussianKernel, x: Tensor, x_new: Tensor) -> Tensor:
    """Bayes' rule along a step: ``log p^(x' | x) - log q(x | x')``, float64 ``(B,)`` (minus the kernel's bias estimate).

    ``x`` ``(B, *event_shape)`` at ``t``, ``x_new`` at ``t_next``, ``k`` the kernel that drew it.
    """
    dim = math.prod(x.shape[1:])
    xn64 = x_new.to(torch.float64)
    r = xn64 - k.mean
    e = x.to(torch.float64) - k.a * xn64
    dlogp = -_dot(r, r) / (2 * k.var) + _dot(e, e) / (2 * k.c) - 0.5 * dim * torch.log(k.var / k.c)
    return dlogp if k.logp_bias is None else dlogp - k.logp_bias


def _kernel_step(dyn, t: float, t_next: float, x: Tensor, generator, scheme: str, track: bool):
    """One Bayes-rule step: ``(x', d logp or None, its variance or None)``."""
    k = dyn.kernel(t, t_next, x, scheme, generator)
    view = (-1,) + (1,) * (x.ndim - 1)
    z = _randn(x, generator)
    x_new = (k.mean + k.var.sqrt().reshape(view) * z.to(torch.float64)).to(x.dtype)
    if not track:
        return x_new, None, None
    return x_new, kernel_logp_increment(k, x, x_new), getattr(k, "logp_var", None)


def _em_step(dyn, t: float, t_next: float, x: Tensor, generator, track: bool):
    """One Euler-Maruyama step (docs/math.md s.3c/3d): ``(x', d logp or None, its variance or None)``."""
    h = t - t_next
    terms = dyn.terms(torch.tensor(t, dtype=torch.float64), x)
    dw = _randn(x, generator) * math.sqrt(h)
    gdw = terms.noise(dw)
    x_new = x - h * terms.drift + gdw
    if not track:
        return x_new, None, None
    var = getattr(terms, "rate_var", None)
    return x_new, terms.rate * h + _dot(terms.score, gdw), None if var is None else var * h**2


def sdeint(
    dynamics: Any,
    x: Tensor,
    ts: Tensor,
    *,
    logp: Tensor | None = None,
    scheme: str | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    begin_step: Callable[[], None] | None = None,
) -> Solution:
    """Integrate ``dx = u dt + G dW_bar`` backwards along the decreasing grid ``ts`` ``(N + 1,)``.

    ``dynamics``: anything with ``terms(t, x)`` (:class:`~diffdensity.dynamics.SDETerms`)
    for ``"euler-maruyama"``, ``kernel(t, t_next, x, scheme, generator)``
    (:class:`~diffdensity.kernels.GaussianKernel`) for the Bayes-rule schemes, and
    ``split_step(t, t_next, x, generator, track, scheme)`` for ``"split-heun"`` and
    ``"split-exp-heun"`` (an ODE step then
    a noise kick, e.g. stochastic density guidance), as it lists them in ``schemes``. ``logp``: float64 ``(B,)`` log-density at ``ts[0]``, or ``None`` not
    to track it. ``scheme``: a name in :data:`SCHEMES` (``None``: the dynamics' default,
    :func:`schemes_for`). ``generator`` draws the Brownian increments; ``begin_step`` is
    called before each step (fresh Hutchinson probes). Returns the final state, the
    log-density path ``(N + 1, B)``, the grid, and ``logp_var`` (float64 ``(B,)``, the
    variance of the Hutchinson part of the accumulated ``log p``; zeros when no step
    estimates a divergence).
    """
    scheme = check_scheme(scheme, dynamics)
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    if ts.numel() < 2 or not (ts[1:] < ts[:-1]).all():
        raise ValueError("ts must be a strictly decreasing grid of at least two times")
    if not torch.isfinite(x).all():
        raise ValueError("initial state x contains NaN or Inf")
    track = logp is not None
    if track and not getattr(dynamics, "track_logp", True):
        raise ValueError("logp was given but the dynamics were built with track_logp=False")
    lp = None if logp is None else logp.to(torch.float64).clone()
    var = None if logp is None else torch.zeros_like(lp)
    path = [lp.clone()] if track else []
    if callback is not None:
        callback(StepInfo(0, float(ts[0]), x, lp))
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        if begin_step is not None:
            begin_step()
        if scheme == "euler-maruyama":
            x, dlp, dvar = _em_step(dynamics, t, t_next, x, generator, track)
        elif scheme in ("split-heun", "split-exp-heun"):
            x, dlp, dvar = dynamics.split_step(t, t_next, x, generator, track, scheme)
        else:
            x, dlp, dvar = _kernel_step(dynamics, t, t_next, x, generator, scheme, track)
        if track:
            lp = lp + dlp
            if dvar is not None:
                var = var + dvar
            path.append(lp.clone())
        if callback is not None:
            callback(StepInfo(i + 1, t_next, x, lp))
    return Solution(x=x, logp=lp, ts=ts.clone(), logp_path=torch.stack(path) if track else None, steps=len(ts) - 1, logp_var=var)
