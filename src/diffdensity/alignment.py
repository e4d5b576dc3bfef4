"""Score alignment (docs/math.md s.5).

Let ``F`` be the PF-ODE map ``x_T -> x_0``. Score alignment holds at ``x_T`` when

    s_0(F(x_T)) . (J_F(x_T) s_T(x_T)) > 0,

i.e. pushing the latent along its own score raises ``log p_0`` of the sample. Where it
holds for every latent, scaling latents changes ``log p_0`` monotonically (prior
guidance works). Both measurements carry the tangent ``v_t = J_{T->t} s_T`` along the
PF-ODE, ``dv/dt = (grad u) v`` (one JVP per evaluation, which also returns the score):

* ``"with-score"``: ``s_0(x_0) . v_0``, the network's score at the data end.
* ``"without-score"``: ``omega_t`` with ``d omega/dt = -div_y((grad u)(y) v)`` (Hutchinson
  over nested JVPs), from ``omega_T = grad log p_T(x_T) . s_T(x_T)`` (the Gaussian prior's
  gradient, ``-x_T / sigma_T^2``); it equals ``grad log p_0 . v_0``,
  the derivative of the model's own (PF-ODE) density, and never evaluates the score at
  ``t_min``.

The two agree when the score is the gradient of the model's density (exact models). A
learned network's score need not be (docs/math.md s.5, s.13): their difference
``(grad log p_t - s_t) . v_t`` is then a measurement of the network, and
:meth:`ScoreAlignmentResult.agree` says whether it exceeds the estimates' own errors.
Both are also recorded along the trajectory (``path_with``, ``path_without``) to show
where they part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from . import _validation as v
from .divergence import Hutchinson, jacobian_vector_product, model_fn
from .dynamics import Dynamics, _dot, _expand
from .expint import EXPONENTIAL_SOLVERS, ODE_SOLVERS, exp_odeint
from .models import NFE, Model
from .solvers import TABLEAUX, StepInfo, odeint
from ._repr import short_repr

__all__ = ["ScoreAlignmentResult", "score_alignment"]

METHODS = ("with-score", "without-score", "both")


@dataclass(repr=False)
class ScoreAlignmentResult:
    """Score alignment of a batch of latents; every tensor float64 ``(B,)`` unless noted.

    ``with_score``: ``s_0(x_0) . v_0`` (always computed: one extra forward pass).
    ``without_score``: ``omega_0`` (``None`` for ``method="with-score"``), with
    ``without_score_stderr``, the standard error of its Hutchinson part (``None`` for one
    probe). ``with_score_error``, ``without_score_error``: Richardson estimates of the
    discretisation error (``step_halving=True``; else ``None``). ``values``: the
    requested method's value (``"both"``: without-score), ``aligned = values > 0`` and
    its ``fraction``. ``ts`` ``(N + 1,)``; ``path_with`` ``(N + 1, B)``: ``s_t(x_t) . v_t``
    at the grid times (``t_min``: the final value); ``path_without``: ``omega_t`` or
    ``None``. ``x``: the PF-ODE samples ``F(x_T)``.
    """

    __repr__ = short_repr

    method: str
    nfe: NFE
    x: Tensor
    with_score: Tensor
    without_score: Tensor | None = None
    without_score_stderr: Tensor | None = None
    with_score_error: Tensor | None = None
    without_score_error: Tensor | None = None
    ts: Tensor | None = None
    path_with: Tensor | None = None
    path_without: Tensor | None = None
    settings: dict = field(default_factory=dict)

    @property
    def values(self) -> Tensor:
        return self.with_score if self.method == "with-score" else self.without_score

    @property
    def aligned(self) -> Tensor:
        return self.values > 0

    @property
    def fraction(self) -> float:
        return float(self.aligned.double().mean())

    def error(self, which: str) -> Tensor | None:
        """``(B,)`` root sum of squares of the error parts ``which`` (``"with-score"`` or ``"without-score"``) carries, ``None`` if none."""
        parts = (self.with_score_error,) if which == "with-score" else (self.without_score_stderr, self.without_score_error)
        present = [p for p in parts if p is not None]
        return None if not present else torch.stack([p.square() for p in present]).sum(0).sqrt()

    def combined_error(self) -> Tensor:
        """``sqrt(stderr^2 + error_with^2 + error_without^2)`` of the difference, with the parts available."""
        if self.without_score is None:
            raise ValueError("agreement needs both measurements: method='both' or 'without-score'")
        errors = [e for e in (self.error("with-score"), self.error("without-score")) if e is not None]
        return torch.zeros_like(self.with_score) if not errors else torch.stack(errors).square().sum(0).sqrt()

    def agree(self, k: float = 2.0) -> Tensor:
        """``(B,)`` bool: ``|with - without| <= k * combined_error()`` per latent."""
        err = self.combined_error()
        return (self.with_score - self.without_score).abs() <= k * err


class _TangentPFODE(Dynamics):
    """PF-ODE on the stacked state ``[x; v]`` (2B batch): ``dx = u``, ``dv = (grad u) v``.

    Records ``s_t(x_t) . v_t`` of every call by time (``self.sv``; the first stage of a
    step is at the grid point). With ``track_omega`` the rate is
    ``-div_y(J_u(y) v) = (1/2) g^2 div_y(J_s(y) v)`` by Hutchinson, per probe ``(P, B)``
    when ``P >= 2`` (the solvers estimate its variance from the probes' spread).
    """

    def __init__(self, model, *, track_omega: bool, mode: str, **kwargs):
        super().__init__(model, **kwargs)
        self.track_omega, self.mode, self.sv = track_omega, mode, {}

    def __call__(self, t: Tensor, state: Tensor) -> tuple[Tensor, Tensor | None]:
        x, vt = state.chunk(2)
        sv = self.schedule(t)
        fn = model_fn(self.model, self._t(t, x), self.cond)
        s, js, _ = jacobian_vector_product(fn, x, vt, mode=self.mode)
        self.nfe.jvp += 1
        self.sv[float(t)] = _dot(s, vt)
        f, g2 = _expand(sv.f, x), _expand(sv.g2, x)
        du = torch.cat([f * x - 0.5 * g2 * s, f * vt - 0.5 * g2 * js])
        if not self.track_omega:
            return du, None
        # div_y (J_s(y) v) by Hutchinson, all probes in one nested product on a (P * B) batch
        r = self.divergence.draw(x)
        e = self.divergence.basis_for(x).synthesis(r)
        p = e.shape[0]
        reps = (p,) + (1,) * (x.ndim - 1)
        v_rep = vt.repeat(reps)
        jvp_fn = lambda y: jacobian_vector_product(fn, y, v_rep, mode=self.mode)[1]  # noqa: E731
        _, hv, _ = jacobian_vector_product(jvp_fn, x.repeat(reps), e.reshape(-1, *x.shape[1:]), mode=self.mode)
        self.nfe.jvp += 2 * p
        div_jv = self.divergence.terms(r, hv.reshape(e.shape), x).sum(-1)
        rate = 0.5 * sv.g2 * div_jv
        return du, (rate if p > 1 else rate[0])


def score_alignment(
    model: Model,
    x_T: Tensor,
    *,
    steps: int = 32,
    solver: str | None = None,
    grid: str = "log_snr",
    method: str = "with-score",
    probes: int = 2,
    generator: torch.Generator | None = None,
    mode: str = "auto",
    step_halving: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> ScoreAlignmentResult:
    """Score alignment of latents ``x_T`` ``(B, *event_shape)`` along the PF-ODE.

    ``method``: ``"with-score"``, ``"without-score"`` or ``"both"`` (module docstring;
    with-score comes with every run at one forward pass). ``solver``: any ODE solver of
    :data:`diffdensity.expint.ODE_SOLVERS` with fixed steps; default the sampler's
    (exponential Heun for a learned network, Heun for exact scores,
    :func:`diffdensity.methods.default_ode_solver`). ``probes``: Rademacher probes per
    evaluation of without-score (two JVPs each; ``>= 2`` gives its standard error).
    ``mode``: ``"forward"``, ``"reverse"`` or ``"auto"`` automatic differentiation
    (reverse needs double backward through the network). ``generator`` seeds the
    probes. ``step_halving``: solve again with ``steps // 2`` and report the Richardson
    error of both values (1.5x the cost). ``callback`` gets a
    :class:`~diffdensity.solvers.StepInfo` after every step (state ``[x; v]``), numbered
    on through the half-steps solve (``steps + steps // 2`` in all).
    """
    from .methods import default_ode_solver

    v.check_model(model)
    x_T = v.check_x(x_T, model, name="x_T")
    v.check_positive_int(steps, "steps")
    v.check_positive_int(probes, "probes")
    solver = default_ode_solver(model) if solver is None else solver
    v.check_choice(solver, "solver", ODE_SOLVERS)
    if solver not in EXPONENTIAL_SOLVERS and TABLEAUX[solver].adaptive:
        raise ValueError(f"score alignment needs a fixed-step solver, got the adaptive {solver!r}")
    v.check_choice(method, "method", METHODS)
    v.check_choice(mode, "mode", ("auto", "forward", "reverse"))
    if step_halving and steps < 2:
        raise ValueError("step_halving needs steps >= 2")
    cond = v.check_kwargs(model_kwargs)
    res = _solve(model, x_T, method, steps, solver, grid, probes, generator, mode, cond, callback)
    if step_halving:
        after = None if callback is None else lambda info: callback(StepInfo(info.step + steps, info.t, info.x, info.logp))
        half = _solve(model, x_T, method, steps // 2, solver, grid, probes, generator, mode, cond, after)
        order = 2 if solver in EXPONENTIAL_SOLVERS else TABLEAUX[solver].order
        ratio = (steps / (steps // 2)) ** order - 1
        res.with_score_error = (half.with_score - res.with_score) / ratio
        if res.without_score is not None:
            res.without_score_error = (half.without_score - res.without_score) / ratio
        res.nfe.add(half.nfe)
        res.settings["step_halving"] = dict(steps=steps // 2, nfe=half.nfe.total)
    return res


def _solve(model, x_T, method, steps, solver, grid, probes, generator, mode, cond, callback=None) -> ScoreAlignmentResult:
    """One tangent PF-ODE solve from ``t_max`` to ``t_min``."""
    omega = method != "with-score"
    sched = model.schedule
    dyn = _TangentPFODE(model, track_omega=omega, mode=mode, divergence=Hutchinson(probes), cond=cond)
    dyn.reset(generator)
    b = x_T.shape[0]
    t_T = torch.full((b,), sched.t_max, dtype=torch.float64)
    ts = sched.time_grid(steps, spacing=grid)
    with torch.no_grad():
        s_T = model.score(x_T, t_T, **cond)
        dyn.nfe.forward += 1
        # omega_T = grad log p_T(x_T) . v_T with the prior N(0, sigma_T^2 I) that defines the model's density
        omega_T = -_dot(x_T, s_T) / sched.prior_std**2 if omega else None
        state = torch.cat([x_T, s_T])
        if solver in EXPONENTIAL_SOLVERS:
            sol = exp_odeint(dyn, state, ts, sched, logp=omega_T, method=solver, log_density=False, callback=callback)
        else:
            sol = odeint(dyn, state, ts, logp=omega_T, method=solver, fsal=False, callback=callback)
        x0, v0 = sol.x.chunk(2)
        s0 = model.score(x0, torch.full_like(t_T, sched.t_min), **cond)
        dyn.nfe.forward += 1
    with_score = _dot(s0, v0)
    path_with = torch.stack([dyn.sv.get(float(t), torch.full((b,), float("nan"), dtype=torch.float64)) for t in ts[:-1]] + [with_score])
    stderr = None if sol.logp_var is None else sol.logp_var.sqrt()
    settings = dict(steps=steps, solver=solver, grid=grid, probes=probes if omega else 0, ad_mode=mode)
    return ScoreAlignmentResult(
        method, dyn.nfe, x0, with_score, sol.logp if omega else None, stderr,
        ts=ts, path_with=path_with, path_without=sol.logp_path if omega else None, settings=settings,
    )
