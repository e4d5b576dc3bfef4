"""Explicit Runge-Kutta integration of the augmented state ``(x, log p)``.

The log-density is a passenger: its rate depends on ``x`` but never feeds back, so
only ``x`` needs stage values; the log-density increments are accumulated in float64
with the same weights. One generic stepper serves every Butcher tableau: fixed-step
Euler (order 1), Heun (2), RK4 (4), and the adaptive embedded pairs Bogacki-Shampine
3(2) and Dormand-Prince 5(4) with error control on both ``x`` and ``log p``.

Our own implementation rather than torchdiffeq: the state mixes dtypes (``x`` in the
model's dtype, ``log p`` in float64), stages of one step must share Hutchinson probes
while consecutive steps draw fresh ones, and every pass must be counted. That is about
150 lines here, against flattening the state to one dtype and patching the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

__all__ = ["Tableau", "TABLEAUX", "Solution", "StepInfo", "odeint"]


class ODEFunc(Protocol):
    def __call__(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]: ...


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


@dataclass
class StepInfo:
    """Passed to callbacks: once with the initial state (``step=0``), then after every accepted step."""

    step: int
    t: float
    x: Tensor
    logp: Tensor | None


@dataclass
class Solution:
    """Final state plus the accepted time points and log-density path."""

    x: Tensor
    logp: Tensor | None
    ts: Tensor  # (S + 1,) float64 accepted times
    logp_path: Tensor | None  # (S + 1, B) float64
    steps: int
    rejected: int = 0
    stats: dict = field(default_factory=dict)


def _combine(x: Tensor, h: float, ks: list[Tensor], coeffs: tuple[float, ...]) -> Tensor:
    out = x
    for coef, k in zip(coeffs, ks):
        if coef != 0.0:
            out = out + (h * coef) * k
    return out


def _rk_step(func: ODEFunc, tab: Tableau, t: float, x: Tensor, h: float, k0=None):
    """One step: returns ``(x_new, dlogp, kx, klp)`` with stage derivatives."""
    kx: list[Tensor] = []
    klp: list[Tensor | None] = []
    for i, ci in enumerate(tab.c):
        if i == 0 and k0 is not None:
            u, r = k0
        else:
            xi = _combine(x, h, kx, tab.a[i]) if i else x
            u, r = func(torch.tensor(t + ci * h, dtype=torch.float64), xi)
        kx.append(u)
        klp.append(r)
    x_new = _combine(x, h, kx, tab.b)
    dlogp = None
    if klp[0] is not None:
        dlogp = sum(h * bi * r for bi, r in zip(tab.b, klp) if bi != 0.0)
    return x_new, dlogp, kx, klp


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
) -> Solution:
    """Integrate ``dx/dt, dlogp/dt = func(t, x)`` along the time grid ``ts``.

    Fixed-step methods step exactly through ``ts`` (``(S + 1,)``, monotone, either
    direction). Adaptive methods (``"bosh3"``, ``"dopri5"``) integrate from ``ts[0]``
    to ``ts[-1]`` choosing their own steps; the first step size is ``ts[1] - ts[0]``.
    ``logp`` is the float64 ``(B,)`` initial log-density (``None``: not tracked; a zero
    start is used if ``func`` returns a rate). ``begin_step`` is called before each step
    attempt; ``fsal=False`` disables reusing the last stage of a step as the first of
    the next (needed when evaluations depend on the step, e.g. fresh probes).
    """
    if method not in TABLEAUX:
        raise ValueError(f"unknown solver {method!r}; expected one of {sorted(TABLEAUX)}")
    tab = TABLEAUX[method]
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    if ts.numel() < 2:
        raise ValueError("ts needs at least two time points")
    if not torch.isfinite(x).all():
        raise ValueError("initial state x contains NaN or Inf")
    lp = None if logp is None else logp.to(torch.float64).clone()
    times, path = [float(ts[0])], []

    def record(step, t, x, lp):
        if lp is not None:
            path.append(lp.clone())
        if callback is not None:
            callback(StepInfo(step, t, x, lp))

    def add(lp, dlp):
        if dlp is None:
            return lp
        return dlp if lp is None else lp + dlp

    record(0, float(ts[0]), x, lp)
    rejected = 0
    if not tab.adaptive:
        for i in range(len(ts) - 1):
            t0, t1 = float(ts[i]), float(ts[i + 1])
            if begin_step is not None:
                begin_step()
            x, dlp, _, _ = _rk_step(func, tab, t0, x, t1 - t0)
            lp = add(lp, dlp)
            times.append(t1)
            record(i + 1, t1, x, lp)
        steps = len(ts) - 1
    else:
        t, t_end = float(ts[0]), float(ts[-1])
        direction = 1.0 if t_end > t else -1.0
        h = float(ts[1] - ts[0])
        k0, steps = None, 0
        err_exp = -1.0 / tab.order
        while direction * (t_end - t) > 1e-12 * max(1.0, abs(t_end)):
            if steps + rejected >= max_steps:
                raise RuntimeError(f"{method}: more than {max_steps} steps; loosen rtol/atol")
            if direction * (t + h - t_end) > 0:
                h = t_end - t
            if begin_step is not None:
                begin_step()
            x_new, dlp, kx, klp = _rk_step(func, tab, t, x, h, k0)
            ex = _combine(torch.zeros_like(x), h, kx, tab.b_err)
            scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
            err = (ex / scale).to(torch.float64).square().mean().sqrt()
            if dlp is not None:
                elp = sum(h * be * r for be, r in zip(tab.b_err, klp) if be != 0.0)
                base = torch.zeros_like(dlp) if lp is None else lp
                lp_scale = atol + rtol * torch.maximum(base.abs(), (base + dlp).abs())
                err = torch.maximum(err, (elp / lp_scale).abs().max())
            err = float(err)
            if err != err:  # NaN
                raise FloatingPointError(f"{method}: non-finite state at t={t:g}")
            if err <= 1.0:
                t, x, lp = t + h, x_new, add(lp, dlp)
                steps += 1
                k0 = (kx[-1], klp[-1]) if (tab.fsal and fsal) else None
                times.append(t)
                record(steps, t, x, lp)
            else:
                rejected += 1  # the first stage at (t, x) stays valid for the retry
                k0 = (kx[0], klp[0]) if fsal else None
            factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err**err_exp))
            h *= factor
    return Solution(
        x=x,
        logp=lp,
        ts=torch.tensor(times, dtype=torch.float64),
        logp_path=torch.stack(path) if path else None,
        steps=steps,
        rejected=rejected,
    )
