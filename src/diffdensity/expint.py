r"""Exponential integrators: Runge-Kutta in the variables that make the PF-ODE's linear part exact.

With ``s = (alpha x0^ - x) / sigma^2`` (``x0^`` the model's data prediction) the PF-ODE
drift is ``u = (sigma'/sigma) x - (1/2) g^2 alpha x0^ / sigma^2`` (because
``f + g^2 / (2 sigma^2) = sigma'/sigma``). In ``y = x / sigma`` and ``mu = alpha / sigma =
exp(lambda / 2)`` (``mu' = d mu / dt = -(1/2) g^2 alpha / sigma^3``) it becomes

    dy/dmu = x0^(x, t),

so a step that holds ``x0^`` fixed moves the noise part of ``x`` exactly as
``sigma_t / sigma_s`` -- the DDIM step. Near the data end that part decays like ``sigma``
and carries most of the log-density: Heun in ``t`` gets its factor wrong by ``O(h^3)`` per
step in each of the ``D`` directions, a relative error of the noise that costs about
``D`` times as many nats, always in the same direction (docs/sampling.md). Heun in
``mu`` is exact there.

Any dynamics ``dx/dt = u``, ``d log p / dt = r`` is integrated the same way,
``F = dy/dmu = (u - (sigma'/sigma) x) / (sigma mu')``, and the log-density as
``log p_t(x) = log p^y(y) - D log sigma_t`` with
``d log p^y / dmu = (r + D sigma'/sigma) / mu'``: the ``-D log sigma`` part is added in
closed form, only the divergence part is integrated. For the PF-ODE ``F = x0^``; for
other drifts (density guidance, HD, custom) it is still a consistent second-order
method that is exact for the linear part ``(sigma'/sigma) x``.

=====================  ========================================  ==============
name                   step                                      passes per step
=====================  ========================================  ==============
``"exp-euler"``        ``y' = y + dmu F(t, x)`` (DDIM)           1
``"exp-heun"``         trapezoid in ``mu`` (2nd order)           2
``"exp-2m"``           two-step: ``F`` linear in lambda through   1 (+1 at the end
                       this and the last point (DPM-Solver++      when tracking)
                       2M); ``log p`` by the trapezoid rule over
                       the visited points
=====================  ========================================  ==============
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .solvers import TABLEAUX, Solution, StepInfo, odeint

__all__ = ["EXPONENTIAL_SOLVERS", "ODE_SOLVERS", "exp_odeint", "exp_step", "integrate_ode"]

EXPONENTIAL_SOLVERS = ("exp-heun", "exp-2m", "exp-euler")
"""Fixed-step ODE solvers in the ``(mu, y)`` variables (need the schedule)."""

_ONE_STEP = ("exp-heun", "exp-euler")  # exp_step's: a multistep solver needs the previous point

ODE_SOLVERS = (*EXPONENTIAL_SOLVERS, *TABLEAUX)
"""Every name :func:`integrate_ode` accepts: the exponential solvers, then the Runge-Kutta tableaux."""


class _Frame:
    """``sigma``, ``sigma'/sigma`` and ``mu = alpha/sigma``, ``mu'`` at one time (floats)."""

    def __init__(self, schedule, t: float):
        sv = schedule(torch.tensor(t, dtype=torch.float64))
        self.t = t
        self.sigma = float(sv.sigma)
        self.dlog_sigma = float(sv.d_sigma / sv.sigma)
        self.lam = float(schedule.log_snr(torch.tensor(t, dtype=torch.float64)))
        self.mu = math.exp(0.5 * self.lam)
        self.dmu = -0.5 * float(sv.g2) * self.mu / self.sigma**2

    def field(self, u: Tensor, x: Tensor) -> Tensor:
        """``dy/dmu`` from ``dx/dt``, float64."""
        return (u.to(torch.float64) - self.dlog_sigma * x.to(torch.float64)) / (self.sigma * self.dmu)

    def density_rate(self, r: Tensor, dim: int) -> Tensor:
        """``d log p^y / d lambda`` from ``d log p_t(x_t) / dt`` (``d mu / d lambda = mu / 2``)."""
        return 0.5 * self.mu * (r.to(torch.float64) + dim * self.dlog_sigma) / self.dmu


def _eval(func, t: float, x: Tensor):
    """``(u, rate, rate_var)`` from dynamics returning ``(u, rate)`` or ``(u, rate, rate_var)``."""
    out = func(torch.tensor(t, dtype=torch.float64), x)
    return out[0], out[1], (out[2] if len(out) > 2 else None)


def _step(func, schedule, method: str, t0: float, t1: float, x: Tensor, track: bool, log_density: bool = True):
    """One step from ``t0`` to ``t1``: ``(x', d logp or None, its Hutchinson variance or None)``.

    Rates may be ``(B,)`` or per-probe ``(P, B)`` (then the increment's variance is
    ``var_p / P``); a third output of the dynamics is the variance of a ``(B,)`` rate.
    ``log_density=False``: the rate is any scalar's ``d/dt`` (no ``-D log sigma`` part).
    """
    a, b = _Frame(schedule, t0), _Frame(schedule, t1)
    dmu, dlam = b.mu - a.mu, b.lam - a.lam
    dim = math.prod(x.shape[1:]) if log_density else 0
    y = x.to(torch.float64) / a.sigma
    u1, r1, v1 = _eval(func, t0, x)
    f1 = a.field(u1, x)
    y_new = y + dmu * f1
    weights, rates, rvars = [dlam], [r1], [v1]
    if method == "exp-heun":
        x_pred = (b.sigma * y_new).to(x.dtype)
        u2, r2, v2 = _eval(func, t1, x_pred)
        w1 = b.mu - 2 * dmu / dlam  # exact weights of F linear in lambda against dmu = (mu/2) dlambda
        y_new = y + (dmu - w1) * f1 + w1 * b.field(u2, x_pred)
        weights, rates, rvars = [0.5 * dlam, 0.5 * dlam], [r1, r2], [v1, v2]
    x_new = (b.sigma * y_new).to(x.dtype)
    if not track:
        return x_new, None, None
    frames = (a, b)
    dlogp = sum(w * frames[i].density_rate(r, dim) for i, (w, r) in enumerate(zip(weights, rates)))
    var = None
    if dlogp.ndim == 2:
        var = dlogp.var(0) / dlogp.shape[0] if dlogp.shape[0] > 1 else None
        dlogp = dlogp.mean(0)
    elif all(v is not None for v in rvars):
        var = sum((w * 0.5 * frames[i].mu / frames[i].dmu) ** 2 * v for i, (w, v) in enumerate(zip(weights, rvars)))
    return x_new, dlogp - dim * math.log(b.sigma / a.sigma), var


def exp_step(func, schedule, t0: float, t1: float, x: Tensor, *, method: str = "exp-heun", track: bool = True):
    """One step of a one-step exponential solver from ``t0`` to ``t1``: ``(x', d logp or None, its variance or None)``."""
    if method not in _ONE_STEP:
        raise ValueError(f"unknown one-step exponential solver {method!r}; expected one of {_ONE_STEP}")
    return _step(func, schedule, method, float(t0), float(t1), x, track)


def exp_odeint(
    func: Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]],
    x: Tensor,
    ts: Tensor,
    schedule,
    *,
    logp: Tensor | None = None,
    method: str = "exp-heun",
    callback: Callable[[StepInfo], None] | None = None,
    begin_step: Callable[[], None] | None = None,
    log_density: bool = True,
) -> Solution:
    """Integrate ``dx/dt, dlogp/dt = func(t, x)`` through the fixed grid ``ts`` ``(S + 1,)`` in the ``(mu, y)`` variables.

    ``func`` is any deterministic dynamics of :mod:`diffdensity.dynamics` (rate ``None``
    when not tracking); ``schedule`` the model's. ``logp``: float64 ``(B,)`` at
    ``ts[0]`` or ``None``. ``ts`` may run either way (sampling: decreasing). Every
    stage of a step shares the step's probes (``begin_step`` before each step).
    Returns a :class:`~diffdensity.solvers.Solution` with the log-density path and
    ``logp_var``, the Hutchinson variance of ``logp`` where the rates carry it (per-probe
    rates ``(P, B)`` with ``P >= 2``, or ``(u, rate, rate_var)`` dynamics), else ``None``.
    """
    if method not in EXPONENTIAL_SOLVERS:
        raise ValueError(f"unknown exponential solver {method!r}; expected one of {EXPONENTIAL_SOLVERS}")
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    if ts.numel() < 2:
        raise ValueError("ts needs at least two time points")
    if not torch.isfinite(x).all():
        raise ValueError("initial state x contains NaN or Inf")
    lp = None if logp is None else logp.to(torch.float64).clone()
    path = [] if lp is None else [lp.clone()]
    var = None
    if callback is not None:
        callback(StepInfo(0, float(ts[0]), x, lp))
    if method == "exp-2m":
        return _multistep(func, schedule, x, ts, lp, path, callback, begin_step, log_density)
    for i in range(len(ts) - 1):
        if begin_step is not None:
            begin_step()
        x, dlp, dvar = _step(func, schedule, method, float(ts[i]), float(ts[i + 1]), x, lp is not None, log_density)
        if lp is not None:
            lp = lp + dlp
            path.append(lp.clone())
            if dvar is not None:
                var = dvar if var is None else var + dvar
        if callback is not None:
            callback(StepInfo(i + 1, float(ts[i + 1]), x, lp))
    return Solution(x=x, logp=lp, ts=ts.clone(), logp_path=torch.stack(path) if path else None, steps=len(ts) - 1, logp_var=var)


