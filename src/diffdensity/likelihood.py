"""Log-likelihood of data through the probability-flow ODE (MATH.md s.3a, s.7).

Integrating ``dx/dt = u_PF`` from ``t_min`` to ``t_max`` alongside
``d/dt log p_t(x_t) = -div u_PF`` gives

    log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^{t_max} div u_PF(x_t, t) dt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import _validation as v
from .divergence import DivergenceEstimator, make_divergence
from .dynamics import PFODE
from .models import NFE, Model
from .schedules import GRIDS
from .solvers import TABLEAUX, odeint

__all__ = ["LikelihoodResult", "BitsPerDimResult", "log_likelihood", "bits_per_dim", "dequantize", "logp_to_bpd"]



@dataclass
class LikelihoodResult:
    """Per-sample log-likelihoods, float64 ``(B,)``, and how they were obtained.

    ``logp = prior_logp + delta_logp`` where ``delta_logp = int div u_PF dt``.
    """

    logp: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    x_T: Tensor
    nfe: NFE
    steps: int
    settings: dict


@dataclass
class BitsPerDimResult:
    """Bits per dimension of 8-bit data, float64 ``(B,)``, averaged over dequantisation draws."""

    bpd: Tensor
    logp: Tensor  # (draws, B) continuous log-density of each dequantised input
    nfe: NFE
    settings: dict


def log_likelihood(
    model: Model,
    x: Tensor,
    *,
    steps: int = 64,
    solver: str = "heun",
    grid: str = "log_snr",
    divergence: str | DivergenceEstimator = "hutchinson",
    probes: int = 1,
    generator: torch.Generator | None = None,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    model_kwargs: dict[str, Any] | None = None,
) -> LikelihoodResult:
    """``log p_{t_min}(x)`` for a batch ``x`` of shape ``(B, *event_shape)``.

    Args:
        steps: fixed-step solvers take this many steps on the ``grid`` (``"log_snr"``,
            ``"uniform"`` or ``"karras"``); adaptive ones (``"bosh3"``, ``"dopri5"``)
            use it only for the first step size.
        solver: ``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``, ``"bosh3"``, ``"dopri5"``.
        divergence: ``"hutchinson"`` (with ``probes`` Rademacher probes, fresh every
            step), ``"exact"``, or a :class:`~diffdensity.divergence.DivergenceEstimator`.
        generator: seeds the Hutchinson probes.
        prior_logp: ``log p_T`` at the end point; default the schedule's Gaussian prior.
        model_kwargs: conditioning passed to ``model.score``.
    """
    v.check_model(model)
    x = v.check_x(x, model)
    v.check_positive_int(steps, "steps")
    v.check_choice(solver, "solver", TABLEAUX)
    v.check_choice(grid, "grid", GRIDS)
    v.check_positive_int(probes, "probes")
    cond = v.check_kwargs(model_kwargs)
    est = make_divergence(divergence, probes)
    sched = model.schedule
    ts = sched.time_grid(steps, spacing=grid, t_start=sched.t_min, t_end=sched.t_max)
    dyn = PFODE(model, divergence=est, cond=cond)
    dyn.reset(generator)
    with torch.no_grad():
        sol = odeint(
            dyn,
            x,
            ts,
            logp=torch.zeros(x.shape[0], dtype=torch.float64, device=x.device),
            method=solver,
            rtol=rtol,
            atol=atol,
            begin_step=dyn.begin_step,
            fsal=not dyn.step_dependent,
        )
        prior = (prior_logp or sched.prior_log_prob)(sol.x)
    if not isinstance(prior, Tensor) or prior.shape != (x.shape[0],):
        got = tuple(prior.shape) if isinstance(prior, Tensor) else type(prior).__name__
        raise ValueError(f"prior_logp must return one log-density per sample, shape ({x.shape[0]},); got {got}")
    prior = prior.to(torch.float64)
    delta = -sol.logp  # state integrated log p_T(x_T) - log p_0(x_0)
    settings = dict(steps=steps, solver=solver, grid=grid, divergence=repr(est), accepted_steps=sol.steps, rejected_steps=sol.rejected)
    return LikelihoodResult(prior + delta, prior, delta, sol.x, dyn.nfe, sol.steps, settings)


def dequantize(u: Tensor, noise: Tensor | float = 0.5) -> Tensor:
    """8-bit values ``u`` in ``[0, 255]`` -> ``[-1, 1]``: ``x = 2 (u + noise) / 256 - 1`` (MATH.md s.7).

    ``noise`` in ``[0, 1)`` places the point inside its bin of width ``2/256``: uniform
    draws for dequantised likelihoods, ``0.5`` (the default) for the bin centre. Any
    shape that broadcasts with ``u``; the result has the dtype of ``u + noise`` (float).
    """
    return 2 * (u + noise) / 256 - 1


def logp_to_bpd(logp, dim: int):
    """Bits/dim of 8-bit data from the continuous log-density on ``[-1, 1]^D`` (MATH.md s.7).

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
    """Bits per dimension of 8-bit images under uniform dequantisation (MATH.md s.7).

    ``images``: integer values in ``[0, 255]`` (uint8 or integer-valued tensor) of shape
    ``(B, *event_shape)``. Each draw maps ``u -> 2 (u + U(0,1)) / 256 - 1`` in ``[-1, 1]``
    and ``bpd = -log p(x) / (D ln 2) + 7``; the ``draws`` values are averaged (an upper
    bound on the discrete model's bits/dim). Other options go to :func:`log_likelihood`.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    v.check_positive_int(draws, "draws")
    u = images.to(torch.float64)
    if not torch.isfinite(u).all() or (u != u.round()).any() or u.min() < 0 or u.max() > 255:
        raise ValueError("images must hold integer values in [0, 255] (8-bit data)")
    dim = math.prod(u.shape[1:])
    logps, nfe = [], NFE()
    for _ in range(draws):
        device = generator.device if generator is not None else u.device
        noise = torch.rand(u.shape, generator=generator, dtype=torch.float64, device=device).to(u.device)
        x = dequantize(u, noise).to(dtype)
        res = log_likelihood(model, x, generator=generator, **likelihood_options)
        logps.append(res.logp)
        nfe.forward += res.nfe.forward
        nfe.jvp += res.nfe.jvp
        nfe.vjp += res.nfe.vjp
    logp = torch.stack(logps)
    bpd = logp_to_bpd(logp, dim).mean(0)
    return BitsPerDimResult(bpd, logp, nfe, dict(draws=draws, **res.settings))
