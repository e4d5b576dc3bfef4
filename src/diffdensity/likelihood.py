"""Log-likelihood of data through the probability-flow ODE (docs/math.md s.3a, s.7).

Integrating ``dx/dt = u_PF`` from ``t_min`` to ``t_max`` alongside
``d/dt log p_t(x_t) = -div u_PF`` gives

    log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^{t_max} div u_PF(x_t, t) dt.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import _validation as v
from .divergence import DivergenceEstimator, Exact, Hutchinson, make_divergence
from .dynamics import PFODE
from .models import NFE, Model
from .schedules import GRIDS
from .solvers import TABLEAUX, check_state, odeint
from ._repr import short_repr

__all__ = ["LikelihoodResult", "BitsPerDimResult", "log_likelihood", "bits_per_dim", "dequantize", "logp_to_bpd"]



DEFAULT_SOLVER = "rk4"
DEFAULT_STEPS = 24
DEFAULT_PROBES = 2
#: values of the input beyond this magnitude are refused (no data set lives there).
MAX_ABS_X = 1e8


@dataclass(repr=False)
class LikelihoodResult:
    """Per-sample log-likelihoods, float64 ``(B,)``, and how they were obtained.

    ``logp = prior_logp + delta_logp`` where ``delta_logp = int div u_PF dt``.
    ``stderr``: float64 ``(B,)`` standard error of ``logp`` from the Hutchinson
    estimator's noise (zeros for the exact divergence; ``None`` with a single probe,
    whose spread cannot be estimated from its own evaluations). It is estimated from
    the per-probe values of the same evaluations: with fresh probes per step or stage
    the integral is a sum of independent terms, ``Var = sum_steps var_p(d_p) / P``.
    ``error``: float64 ``(B,)`` discretisation-error estimate of ``logp`` (adaptive
    solvers: the sum of the embedded pair's local errors, which overestimates the error
    of the higher-order result; ``step_halving=True``: ``(L_{N/2} - L_N) / (2^p - 1)``
    for a fixed-step solver of order ``p``); ``None`` otherwise.
    ``settings["ad_mode"]``: the AD mode that ran (``"forward"`` / ``"reverse"``).
    """

    __repr__ = short_repr

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    x_T: Tensor
    nfe: NFE
    steps: int
    settings: dict
    stderr: Tensor | None = None
    error: Tensor | None = None


@dataclass(repr=False)
class BitsPerDimResult:
    """Bits per dimension of 8-bit data, float64 ``(B,)``, averaged over dequantisation draws.

    ``stderr``: float64 ``(B,)`` standard error of ``bpd`` from the Hutchinson noise of
    the draws (``sqrt(sum_d se_d^2) / draws / (D ln 2)``; the spread over dequantisation
    draws is part of the quantity, not noise); ``None`` where the draws carry none.
    """

    __repr__ = short_repr

    bpd: Tensor
    logp: Tensor  # (draws, B) continuous log-density of each dequantised input
    nfe: NFE
    settings: dict
    stderr: Tensor | None = None


def _check_inputs(model, x, steps, solver, grid, probes, rtol, atol, generator, target_stderr):
    v.check_model(model)
    x = v.check_x(x, model)
    big = float(x.detach().abs().max())
    if big > MAX_ABS_X:
        raise ValueError(
            f"x has values up to {big:.3g}; log-likelihoods need inputs on the model's data scale "
            f"(|x| <= {MAX_ABS_X:g}; images: dd.likelihood.dequantize(u) maps 8-bit values to [-1, 1])"
        )
    steps = None if steps is None else v.check_positive_int(steps, "steps")
    if solver is not None:
        v.check_choice(solver, "solver", TABLEAUX)
    v.check_choice(grid, "grid", GRIDS)
    probes = v.check_positive_int(probes, "probes")
    rtol = None if rtol is None else v.check_positive_float(rtol, "rtol")
    atol = None if atol is None else v.check_positive_float(atol, "atol")
    v.check_generator(generator)
    target = None if target_stderr is None else v.check_positive_float(target_stderr, "target_stderr")
    return x, steps, probes, rtol, atol, target


def _plan(solver, steps, rtol, atol):
    """``(solver, steps, rtol, atol)`` with the defaults filled in."""
    solver = DEFAULT_SOLVER if solver is None else solver
    adaptive = TABLEAUX[solver].adaptive
    if steps is None:
        steps = 16 if adaptive else DEFAULT_STEPS
    return solver, steps, 1e-5 if rtol is None else rtol, 1e-5 if atol is None else atol


def log_likelihood(
    model: Model,
    x: Tensor,
    *,
    steps: int | None = None,
    solver: str = DEFAULT_SOLVER,
    grid: str = "log_snr",
    divergence: str | DivergenceEstimator = "hutchinson",
    probes: int = DEFAULT_PROBES,
    generator: torch.Generator | None = None,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    target_stderr: float | None = None,
    max_probes: int = 64,
    step_halving: bool = False,
) -> LikelihoodResult:
    """``log p_{t_min}(x)`` for a batch ``x`` of shape ``(B, *event_shape)``, with error bars.

    The defaults are chosen by measurement (docs/likelihood.md): classical Runge-Kutta
    (order 4) with 24 steps uniform in logSNR, and Hutchinson's estimator with 2
    Rademacher probes drawn afresh at every stage (independent terms: the noise
    averages over all 96 evaluations, and its variance is estimated from the probe
    pairs), all products of an evaluation from one network pass, in the AD mode
    measured to be faster.

    Args:
        steps: fixed-step solvers take this many steps on the ``grid`` (``"log_snr"``,
            ``"uniform"`` or ``"karras"``; default 24); adaptive ones (``"bosh3"``,
            ``"dopri5"``) use it only for the first step size (default 1/16 of the range).
        solver: ``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``, ``"bosh3"``, ``"dopri5"``.
        divergence: ``"hutchinson"`` (``probes`` Rademacher probes, fresh at every
            stage), ``"exact"``, or a :class:`~diffdensity.divergence.DivergenceEstimator`.
        generator: a ``torch.Generator``; seeds the Hutchinson probes.
        prior_logp: ``log p_T`` at the end point; default the schedule's Gaussian prior.
        rtol, atol: adaptive solvers' tolerances (default 1e-5) on ``x`` and, with a
            divergence without probe noise, on ``log p`` too.
        model_kwargs: conditioning passed to ``model.score``.
        target_stderr: re-estimate the samples whose ``stderr`` exceeds this (nats) with
            more probes (at most ``max_probes``), combining all estimates by inverse
            variance; ``settings["target_stderr"]`` reports the rounds and extra passes.
        step_halving: also solve with half the fixed steps and report the Richardson
            estimate of the discretisation error in ``error``.
    """
    x, steps, probes, rtol, atol, target = _check_inputs(model, x, steps, solver, grid, probes, rtol, atol, generator, target_stderr)
    cond = v.check_kwargs(model_kwargs)
    solver, steps, rtol, atol = _plan(solver, steps, rtol, atol)
    est = make_divergence(divergence, probes)
    res = _solve(model, x, est, steps, solver, grid, generator, prior_logp, rtol, atol, cond)
    if step_halving:
        _halve(res, model, x, est, steps, solver, grid, generator, prior_logp, rtol, atol, cond)
    if target is not None:
        _meet_target(res, target, max_probes, model, x, divergence, est, steps, solver, grid, generator, prior_logp, rtol, atol, cond)
    return res


def _solve(model, x, est, steps, solver, grid, generator, prior_logp, rtol, atol, cond) -> LikelihoodResult:
    """One PF-ODE solve from ``t_min`` to ``t_max`` with per-probe rates."""
    sched = model.schedule
    ts = sched.time_grid(steps, spacing=grid, t_start=sched.t_min, t_end=sched.t_max)
    dyn = PFODE(model, divergence=est, cond=cond)
    dyn.reset(generator)
    resample = getattr(est, "resample", "solve")
    # fresh probes at every stage: each rate's own variance (rate_var); otherwise the probes' spread
    func = _WithRateVariance(dyn)
    primal0 = est.primal_passes
    with est.probe_rates(), torch.no_grad():
        sol = odeint(
            func, x, ts, logp=torch.zeros(x.shape[0], dtype=torch.float64, device=x.device), method=solver,
            rtol=rtol, atol=atol, begin_step=dyn.begin_step, fsal=resample in ("solve", "call"),
            control="x" if isinstance(est, Hutchinson) else "both", independent_steps=resample != "solve",
        )
        prior = (prior_logp or sched.prior_log_prob)(sol.x)
    if not isinstance(prior, Tensor) or prior.shape != (x.shape[0],):
        got = tuple(prior.shape) if isinstance(prior, Tensor) else type(prior).__name__
        raise ValueError(f"prior_logp must return one log-density per sample, shape ({x.shape[0]},); got {got}")
    prior = prior.to(torch.float64)
    check_state(prior, "prior_logp(x_T)", float(sched.t_max), "the prior log-density of the end point; check prior_logp and that x is on the model's scale")
    delta = -sol.logp  # state integrated log p_T(x_T) - log p_0(x_0)
    if sol.logp_var is not None:
        stderr = sol.logp_var.sqrt()
    else:
        stderr = torch.zeros_like(delta) if isinstance(est, Exact) else None
    settings = dict(
        steps=steps, solver=solver, grid=grid, rtol=rtol, atol=atol, divergence=repr(est), accepted_steps=sol.steps,
        rejected_steps=sol.rejected, ad_mode=est.resolved_mode, ad_timings=dict(est.mode_timings),
        primal_passes=est.primal_passes - primal0,
    )
    err = None if sol.logp_error is None else -sol.logp_error
    return LikelihoodResult(prior + delta, prior, delta, sol.x, dyn.nfe, sol.steps, settings, stderr, err)


class _WithRateVariance:
    """PF-ODE dynamics returning ``(u, rate, Var(rate))`` (:meth:`~diffdensity.dynamics.Dynamics.rate_var`;
    docs/math.md s.3a, s.6)."""

    def __init__(self, dyn: PFODE):
        self.dyn = dyn

    def __call__(self, t: Tensor, x: Tensor):
        u, rate = self.dyn(t, x)
        return u, rate, self.dyn.rate_var(t)


def _halve(res, model, x, est, steps, solver, grid, generator, prior_logp, rtol, atol, cond) -> None:
    """Richardson estimate of a fixed-step solve's error from a second solve with half the steps."""
    tab = TABLEAUX[solver]
    if tab.adaptive or steps < 2:
        raise ValueError("step_halving needs a fixed-step solver and steps >= 2 (adaptive solvers report error already)")
    half = _solve(model, x, est, steps // 2, solver, grid, generator, prior_logp, rtol, atol, cond)
    ratio = (steps / (steps // 2)) ** tab.order - 1
    res.error = (half.logp - res.logp) / ratio  # err_N = C h^p, err_{N/2} = 2^p C h^p
    res.nfe.add(half.nfe)
    res.settings["step_halving"] = dict(steps=steps // 2, nfe=half.nfe.total)


def _meet_target(res, target, max_probes, model, x, divergence, est, steps, solver, grid, generator, prior_logp, rtol, atol, cond) -> None:
    """Re-estimate samples above ``target`` stderr with more probes; combine by inverse variance."""
    if res.stderr is None:
        raise ValueError("target_stderr needs an estimator with a standard error (probes >= 2, or the exact divergence)")
    probes, rounds, extra = getattr(est, "probes", 1), 0, NFE()
    while bool((res.stderr > target).any()) and probes < max_probes:
        bad = (res.stderr > target).nonzero().flatten()
        need = float((res.stderr[bad] / target).square().max())
        probes = min(max_probes, max(2 * probes, math.ceil(probes * need)))
        more = make_divergence(divergence, probes) if isinstance(divergence, str) else Hutchinson(probes, noise=est.noise, resample=est.resample, mode=est.mode, basis=est.basis)
        r2 = _solve(model, x[bad], more, steps, solver, grid, generator, prior_logp, rtol, atol, cond)
        w1, w2 = 1 / res.stderr[bad].square(), 1 / r2.stderr.square()
        for name in ("logp", "delta_logp"):
            getattr(res, name)[bad] = (getattr(res, name)[bad] * w1 + getattr(r2, name) * w2) / (w1 + w2)
        res.stderr[bad] = (w1 + w2).rsqrt()
        extra.add(r2.nfe)
        rounds += 1
    res.nfe.add(extra)
    met = bool((res.stderr <= target).all())
    res.settings["target_stderr"] = dict(target=target, met=met, rounds=rounds, max_probes_used=probes, extra_nfe=extra.total)
    if not met:
        warnings.warn(f"target_stderr={target:g} not met with max_probes={max_probes}: largest stderr {float(res.stderr.max()):.3g} nats", stacklevel=3)


def dequantize(u: Tensor, noise: Tensor | float = 0.5) -> Tensor:
    """8-bit values ``u`` in ``[0, 255]`` -> ``[-1, 1]``: ``x = 2 (u + noise) / 256 - 1`` (docs/math.md s.7).

    ``noise`` in ``[0, 1)`` places the point inside its bin of width ``2/256``: uniform
    draws for dequantised likelihoods, ``0.5`` (the default) for the bin centre. Any
    shape that broadcasts with ``u``; the result has the dtype of ``u + noise`` (float).
    """
    return 2 * (u + noise) / 256 - 1


def logp_to_bpd(logp, dim: int):
    """Bits/dim of 8-bit data from the continuous log-density on ``[-1, 1]^D`` (docs/math.md s.7).

    ``bpd = -log p(x) / (D ln 2) + 7`` (the bin width ``2/256`` is ``2^-7``); works on
    numbers and tensors alike.
    """
    return -logp / (dim * math.log(2)) + 7


def bits_per_dim(
    model: Model,
    images: Tensor,
    *,
    draws: int = 4,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    **likelihood_options: Any,
) -> BitsPerDimResult:
    """Bits per dimension of 8-bit images under uniform dequantisation (docs/math.md s.7).

    ``images``: integer values in ``[0, 255]`` (uint8 or integer-valued tensor) of shape
    ``(B, *event_shape)``. Each draw maps ``u -> 2 (u + U(0,1)) / 256 - 1`` in ``[-1, 1]``
    and ``bpd = -log p(x) / (D ln 2) + 7``; the ``draws`` values are averaged (an upper
    bound on the discrete model's bits/dim). Other options go to :func:`log_likelihood`.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    draws = v.check_positive_int(draws, "draws")
    v.check_generator(generator)
    u = images.to(torch.float64)
    if not torch.isfinite(u).all() or (u != u.round()).any() or u.min() < 0 or u.max() > 255:
        raise ValueError("images must hold integer values in [0, 255] (8-bit data)")
    dim = math.prod(u.shape[1:])
    logps, variances, nfe = [], [], NFE()
    for _ in range(draws):
        device = generator.device if generator is not None else u.device
        noise = torch.rand(u.shape, generator=generator, dtype=torch.float64, device=device).to(u.device)
        x = dequantize(u, noise).to(dtype)
        res = log_likelihood(model, x, generator=generator, **likelihood_options)
        logps.append(res.logp)
        variances.append(None if res.stderr is None else res.stderr.square())
        nfe.add(res.nfe)
    logp = torch.stack(logps)
    bpd = logp_to_bpd(logp, dim).mean(0)
    stderr = None if variances[0] is None else torch.stack(variances).sum(0).sqrt() / (draws * dim * math.log(2))
    return BitsPerDimResult(bpd, logp, nfe, dict(draws=draws, **res.settings), stderr)
