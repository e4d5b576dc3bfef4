"""Score alignment (docs/math.md s.5).

Let ``F`` be the PF-ODE map ``x_T -> x_0``. Score alignment holds at ``x_T`` when

    s_0(F(x_T)) . (J_F(x_T) s_T(x_T)) > 0,

i.e. pushing the latent along its own score raises ``log p_0`` of the sample. Where it
holds for every latent, scaling latents changes ``log p_0`` monotonically (prior
guidance works). Two ways to measure it, which must agree:

* ``"with-score"``: carry the tangent ``v`` along the PF-ODE, ``dv/dt = (grad u) v``
  (one JVP per evaluation), from ``v_T = s_T(x_T)``; then ``s_0(x_0) . v_0``.
* ``"without-score"``: ``omega_t = s_t(x_t) . v_t`` obeys ``d omega/dt = -div_y((grad u)(y) v)``
  (the divergence of ``y -> J_u(y) v``, by Hutchinson over nested JVPs), from
  ``omega_T = |s_T(x_T)|^2``; the score is never evaluated at ``t_min``, where learned
  scores are least reliable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _validation as v
from .divergence import Hutchinson, jacobian_vector_product, model_fn
from .dynamics import Dynamics, _expand
from .models import NFE, Model
from .solvers import TABLEAUX, odeint
from ._repr import short_repr

__all__ = ["ScoreAlignmentResult", "score_alignment"]


@dataclass(repr=False)
class ScoreAlignmentResult:
    """``values`` (B,) float64: the alignment ``s_0(F(x_T)) . J_F s_T``; ``aligned`` where it is > 0."""

    __repr__ = short_repr

    values: Tensor
    aligned: Tensor
    fraction: float
    nfe: NFE
    method: str
    x: Tensor  # the PF-ODE samples F(x_T)


class _TangentPFODE(Dynamics):
    """PF-ODE on the stacked state ``[x; v]`` (2B batch): ``dx = u``, ``dv = (grad u) v``.

    In ``"without-score"`` mode the rate returned is ``-div_y(J_u(y) v)`` (Hutchinson),
    accumulated by the solver into ``omega``.
    """

    def __init__(self, model, *, track_omega: bool, mode: str, **kwargs):
        super().__init__(model, **kwargs)
        self.track_omega, self.mode, self.mode_used = track_omega, mode, None

    def __call__(self, t: Tensor, state: Tensor) -> tuple[Tensor, Tensor | None]:
        x, vt = state.chunk(2)
        sv = self.schedule(t)
        fn = model_fn(self.model, self._t(t, x), self.cond)
        s, js, self.mode_used = jacobian_vector_product(fn, x, vt, mode=self.mode)
        self.nfe.jvp += 1
        f, g2 = _expand(sv.f, x), _expand(sv.g2, x)
        du = torch.cat([f * x - 0.5 * g2 * s, f * vt - 0.5 * g2 * js])
        rate = None
        if self.track_omega:
            # div_y (J_s(y) v) by Hutchinson: e^T d/dy[J_s(y) v] e, a second-order product
            e = self.divergence.draw(x)[0]
            jvp_fn = lambda y: jacobian_vector_product(fn, y, vt, mode=self.mode)[1]  # noqa: E731
            _, hv, _ = jacobian_vector_product(jvp_fn, x, e, mode=self.mode)
            self.nfe.jvp += 2
            div_jv = (e * hv).reshape(x.shape[0], -1).to(torch.float64).sum(1)
            rate = 0.5 * sv.g2 * div_jv  # -div((grad u) v) = +(1/2) g^2 div(J_s v)
        return du, rate


def score_alignment(
    model: Model,
    x_T: Tensor,
    *,
    steps: int = 64,
    solver: str = "heun",
    grid: str = "log_snr",
    method: str = "with-score",
    generator: torch.Generator | None = None,
    mode: str = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> ScoreAlignmentResult:
    """Score alignment of latents ``x_T`` ``(B, *event_shape)`` along the PF-ODE.

    ``method``: ``"with-score"`` or ``"without-score"`` (module docstring). ``mode``:
    ``"forward"``, ``"reverse"`` or ``"auto"`` automatic differentiation (reverse needs
    double backward through the network). ``generator`` seeds the Hutchinson probes of
    ``"without-score"``.
    """
    v.check_model(model)
    x_T = v.check_x(x_T, model, name="x_T")
    v.check_positive_int(steps, "steps")
    v.check_choice(solver, "solver", TABLEAUX)
    v.check_choice(method, "method", ("with-score", "without-score"))
    v.check_choice(mode, "mode", ("auto", "forward", "reverse"))
    cond = v.check_kwargs(model_kwargs)
    sched = model.schedule
    est = Hutchinson(1, resample="call")
    dyn = _TangentPFODE(model, track_omega=method == "without-score", mode=mode, divergence=est, cond=cond)
    dyn.reset(generator)
    t_T = torch.full((x_T.shape[0],), sched.t_max, dtype=torch.float64)
    with torch.no_grad():
        s_T = model.score(x_T, t_T, **cond)
        dyn.nfe.forward += 1
        omega_T = s_T.reshape(x_T.shape[0], -1).to(torch.float64).square().sum(1)
        ts = sched.time_grid(steps, spacing=grid)
        sol = odeint(dyn, torch.cat([x_T, s_T]), ts, logp=omega_T if method == "without-score" else None, method=solver, fsal=False)
        x0, v0 = sol.x.chunk(2)
        if method == "with-score":
            s0 = model.score(x0, torch.full_like(t_T, sched.t_min), **cond)
            dyn.nfe.forward += 1
            values = (s0 * v0).reshape(x0.shape[0], -1).to(torch.float64).sum(1)
        else:
            values = sol.logp
    aligned = values > 0
    return ScoreAlignmentResult(values, aligned, float(aligned.double().mean()), dyn.nfe, method, x0)