def integrate_ode(func, x: Tensor, ts: Tensor, *, method: str, schedule, fsal: bool = True, rtol: float = 1e-5, atol: float = 1e-5, **kwargs) -> Solution:
    """One entry point for every ODE solver name of :data:`ODE_SOLVERS`.

    Exponential solvers go to :func:`exp_odeint` (with ``schedule``), Runge-Kutta
    tableaux to :func:`diffdensity.solvers.odeint` (with ``fsal``, ``rtol``, ``atol``);
    ``kwargs`` (``logp``, ``callback``, ``begin_step``) go to both.
    """
    if method in EXPONENTIAL_SOLVERS:
        return exp_odeint(func, x, ts, schedule, method=method, **kwargs)
    if method not in TABLEAUX:
        raise ValueError(f"unknown ODE solver {method!r}; expected one of {ODE_SOLVERS}")
    return odeint(func, x, ts, method=method, fsal=fsal, rtol=rtol, atol=atol, **kwargs)


def _multistep(func, schedule, x: Tensor, ts: Tensor, lp, path: list, callback, begin_step, log_density: bool) -> Solution:
    """``"exp-2m"``: one evaluation per step, ``F`` extrapolated linearly in lambda from the
    last two points (the first step is exp-euler, as in DPM-Solver++ 2M); the log-density
    rate is integrated by the trapezoid rule over the points the solver visits, so the
    last point is evaluated once more when tracking. The rate at point ``k`` enters with
    weight ``(lambda_{k+1} - lambda_{k-1}) / 2``, and its variance with that weight squared."""
    dim = math.prod(x.shape[1:]) if log_density else 0
    track, n = lp is not None, len(ts) - 1
    frames = [_Frame(schedule, float(t)) for t in ts]
    lam = [fr.lam for fr in frames]
    prev_f, last_rho, var_terms = None, None, []
    for i in range(n + 1 if track else n):
        if begin_step is not None:
            begin_step()
        a = frames[i]
        u, r, v = _eval(func, a.t, x)
        if track:
            rho = a.density_rate(r, dim)
            rvar = None if v is None else (0.5 * a.mu / a.dmu) ** 2 * v
            if rho.ndim == 2:  # per-probe rates: their spread
                rvar = rho.var(0) / rho.shape[0] if rho.shape[0] > 1 else None
                rho = rho.mean(0)
            w = 0.5 * (lam[min(i + 1, n)] - lam[max(i - 1, 0)])
            var_terms.append(None if rvar is None else w * w * rvar)
            if last_rho is not None:
                lp = lp + 0.5 * (lam[i] - lam[i - 1]) * (last_rho + rho) - dim * math.log(a.sigma / frames[i - 1].sigma)
                path.append(lp.clone())
            last_rho = rho
        if i > 0 and callback is not None:
            callback(StepInfo(i, a.t, x, lp))
        if i == n:
            break
        b = frames[i + 1]
        f = a.field(u, x)
        y = x.to(torch.float64) / a.sigma + (b.mu - a.mu) * f
        if prev_f is not None:  # F linear in lambda through the last two points, exact weights
            h, h_last = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            y = y + (h * b.mu - 2 * (b.mu - a.mu)) * (f - prev_f) / h_last
        prev_f = f
        x = (b.sigma * y).to(x.dtype)
    if not track and callback is not None:
        callback(StepInfo(n, float(ts[-1]), x, None))
    var = sum(var_terms) if var_terms and all(t is not None for t in var_terms) else None
    return Solution(x=x, logp=lp, ts=ts.clone(), logp_path=torch.stack(path) if path else None, steps=n, logp_var=var)
