r"""The mode-tracking ODE: follow the mode of the denoising distribution (docs/math.md s.4e).

Fix ``x_t`` at time ``t``. For ``s`` in ``[t_min, t]`` let ``y_s`` be the mode of

    p(x_s | x_t)  propto  p_s(y) N(x_t; a y, c I),   a = alpha_t / alpha_s,
                                                     c = sigma_t^2 - a^2 sigma_s^2.

Differentiating the stationarity condition ``F(y, s) = s_s(y) + (a / c)(x_t - a y) = 0``
in ``s`` -- with ``d s_s / ds`` from the Fokker-Planck equation and
``da/ds = -a f``, ``dc/ds = -a^2 g^2`` -- every ``x_t`` term cancels and

    dy/ds = f y - g^2 s_s(y) - (1/2) g^2 H^-1 grad(div s_s)(y),
    H = grad s_s(y) - (a^2 / c) I                      (negative definite at the mode).

At ``s = t`` (``c = 0``) the correction vanishes and ``y = x_t``. For Gaussian data
``div s`` is constant and this is the high-density ODE ``u = f x - g^2 s``
(:class:`~diffdensity.dynamics.HDODE`). The linear system is solved matrix-free:
``H^-1 v = -c M^-1 v`` with ``M = a^2 I - c grad s`` (positive definite at the mode),
by batched conjugate gradients on Hessian-vector products of the score (reverse mode,
one pass per iteration on the graph of a single score evaluation). ``grad(div s)``
needs third derivatives of ``log p``: from ``model.laplacian`` (exact for
:class:`~diffdensity.analytic.GaussianMixture`) differentiated by autograd, or from the
exact divergence built from ``D`` double-backward passes (small networks).

The mode followed is a *local* one, continuously in ``s``; the global mode of the
denoising distribution can jump. Where the local mode disappears (``M`` stops being
positive definite) the conjugate-gradient solve stops early and this is counted in
``stats["indefinite"]``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import _validation as v
from .dynamics import Dynamics, _expand
from .models import NFE, Model
from .solvers import TABLEAUX, StepInfo, odeint
from ._repr import short_repr

__all__ = ["ModeTrackingODE", "ModeTrackingResult", "mode_tracking", "conjugate_gradient", "LAPLACIANS"]

LAPLACIANS = ("auto", "model", "exact")


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    rtol: float = 1e-6,
    max_iter: int = 100,
) -> tuple[Tensor, dict]:
    """Solve ``M w = b`` per sample for symmetric positive definite ``M`` (batched, matrix-free).

    ``b`` is ``(B, *shape)``; ``matvec`` applies ``M`` sample by sample to a tensor of that
    shape. Stops a sample when ``|r| <= rtol |b|`` or when ``p^T M p <= 0`` (not positive
    definite: counted in ``info["indefinite"]``). Returns ``(w, info)`` with
    ``info = {"iterations", "residual" (B,), "indefinite" (B,) bool}``.
    """
    batch = b.shape[0]
    view = (-1,) + (1,) * (b.ndim - 1)

    def dot(p: Tensor, q: Tensor) -> Tensor:
        return (p * q).reshape(batch, -1).sum(1)

    w = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = dot(r, r)
    b_norm = rs.sqrt()
    done = rs.sqrt() <= rtol * b_norm
    indefinite = torch.zeros_like(done)
    it = 0
    while it < max_iter and not bool(done.all()):
        it += 1
        mp = matvec(p)
        pmp = dot(p, mp)
        bad = (pmp <= 0) & ~done
        indefinite |= bad
        done = done | bad
        alpha = torch.where(done, torch.zeros_like(rs), rs / torch.where(done, torch.ones_like(pmp), pmp))
        w = w + alpha.reshape(view) * p
        r = r - alpha.reshape(view) * mp
        rs_new = dot(r, r)
        done = done | (rs_new.sqrt() <= rtol * b_norm)
        beta = torch.where(done, torch.zeros_like(rs), rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)))
        p = r + beta.reshape(view) * p
        rs = rs_new
    residual = rs.sqrt() / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    return w, dict(iterations=it, residual=residual, indefinite=indefinite)


class ModeTrackingODE(Dynamics):
    """``dy/ds`` of the mode of ``p(x_s | x_t)`` (docs/math.md s.4e), anchored with :meth:`anchor`.

    ``laplacian``: ``"model"`` uses ``model.laplacian(y, s)`` (differentiable, e.g. the
    exact mixture), ``"exact"`` builds ``div s`` from ``D`` double-backward passes,
    ``"auto"`` picks ``"model"`` when available (and no conditioning is passed).
    ``cg_rtol`` / ``cg_max_iter`` control the conjugate-gradient solves (default cap
    ``min(2 D, 1000)``). The rate returned with the drift is ``None``: the path is a
    sequence of modes, not a sample, and its density is best evaluated directly.

    ``stats`` accumulates ``cg_iterations``, ``cg_max_residual`` and ``indefinite``.
    """

    def __init__(
        self,
        model: Model,
        *,
        laplacian: str = "auto",
        cg_rtol: float = 1e-8,
        cg_max_iter: int | None = None,
        cond: dict[str, Any] | None = None,
        nfe: NFE | None = None,
    ):
        super().__init__(model, cond=cond, nfe=nfe)
        v.check_choice(laplacian, "laplacian", LAPLACIANS)
        has_laplacian = callable(getattr(model, "laplacian", None))
        if laplacian == "auto":
            laplacian = "model" if (has_laplacian and not self.cond) else "exact"
        if laplacian == "model" and not has_laplacian:
            raise ValueError(f"laplacian='model' needs model.laplacian(x, t); {type(model).__name__} has none")
        if isinstance(cg_rtol, bool) or not isinstance(cg_rtol, (int, float)) or not cg_rtol > 0:
            raise ValueError(f"cg_rtol must be a positive number, got {cg_rtol!r}")
        self.laplacian_mode = laplacian
        self.cg_rtol = float(cg_rtol)
        self.cg_max_iter = None if cg_max_iter is None else v.check_positive_int(cg_max_iter, "cg_max_iter")
        self._anchor: tuple[float, Tensor] | None = None
        self.stats = dict(cg_iterations=0, cg_max_residual=0.0, indefinite=0)

    def anchor(self, t: float, x_t: Tensor) -> None:
        """Fix the conditioning point ``x_t`` at time ``t``; the ODE then runs from ``s = t``."""
        self._anchor = (float(t), x_t.detach().clone())

    def kernel(self, s: float) -> tuple[float, float]:
        """``(a, c)`` of the forward kernel ``N(x_t; a x_s, c I)`` from ``s`` to the anchor time."""
        if self._anchor is None:
            raise RuntimeError("call anchor(t, x_t) before integrating the mode-tracking ODE")
        a, c = self.schedule.transition(s, self._anchor[0])
        return a, max(c, 0.0)

    def _laplacian(self, y: Tensor, t: Tensor, s: Tensor) -> Tensor:
        if self.laplacian_mode == "model":
            return self.model.laplacian(y, self._t(t, y)).to(torch.float64)
        sf = s.reshape(s.shape[0], -1)
        lap = torch.zeros(s.shape[0], dtype=torch.float64, device=s.device)
        for i in range(sf.shape[1]):
            (gi,) = torch.autograd.grad(sf[:, i].sum(), y, create_graph=True)
            lap = lap + gi.reshape(s.shape[0], -1)[:, i].to(torch.float64)
        self.nfe.vjp += sf.shape[1]
        return lap

    def _solve(self, s: Tensor, yg: Tensor, a: float, c: float, rhs: Tensor) -> Tensor:
        """``M^-1 rhs`` with ``M = a^2 I - c grad s`` by conjugate gradients on the graph of ``s``."""

        def matvec(w: Tensor) -> Tensor:
            (hw,) = torch.autograd.grad(s, yg, w, retain_graph=True)
            self.nfe.vjp += 1
            return a * a * w - c * hw

        max_iter = self.cg_max_iter or min(2 * math.prod(yg.shape[1:]), 1000)
        w, info = conjugate_gradient(matvec, rhs, rtol=self.cg_rtol, max_iter=max_iter)
        self.stats["cg_iterations"] += info["iterations"]
        self.stats["cg_max_residual"] = max(self.stats["cg_max_residual"], float(info["residual"].max()))
        self.stats["indefinite"] += int(info["indefinite"].sum())
        return w.detach()

    def __call__(self, t: Tensor, y: Tensor) -> tuple[Tensor, None]:
        a, c = self.kernel(float(t))
        sv = self.schedule(t)
        with torch.enable_grad():
            yg = y.detach().requires_grad_(True)
            s = self.model.score(yg, self._t(t, y), **self.cond)
            self.nfe.forward += 1
            correction = torch.zeros_like(y)
            if c > 0:
                lap = self._laplacian(yg, t, s)
                (grad_lap,) = torch.autograd.grad(lap.sum(), yg, retain_graph=True)
                self.nfe.vjp += 1
                # -(1/2) g^2 H^-1 grad div s = (1/2) g^2 c M^-1 grad div s
                correction = (0.5 * c) * _expand(sv.g2, y) * self._solve(s, yg, a, c, grad_lap.to(y.dtype))
        s = s.detach()
        return _expand(sv.f, y) * y - _expand(sv.g2, y) * s + correction, None

    def stationarity(self, t: float, y: Tensor) -> Tensor:
        """``F = grad_y log p(y | x_t) = s_t(y) + (a / c)(x_t - a y)``, zero at the mode (shape of ``y``)."""
        a, c = self.kernel(t)
        s = self.model.score(y, torch.full((y.shape[0],), t, dtype=torch.float64, device=y.device), **self.cond)
        self.nfe.forward += 1
        return s + (a / c) * (self._anchor[1] - a * y)

    def newton(self, t: float, y: Tensor) -> Tensor:
        """One Newton step on the stationarity condition at time ``t``: ``y + c M^-1 F(y)``."""
        a, c = self.kernel(t)
        if c <= 0:
            return y
        with torch.enable_grad():
            yg = y.detach().requires_grad_(True)
            s = self.model.score(yg, torch.full((y.shape[0],), t, dtype=torch.float64, device=y.device), **self.cond)
            self.nfe.forward += 1
            residual = s.detach() + (a / c) * (self._anchor[1] - a * y)
            return y + c * self._solve(s, yg, a, c, residual)


@dataclass(repr=False)
class ModeTrackingResult:
    """The tracked mode ``y`` ``(B, *event_shape)`` of ``p(x_{t_end} | x_t)`` and diagnostics.

    ``gradient``: ``|grad_y log p(y | x_t)| = |s_{t_end}(y) + (a / c)(x_t - a y)|`` per sample
    (zero at an exact mode); ``score_norm``: ``|s_{t_end}(y)|``. ``path``: ``(S + 1, B,
    *event_shape)`` when ``record_path``; ``ts`` the times.
    """

    __repr__ = short_repr

    y: Tensor
    ts: Tensor
    path: Tensor | None
    gradient: Tensor
    score_norm: Tensor
    nfe: NFE
    settings: dict


def mode_tracking(
    model: Model,
    x_t: Tensor,
    t: float | None = None,
    *,
    t_end: float | None = None,
    steps: int = 64,
    solver: str = "heun",
    grid: str = "log_snr",
    newton_steps: int = 1,
    laplacian: str = "auto",
    cg_rtol: float = 1e-8,
    cg_max_iter: int | None = None,
    record_path: bool = False,
    callback: Callable[[StepInfo], None] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> ModeTrackingResult:
    """Follow the mode of ``p(x_s | x_t)`` from ``s = t`` (where it is ``x_t``) down to ``t_end``.

    ``x_t``: ``(B, *event_shape)`` at time ``t`` (default ``t_max``: ``x_t`` are latents);
    ``t_end`` defaults to ``t_min``. The ODE of docs/math.md s.4e is integrated with
    ``solver`` over ``steps`` steps on ``grid``; after each step ``newton_steps``
    Newton iterations on the stationarity condition pull ``y`` back onto the mode
    (predictor-corrector continuation; ``0`` integrates the bare ODE).
    """
    v.check_model(model)
    x_t = v.check_x(x_t, model, name="x_t")
    sched = model.schedule
    t = sched.t_max if t is None else float(t)
    t_end = sched.t_min if t_end is None else float(t_end)
    sched.check_t(torch.tensor([t, t_end], dtype=torch.float64), name="t and t_end")
    if not t_end < t:
        raise ValueError(f"need t_end < t, got t={t:g}, t_end={t_end:g}")
    v.check_positive_int(steps, "steps")
    v.check_choice(solver, "solver", TABLEAUX)
    if isinstance(newton_steps, bool) or not isinstance(newton_steps, int) or newton_steps < 0:
        raise ValueError(f"newton_steps must be a non-negative integer, got {newton_steps!r}")
    cond = v.check_kwargs(model_kwargs)
    dyn = ModeTrackingODE(model, laplacian=laplacian, cg_rtol=cg_rtol, cg_max_iter=cg_max_iter, cond=cond)
    dyn.anchor(t, x_t)
    ts = sched.time_grid(steps, spacing=grid, t_start=t, t_end=t_end)
    y = x_t
    path = [y.detach().clone()] if record_path else []
    if callback is not None:
        callback(StepInfo(0, t, y, None))
    with torch.no_grad():
        for i in range(steps):
            y = odeint(dyn, y, ts[i : i + 2], method=solver).x
            for _ in range(newton_steps):
                y = dyn.newton(float(ts[i + 1]), y)
            if not torch.isfinite(y).all():
                raise FloatingPointError(f"mode tracking diverged at t={float(ts[i + 1]):g}; use more steps or newton_steps")
            if record_path:
                path.append(y.detach().clone())
            if callback is not None:
                callback(StepInfo(i + 1, float(ts[i + 1]), y, None))
        grad = dyn.stationarity(t_end, y)
        a, c = dyn.kernel(t_end)
        s = grad - (a / c) * (x_t - a * y)
    if dyn.stats["indefinite"]:
        warnings.warn(
            f"mode tracking: the denoising distribution lost its local mode (non-positive curvature) "
            f"in {dyn.stats['indefinite']} solves; results there are unreliable",
            RuntimeWarning,
            stacklevel=2,
        )
    settings = dict(
        t=t, t_end=t_end, steps=steps, solver=solver, grid=grid, newton_steps=newton_steps,
        laplacian=dyn.laplacian_mode, cg_rtol=cg_rtol, **dyn.stats,
    )  # fmt: skip
    return ModeTrackingResult(
        y=y,
        ts=ts,
        path=torch.stack(path) if record_path else None,
        gradient=grad.to(torch.float64).reshape(y.shape[0], -1).norm(dim=1),
        score_norm=s.to(torch.float64).reshape(y.shape[0], -1).norm(dim=1),
        nfe=dyn.nfe,
        settings=settings,
    )
