"""Explicit Runge-Kutta integration of the augmented state ``(x, log p)``.

The log-density is a passenger: its rate depends on ``x`` but never feeds back, so
only ``x`` needs stage values; the log-density increments are accumulated in float64
with the same weights. One generic stepper serves every Butcher tableau: fixed-step
Euler (order 1), Heun (2), RK4 (4), and the adaptive embedded pairs Bogacki-Shampine
3(2) and Dormand-Prince 5(4) with error control on ``x`` and, optionally, ``log p``.

Our own implementation rather than torchdiffeq: the state mixes dtypes (``x`` in the
model's dtype, ``log p`` in float64), stages of one step must share Hutchinson probes
while consecutive steps draw fresh ones, and every pass must be counted. That is about
150 lines here, against flattening the state to one dtype and patching the library.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

__all__ = ["Tableau", "TABLEAUX", "Solution", "StepInfo", "odeint", "check_state", "is_adaptive"]


class ODEFunc(Protocol):
    def __call__(self, t: Tensor, x: Tensor) -> tuple: ...  # (u, rate) or (u, rate, rate_var)


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method; ``b_err`` (the embedded weights minus ``b``) if adaptive."""

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...] | None = None
    fsal: bool = False

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None


def _dopri5() -> Tableau:
    b = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
    b4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
    return Tableau(
        "dopri5",
        5,
        (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        (
            (),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            b[:6],
        ),
        b,
        tuple(x - y for x, y in zip(b4, b)),
        fsal=True,
    )


def _bosh3() -> Tableau:
    b = (2 / 9, 1 / 3, 4 / 9, 0.0)
    b2 = (7 / 24, 1 / 4, 1 / 3, 1 / 8)
    return Tableau(
        "bosh3",
        3,
        (0.0, 1 / 2, 3 / 4, 1.0),
        ((), (1 / 2,), (0.0, 3 / 4), b[:3]),
        b,
        tuple(x - y for x, y in zip(b2, b)),
        fsal=True,
    )


TABLEAUX: dict[str, Tableau] = {
    "euler": Tableau("euler", 1, (0.0,), ((),), (1.0,)),
    "heun": Tableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "midpoint": Tableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "rk4": Tableau("rk4", 4, (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
    "bosh3": _bosh3(),
    "dopri5": _dopri5(),
}


def is_adaptive(solver) -> bool:
    """Whether ``solver`` names an embedded Runge-Kutta pair, which chooses its own steps."""
    return isinstance(solver, str) and solver in TABLEAUX and TABLEAUX[solver].adaptive


@dataclass
class StepInfo:
    """Passed to callbacks: once with the initial state (``step=0``), then after every accepted step."""

    step: int
    t: float
    x: Tensor
    logp: Tensor | None


@dataclass
class Solution:
    """Final state plus the accepted time points and log-density path.

    ``logp_var``: float64 ``(B,)`` estimated variance of the Hutchinson part of the
    accumulated ``logp`` (``None`` when the rates carry no per-probe values, e.g. the
    exact divergence or a single probe). ``logp_error``: float64 ``(B,)`` the sum of the
    embedded pair's local error estimates of ``logp`` over the accepted steps (adaptive
    solvers only, else ``None``): the discretisation error of the embedded lower-order
    solution, an estimate (usually an overestimate) of the error of ``logp``.
    """

    x: Tensor
    logp: Tensor | None
    ts: Tensor  # (S + 1,) float64 accepted times
    logp_path: Tensor | None  # (S + 1, B) float64
    steps: int
    rejected: int = 0
    stats: dict = field(default_factory=dict)
    logp_var: Tensor | None = None
    logp_error: Tensor | None = None


def _combine(x: Tensor, h: float, ks: list[Tensor], coeffs: tuple[float, ...]) -> Tensor:
    out = x
    for coef, k in zip(coeffs, ks):
        if coef != 0.0:
            out = out + (h * coef) * k
    return out


def _weighted(h: float, coeffs: tuple[float, ...], rates: list[Tensor | None]) -> Tensor | None:
    """``sum_i h c_i r_i`` over the stage rates (``None`` if the log-density is not tracked)."""
    if rates[0] is None:
        return None
    return sum(h * c * r for c, r in zip(coeffs, rates) if c != 0.0)


def check_state(value: Tensor, what: str, t: float, hint: str) -> None:
    """Raise ``FloatingPointError`` naming ``t`` and the samples where ``value`` is not finite."""
    bad = ~torch.isfinite(value).reshape(value.shape[0], -1).all(1) if value.ndim else ~torch.isfinite(value)[None]
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "")
        raise FloatingPointError(f"{what} is NaN or Inf at t={t:.6g} for {len(idx)} of {bad.numel()} samples (indices {shown}); {hint}")


_RATE_HINT = "the dynamics (the model's output or its divergence) returned it: check the model and the inputs, more steps will not help"
_STATE_HINT = "the state overflowed: take more steps or a tighter rtol/atol, or check that the inputs are on the model's scale"


def _rk_step(func: ODEFunc, tab: Tableau, t: float, x: Tensor, h: float, k0=None):
    """One step: returns ``(x_new, dlogp, kx, klp)`` with stage derivatives.

    Rates may be float64 ``(B,)`` or per-probe ``(P, B)``; ``dlogp`` has their shape.
    """
    kx: list[Tensor] = []
    klp: list[Tensor | None] = []
    for i, ci in enumerate(tab.c):
        if i == 0 and k0 is not None:
            u, r = k0
        else:
            xi = _combine(x, h, kx, tab.a[i]) if i else x
            out = func(torch.tensor(t + ci * h, dtype=torch.float64), xi)
            u, r = out[0], out[1]
            check_state(u, "dx/dt", t + ci * h, _RATE_HINT)
            if r is not None:
                check_state(r.reshape(-1, r.shape[-1]).T, "the log-density rate", t + ci * h, _RATE_HINT)
                r = r if len(out) == 2 else _RateWithVar(r, out[2])
        kx.append(u)
        klp.append(r)
    x_new = _combine(x, h, kx, tab.b)
    check_state(x_new, "the state x", t + h, _STATE_HINT)
    plain, var = _weighted_var(h, tab.b, klp)
    dlp = _weighted(h, tab.b, plain)
    return x_new, (dlp if var is None else (dlp, var)), kx, plain if var is None else klp


class _RateWithVar:
    """A rate ``(B,)`` with its variance ``(B,)``, from dynamics returning ``(u, rate, rate_var)``."""

    def __init__(self, rate: Tensor, var: Tensor | None):
        self.rate, self.var = rate, var


def _weighted_var(h: float, coeffs: tuple[float, ...], rates: list) -> tuple[list, Tensor | None]:
    """The plain rates and ``sum_i (h c_i)^2 var_i`` (independent stages) where variances were given."""
    plain = [r.rate if isinstance(r, _RateWithVar) else r for r in rates]
    if not rates or not all(isinstance(r, _RateWithVar) and r.var is not None for r in rates):
        return plain, None
    return plain, sum((h * c) ** 2 * r.var for c, r in zip(coeffs, rates) if c != 0.0)


class _LogDensity:
    """The accumulated ``log p`` ``(B,)`` and, from per-probe rates ``(P, B)``, its Hutchinson variance.

    With probes independent across steps (fresh every step or stage) the per-probe
    increments of a step are ``P`` i.i.d. draws, so the variance of their mean is
    ``var_p(d) / P`` and the step variances add up; with probes fixed for the solve,
    the variance comes from the ``P`` per-probe totals at the end.
    """

    def __init__(self, logp: Tensor | None, independent_steps: bool):
        self.value = None if logp is None else logp.to(torch.float64).clone()
        self.independent = independent_steps
        self.var: Tensor | None = None
        self.totals: Tensor | None = None
        self.error: Tensor | None = None

    def add(self, dlp, err: Tensor | None = None) -> None:
        if dlp is None:
            return
        if isinstance(dlp, tuple):  # (increment, its variance) from rates with variances
            dlp, step_var = dlp
            self.var = step_var if self.var is None else self.var + step_var
        mean = dlp.mean(0) if dlp.ndim == 2 else dlp
        self.value = mean if self.value is None else self.value + mean
        if err is not None:
            err = err.mean(0) if err.ndim == 2 else err
            self.error = err if self.error is None else self.error + err
        if dlp.ndim == 2 and dlp.shape[0] > 1:
            self.totals = dlp if self.totals is None else self.totals + dlp
            step_var = dlp.var(0) / dlp.shape[0]
            self.var = step_var if self.var is None else self.var + step_var

    def variance(self) -> Tensor | None:
        if self.totals is None or self.independent:
            return self.var
        return self.totals.var(0) / self.totals.shape[0]


def _check_tolerances(rtol, atol) -> None:
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0 or not math.isfinite(tol):
            raise ValueError(f"{name} must be a finite positive number, got {tol!r}")


def odeint(
    func: ODEFunc,
    x: Tensor,
    ts: Tensor,
    *,
    logp: Tensor | None = None,
    method: str = "heun",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 100_000,
    callback: Callable[[StepInfo], None] | None = None,
    begin_step: Callable[[], None] | None = None,
    fsal: bool = True,
    control: str = "both",
    independent_steps: bool = True,
) -> Solution:
    """Integrate ``dx/dt, dlogp/dt = func(t, x)`` along the time grid ``ts``.

    Fixed-step methods step exactly through ``ts`` (``(S + 1,)``, monotone, either
    direction). Adaptive methods (``"bosh3"``, ``"dopri5"``) integrate from ``ts[0]``
    to ``ts[-1]`` choosing their own steps; the first step size is ``ts[1] - ts[0]``.
    ``logp`` is the float64 ``(B,)`` initial log-density (``None``: not tracked; a zero
    start is used if ``func`` returns a rate). The variance of a noisy rate (Hutchinson)
    is carried in one of two ways, and summed into ``Solution.logp_var``: ``func``
    returns ``(u, rate, rate_var)`` with ``rate_var`` float64 ``(B,)`` the variance of
    ``rate``, independent from call to call (fresh probes at every stage): a step adds
    ``sum_i (h b_i)^2 rate_var_i``; or ``func`` returns per-probe rates ``(P, B)``
    (``P`` independent estimates, ``P >= 2``): ``logp`` follows their mean and a step adds
    ``var_p(d_p) / P`` of the per-probe increments (``independent_steps=False``, probes
    fixed for the solve: the spread of the per-probe totals instead).
    ``control``: the adaptive error norm covers ``"x"`` only (Hutchinson noise in the
    rate kept out of step control) or ``"both"`` ``x`` and ``log p``. ``begin_step`` is
    called before each step attempt; ``fsal=False`` disables reusing the last stage of a
    step as the first of the next (needed when evaluations depend on the step).
    Non-finite values raise ``FloatingPointError`` naming the time and the samples.
    """
    if method not in TABLEAUX:
        raise ValueError(f"unknown solver {method!r}; expected one of {sorted(TABLEAUX)}")
    if control not in ("x", "both"):
        raise ValueError(f"unknown control {control!r}; expected 'x' or 'both'")
    _check_tolerances(rtol, atol)
    tab = TABLEAUX[method]
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    if ts.numel() < 2:
        raise ValueError("ts needs at least two time points")
    if not torch.isfinite(x).all():
        raise ValueError("initial state x contains NaN or Inf")
    acc = _LogDensity(logp, independent_steps)
    times, path = [float(ts[0])], []

    def record(step, t, x):
        if acc.value is not None:
            path.append(acc.value.clone())
        if callback is not None:
            callback(StepInfo(step, t, x, acc.value))

    record(0, float(ts[0]), x)
    if not tab.adaptive:
        for i in range(len(ts) - 1):
            t0, t1 = float(ts[i]), float(ts[i + 1])
            if begin_step is not None:
                begin_step()
            x, dlp, _, _ = _rk_step(func, tab, t0, x, t1 - t0)
            acc.add(dlp)
            times.append(t1)
            record(i + 1, t1, x)
        steps, rejected = len(ts) - 1, 0
    else:
        x, steps, rejected = _adaptive(func, tab, x, ts, acc, record, times, rtol, atol, max_steps, begin_step, fsal, control)
    return Solution(
        x=x,
        logp=acc.value,
        ts=torch.tensor(times, dtype=torch.float64),
        logp_path=torch.stack(path) if path else None,
        steps=steps,
        rejected=rejected,
        logp_var=acc.variance(),
        logp_error=acc.error,
    )


def _adaptive(func, tab, x, ts, acc, record, times, rtol, atol, max_steps, begin_step, fsal, control):
    """The step-size controlled loop of :func:`odeint`; returns ``(x, accepted, rejected)``."""
    t, t_end = float(ts[0]), float(ts[-1])
    direction = 1.0 if t_end > t else -1.0
    h = float(ts[1] - ts[0])
    k0, steps, rejected = None, 0, 0
    err_exp = -1.0 / tab.order
    while direction * (t_end - t) > 1e-12 * max(1.0, abs(t_end)):
        if steps + rejected >= max_steps:
            raise RuntimeError(f"{tab.name}: more than {max_steps} steps; loosen rtol/atol")
        if direction * (t + h - t_end) > 0:
            h = t_end - t
        if begin_step is not None:
            begin_step()
        x_new, dlp, kx, klp = _rk_step(func, tab, t, x, h, k0)
        ex = _combine(torch.zeros_like(x), h, kx, tab.b_err)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err = (ex / scale).to(torch.float64).square().mean().sqrt()
        elp = _weighted(h, tab.b_err, _weighted_var(h, tab.b_err, klp)[0])
        mean_dlp = dlp[0] if isinstance(dlp, tuple) else dlp
        if mean_dlp is not None and control == "both":
            base = torch.zeros(mean_dlp.shape[-1], dtype=torch.float64, device=mean_dlp.device) if acc.value is None else acc.value
            mean_dlp, mean_elp = (mean_dlp.mean(0), elp.mean(0)) if mean_dlp.ndim == 2 else (mean_dlp, elp)
            lp_scale = atol + rtol * torch.maximum(base.abs(), (base + mean_dlp).abs())
            err = torch.maximum(err, (mean_elp / lp_scale).abs().max())
        err = float(err)
        if err <= 1.0:
            t, x = t + h, x_new
            acc.add(dlp, elp)
            steps += 1
            k0 = (kx[-1], klp[-1]) if (tab.fsal and fsal) else None
            times.append(t)
            record(steps, t, x)
        else:
            rejected += 1  # the first stage at (t, x) stays valid for the retry
            k0 = (kx[0], klp[0]) if fsal else None
        factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err**err_exp))
        h *= factor
    return x, steps, rejected
