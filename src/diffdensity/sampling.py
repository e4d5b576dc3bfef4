"""Sampling with the log-density of every sample tracked along its trajectory (docs/math.md s.3, s.4).

:func:`sample` draws latents from the prior (or takes ``x_T``), integrates a method's
dynamics from ``t_max`` to ``t_min`` and returns the samples with their log-density
``log p_{t_min}(x)``, float64 ``(B,)``. Methods (``"pf-ode"``, ``"sde"``, ``"hd"``,
``"custom"``, the guidance methods, your own) are entries of the registry
:data:`diffdensity.methods.METHODS`: a builder turns the call into a plan of phases,
each a dynamics integrated down to a time; this module only runs plans.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import _validation as v
from . import guidance  # noqa: F401  (importing it registers the guidance methods)
from .divergence import DivergenceEstimator, make_divergence
from .dynamics import Dynamics
from .methods import METHODS, MethodContext, Phase, Plan, default_grid, default_ode_solver, resolve_options
from .models import NFE, Model, placement
from .schedules import GRIDS
from .expint import ODE_SOLVERS, integrate_ode
from .sde import SCHEMES, check_scheme, sdeint
from .solvers import StepInfo

__all__ = ["sample", "SampleResult", "METHODS"]

@dataclass
class SampleResult:
    """Samples and their tracked log-density.

    ``x``: ``(B, *event_shape)`` samples at ``t_min``. ``logp``: float64 ``(B,)``
    ``log p_{t_min}(x)`` (``None`` when not tracked). ``logp_stderr``: float64 ``(B,)``
    standard error of ``logp`` from the Monte-Carlo parts of the tracking (Hutchinson
    probes; docs/math.md s.9), ``None`` where the integrators report none. ``x_T``: the
    latents actually integrated, with ``prior_logp`` their log-density at ``t_max``.
    ``ts``: float64 ``(S + 1,)`` times of the accepted steps (all phases), ``logp_path``
    float64 ``(S + 1, B)`` the tracked log-density there. ``nfe``: network passes per sample.
    ``settings["logp_exact_for_flow"]``: whether every phase tracks the density of the
    model's own PF-ODE exactly (PF-ODE, prior guidance, density guidance at q = 0.5); where
    not, tracking relies on the score being that density's gradient, and on a learned
    network it can be biased beyond ``logp_stderr`` (:func:`~diffdensity.check_consistency`).
    """

    x: Tensor
    logp: Tensor | None
    nfe: NFE
    x_T: Tensor
    prior_logp: Tensor | None
    ts: Tensor
    logp_path: Tensor | None
    steps: int
    method: str
    settings: dict
    logp_stderr: Tensor | None = None

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.x.shape))
        if self.logp is None:
            logp = "logp=None"
        else:
            logp = f"logp mean {float(self.logp.mean()):.1f} nats"
            if self.logp_stderr is not None:
                logp += f" (stderr up to {float(self.logp_stderr.max()):.2g})"
        return f"SampleResult({self.method!r}, x {shape} {self.x.dtype}, {logp}, steps={self.steps}, nfe=[{self.nfe}])"


def _draw_latent(model: Model, n: Any, generator, dtype, device) -> Tensor:
    """``n`` prior draws ``(n, *event_shape)`` on the model's device in its dtype (unless given)."""
    n = v.check_positive_int(n, "n")
    event_shape = getattr(model, "event_shape", None)
    if event_shape is None:
        raise ValueError("the model has no event_shape: pass x_T of shape (B, *event_shape) instead of n")
    model_device, model_dtype = placement(model)
    dtype = dtype or model_dtype
    device = torch.device(device) if device is not None else model_device
    gen_device = generator.device if generator is not None else device
    z = torch.randn((n, *event_shape), generator=generator, dtype=dtype, device=gen_device).to(device)
    return z * model.schedule.prior_std


def _split_grid(grid: Tensor, ends: list[float]) -> list[Tensor]:
    """Cut the decreasing ``grid`` at the phase ends, moving the nearest free interior point onto each."""
    grid = grid.clone()
    tol = 1e-12 * max(1.0, float(grid.abs().max()))
    cuts = [0]
    for t_end in ends[:-1]:
        hit = (grid - t_end).abs() <= tol
        if hit.any():
            i = int(hit.nonzero()[0])
        else:
            j = int((grid > t_end).sum()) - 1  # grid[j] > t_end > grid[j + 1]
            candidates = [k for k in sorted((j, j + 1), key=lambda k: abs(float(grid[k]) - t_end)) if 0 < k < len(grid) - 1 and k > cuts[-1]]
            if candidates:
                i = candidates[0]
                grid[i] = t_end
            else:  # no free point (very few steps): insert one
                grid = torch.cat([grid[: j + 1], grid.new_tensor([t_end]), grid[j + 1 :]])
                i = j + 1
        cuts.append(max(i, cuts[-1]))
    cuts.append(len(grid) - 1)
    return [grid[a : b + 1] for a, b in zip(cuts[:-1], cuts[1:])]


def _resolve_solver(solver: str | None, phases: list[Phase], method: str, default_ode: str) -> list[str]:
    """The integrator of each phase: ``solver`` for the phases of its kind, defaults for the rest.

    ``solver`` is one name: an ODE solver of :data:`~diffdensity.expint.ODE_SOLVERS` (for
    deterministic phases) or a stochastic scheme of :data:`~diffdensity.sde.SCHEMES` (for
    stochastic ones, checked against what each dynamics supports); the two sets of names
    are disjoint.
    """
    if solver is not None:
        if not isinstance(solver, str) or solver not in (*ODE_SOLVERS, *SCHEMES):
            raise ValueError(
                f"unknown solver {solver!r}; expected an ODE solver {ODE_SOLVERS} "
                f"or a stochastic scheme {SCHEMES}"
            )
        stochastic = solver in SCHEMES
        if not any(p.stochastic == stochastic for p in phases):
            what = "stochastic" if stochastic else "deterministic"
            raise ValueError(f"solver {solver!r} integrates {what} phases, but method {method!r} has none")
    out = []
    for p in phases:
        given = solver if solver is not None and (solver in SCHEMES) == p.stochastic else None
        if p.stochastic:
            out.append(check_scheme(given, p.dynamics, "solver"))
        else:
            out.append(given or default_ode)
    return out


def _ode_phase(phase: Phase, x: Tensor, ts: Tensor, lp: Tensor | None, solver: str, track_logp: bool, **options: Any):
    """Integrate a deterministic phase with the ODE solver ``solver`` (any name of :data:`ODE_SOLVERS`).

    With ``P >= 2`` Hutchinson probes whose estimates enter only the log-density rate,
    the rates are kept per probe ``(P, B)``: their spread gives the standard error of
    the tracked ``log p`` (docs/math.md s.9), at no extra network pass.
    """
    dyn = phase.dynamics
    func = _require_rate(dyn, phase.name) if track_logp else dyn
    est = dyn.divergence
    watch = _StageSpread(func, dyn.begin_step) if track_logp else None
    with est.probe_rates(track_logp and not dyn.divergence_in_drift) if est is not None else contextlib.nullcontext():
        sol = integrate_ode(
            watch or func, x, ts, schedule=dyn.schedule, logp=lp, method=solver,
            begin_step=watch.begin_step if watch else dyn.begin_step, fsal=not dyn.step_dependent, **options,
        )  # fmt: skip
    if watch is not None:
        watch.warn_if_unresolved(phase.name, len(ts) - 1, math.prod(x.shape[1:]))
    return sol


class _StageSpread:
    """Flags steps too coarse for the tracked log-density, at no extra network pass.

    Within a step, the solver's stages evaluate the log-density rate at several times;
    ``sum over steps of |t_last - t_first| / 2 * |r_last - r_first|`` is the local-error
    estimate of the first-order (Euler) solution embedded in any multi-stage step (for a
    one-evaluation step, between it and the previous step's evaluation). It
    overestimates the error of the solver itself (it is zero only for a rate constant over
    each step), but it grows without bound when the steps do not resolve the dynamics:
    above half a nat per dimension the tracked value is not to be trusted, and sampling
    warns (measured on exact mixtures: there it separates 4 and 8 steps, off by 700 to
    190,000 nats, from 32 and more, within 0.4 nats).
    """

    def __init__(self, func: Callable, begin_step: Callable[[], None]):
        self.func, self._begin_step = func, begin_step
        self.stages: list[tuple[float, Tensor]] = []
        self._last: tuple[float, Tensor] | None = None
        self.total: Tensor | None = None

    def __call__(self, t: Tensor, x: Tensor):
        out = self.func(t, x)
        rate = out[1]
        if rate is not None:
            self.stages.append((float(t), (rate.mean(0) if rate.ndim == 2 else rate).detach().to(torch.float64)))
        return out

    def _close_step(self) -> None:
        # a one-evaluation (multistep) step compares its evaluation with the previous step's
        stages = self.stages if len(self.stages) != 1 or self._last is None else [self._last, *self.stages]
        if len(stages) >= 2:
            (t0, r0), (t1, r1) = stages[0], stages[-1]
            spread = 0.5 * abs(t1 - t0) * (r1 - r0).abs()
            self.total = spread if self.total is None else self.total + spread
        if self.stages:
            self._last = self.stages[-1]
        self.stages = []

    def begin_step(self) -> None:
        self._close_step()
        self._begin_step()

    def warn_if_unresolved(self, phase: str, steps: int, dim: int) -> None:
        self._close_step()
        if self.total is None:
            return
        worst = float(self.total.max())
        if worst > 0.5 * dim:
            warnings.warn(
                f"phase {phase!r}: {steps} steps do not resolve the tracked log-density (the solver's stages disagree by "
                f"up to {worst:.3g} nats over the phase, more than half a nat per dimension); the tracked log p may be far "
                f"off: use more steps",
                RuntimeWarning,
                stacklevel=6,  # the caller of sample()
            )


def _require_rate(dyn: Dynamics, phase: str) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``dyn`` for odeint with the variance of its rate, refusing to carry log p on silently when it returns no rate."""

    def func(t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        u, rate = dyn(t, x)
        if rate is None:
            raise RuntimeError(
                f"phase {phase!r}: {type(dyn).__name__} returned no log-density rate although track_logp=True "
                f"(build it with the context's dynamics_kwargs(), which passes the divergence estimator)"
            )
        return u, rate, dyn.rate_var(t)

    return func


def _describe(value: Any) -> Any:
    if callable(value) and not isinstance(value, (int, float, str)):
        return getattr(value, "__name__", type(value).__name__)
    return value


def sample(
    model: Model,
    n: int | None = None,
    *,
    x_T: Tensor | None = None,
    method: str = "pf-ode",
    steps: int | None = None,
    solver: str | None = None,
    grid: str | None = None,
    track_logp: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    divergence: str | DivergenceEstimator = "hutchinson",
    probes: int = 1,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    **method_options: Any,
) -> SampleResult:
    """Draw samples and track ``log p_{t_min}`` of each one along its trajectory.

    Args:
        model: a score model (``.score(x, t, **cond)`` and ``.schedule``).
        n: number of samples, drawn as ``x_T ~ N(0, sigma_T^2 I)`` (needs
            ``model.event_shape``); or give ``x_T`` ``(B, *event_shape)`` instead.
        method: a name in :data:`diffdensity.methods.METHODS` -- ``"pf-ode"``, ``"sde"``, ``"hd"``,
            ``"custom"`` or a registered one. Its options are
            passed as keywords (``log_snr_threshold=`` for ``"hd"``, ``drift=`` /
            ``diffusion=`` for ``"custom"``, ...); unknown ones raise ``ValueError``.
        steps: steps on ``grid`` from ``t_max`` to ``t_min``, shared by all phases
            (each phase boundary moves the nearest grid point onto itself); default
            per method (64 for ODEs, 256 for ``"sde"``).
        solver: ODE phases take a name of :data:`~diffdensity.expint.ODE_SOLVERS`
            (``"exp-heun"``, default for learned networks; ``"heun"``, default for exact
            scores; ``"rk4"``, adaptive ``"dopri5"`` with ``rtol`` / ``atol``, ...); stochastic phases a scheme of :mod:`diffdensity.sde`
            (``"tweedie-jvp"`` default for the reverse SDE of a learned network,
            ``"tweedie"`` for exact scores, ``"ancestral"``,
            ``"euler-maruyama"``; each dynamics says which it supports). One name: it
            applies to the phases of its kind, the others keep their default.
        grid: ``"log_snr"``, ``"tapered"``, ``"uniform"`` or ``"karras"`` (``Schedule.time_grid``); default
            ``"tapered"`` for ODE methods on learned networks, else ``"log_snr"`` (``methods.DEFAULT_GRIDS``).
        track_logp: carry the log-density (``False``: plain sampling, same ``x``).
        generator: the only source of randomness (latents, Brownian increments and,
            through a seed drawn from it, Hutchinson probes): same seed, same result,
            with or without tracking.
        callback: called with a :class:`~diffdensity.solvers.StepInfo` after every step.
        model_kwargs: conditioning passed to ``model.score``.
        divergence, probes: estimator of ``div s`` for dynamics that need it when tracking
            (``"hutchinson"``: ``probes`` Rademacher probes per evaluation, in the image DCT
            basis for images; ``"exact"``; or an estimator instance).
        prior_logp: ``log p_{t_max}`` of the latents (default the Gaussian prior).
        dtype, device: of the drawn latents (default: the model's, else float32 on the CPU).

    Returns:
        :class:`SampleResult` with ``.x``, ``.logp`` (float64 ``(B,)`` or ``None``),
        ``.nfe``, the per-step ``.logp_path`` / ``.ts`` and the settings.
    """
    v.check_model(model)
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}")
    spec = METHODS[method]
    options = resolve_options(spec, method_options)
    steps = spec.default_steps if steps is None else v.check_positive_int(steps, "steps")
    v.check_choice(grid, "grid", (None, *GRIDS))
    v.check_positive_int(probes, "probes")
    if not isinstance(track_logp, bool):
        raise TypeError(f"track_logp must be a bool, got {type(track_logp).__name__}")
    v.check_generator(generator)
    for value, what in ((callback, "callback(info)"), (prior_logp, "prior_logp(x_T) -> (B,)")):
        if value is not None and not callable(value):
            raise TypeError(f"{what.partition('(')[0]} must be callable as {what}")
    est = make_divergence(divergence, probes, solver=solver)
    x_T = _latents(model, n, x_T, generator, dtype, device)
    ctx = MethodContext(model, model.schedule, x_T, options, track_logp, est, v.check_kwargs(model_kwargs), NFE())
    run = dict(method=method, steps=steps, grid=grid, solver=solver, generator=generator, callback=callback,
               prior_logp=prior_logp, rtol=rtol, atol=atol, est=est)  # fmt: skip
    return _run_plans(spec.build(ctx), ctx, _probe_generator(generator), run)


def _latents(model: Model, n: Any, x_T: Tensor | None, generator, dtype, device) -> Tensor:
    """The given latents (checked) or ``n`` drawn from the prior."""
    if x_T is not None:
        x_T = v.check_x(x_T, model, name="x_T")
        if n is not None and n != x_T.shape[0]:
            raise ValueError(f"n={n!r} disagrees with the batch of x_T ({x_T.shape[0]}); give one of them")
        return x_T
    if n is None:
        raise ValueError("give the number of samples n or the latents x_T")
    return _draw_latent(model, n, generator, dtype, device)


def _probe_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """Hutchinson probes get their own stream, seeded from ``generator`` whether or not they
    are used, so that tracking never changes the samples."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=generator.device).manual_seed(seed)


def _run_plans(plan: Plan, ctx: MethodContext, probe_gen: torch.Generator | None, run: dict[str, Any]) -> SampleResult:
    """Run ``plan`` and the follow-up plans its ``then`` asks for; the last pass's result."""
    probe_seed = None if probe_gen is None else probe_gen.initial_seed()
    passes = 0
    while True:
        result = _run_plan(plan, ctx, probe_gen=probe_gen, **run)
        passes += 1
        plan = plan.then(result) if plan.then is not None else None
        if plan is None:
            result.settings["passes"] = passes
            return result
        if plan.reuse_probes and probe_seed is not None:
            probe_gen = torch.Generator(device=probe_gen.device).manual_seed(probe_seed)


def _run_plan(plan: Plan, ctx: MethodContext, *, method, steps, grid, solver, probe_gen, generator, callback, prior_logp, rtol, atol, est) -> "SampleResult":
    """Integrate the phases of one plan from its latents; the result of this pass."""
    model, sched, x_T, track_logp, nfe, options = ctx.model, ctx.schedule, ctx.x_T, ctx.track_logp, ctx.nfe, ctx.options
    if not plan.phases:
        raise RuntimeError(f"method {method!r} built no phase")
    ends = [float(p.t_end) for p in plan.phases]
    if any(b > a for a, b in zip([sched.t_max] + ends, ends)) or abs(ends[-1] - sched.t_min) > 1e-12 * max(1.0, abs(sched.t_min)):
        raise RuntimeError(f"method {method!r}: phase ends {ends} must decrease from t_max to t_min={sched.t_min:g}")
    x = x_T if plan.x_T is None else v.check_x(plan.x_T, model, name="x_T from the method")
    solvers = _resolve_solver(solver, plan.phases, method, default_ode_solver(model))
    grid = grid or default_grid(model, plan.phases)
    pieces = _split_grid(sched.time_grid(steps, spacing=grid), ends)

    lp0 = None
    if track_logp:
        lp0 = (prior_logp or sched.prior_log_prob)(x)
        if not isinstance(lp0, Tensor) or lp0.shape != (x.shape[0],):
            raise ValueError(f"prior_logp must return a ({x.shape[0]},) tensor")
        lp0 = lp0.to(torch.float64)
    lp, var = lp0, None
    times: list[Tensor] = []
    paths: list[Tensor] = []
    offset, phase_log = 0, []
    watch = _FiniteWatch(model, ctx.cond)
    with torch.no_grad():
        for k, (phase, ts, name) in enumerate(zip(plan.phases, pieces, solvers)):
            if len(ts) < 2:
                continue
            dyn = phase.dynamics
            dyn.reset(probe_gen)
            if phase.start is not None:
                phase.start(float(ts[0]), x)
            first = offset == 0

            def cb(info: StepInfo, _offset=offset, _first=first) -> None:
                watch(info, phase.name)
                if callback is not None and (info.step > 0 or _first):
                    callback(StepInfo(info.step + _offset, info.t, info.x, info.logp))

            if phase.stochastic:
                sol = sdeint(dyn, x, ts, logp=lp, scheme=name, generator=generator, callback=cb, begin_step=dyn.begin_step)
            else:
                sol = _ode_phase(phase, x, ts, lp, name, track_logp, rtol=rtol, atol=atol, callback=cb)
            x, lp = sol.x, sol.logp
            var = _add_variance(var, getattr(sol, "logp_var", None))
            times.append(sol.ts if first else sol.ts[1:])
            if sol.logp_path is not None:
                paths.append(sol.logp_path if first else sol.logp_path[1:])
            phase_log.append(dict(name=phase.name, solver=name, t_start=float(ts[0]), t_end=float(ts[-1]), steps=sol.steps))
            offset += sol.steps
    settings = dict(
        method=method,
        options={k: _describe(val) for k, val in options.items()},
        steps=steps,
        grid=grid,
        solvers=solvers,
        divergence=repr(est) if track_logp else None,
        track_logp=track_logp,
        phases=phase_log,
        logp_exact_for_flow=all(getattr(p.dynamics, "flow_exact", False) for p in plan.phases),
        **plan.info,
    )
    return SampleResult(
        x=x,
        logp=lp,
        nfe=nfe,
        x_T=x_T if plan.x_T is None else plan.x_T,
        prior_logp=lp0,
        ts=torch.cat(times),
        logp_path=torch.cat(paths) if paths else None,
        steps=offset,
        method=method,
        settings=settings,
        logp_stderr=None if var is None or not track_logp else var.clamp_min(0).sqrt(),
    )


class _FiniteWatch:
    """Stops sampling at the first step whose state (or log-density) is not finite, saying why.

    The last finite state tells the two causes apart: a network that returns NaN/Inf at a
    moderate state (broken weights, inputs it cannot take), or a state that grew without
    bound first, a step too large for the dynamics (then more steps or another grid help).
    """

    def __init__(self, model: Model, cond: dict[str, Any]):
        self.model, self.cond, self.last = model, cond, None

    def __call__(self, info: StepInfo, phase: str) -> None:
        bad = ~torch.isfinite(info.x.reshape(info.x.shape[0], -1)).all(1)
        if info.logp is not None:
            bad |= ~torch.isfinite(info.logp)
        if not bad.any():
            self.last = (info.t, info.x)
            return
        idx = bad.nonzero().flatten().tolist()
        where = f"samples {idx[:8]}{' ...' if len(idx) > 8 else ''} (of {info.x.shape[0]})"
        if self.last is None:
            raise FloatingPointError(f"phase {phase!r}: the state is not finite at its start (t={info.t:g}) for {where}")
        t0, x0 = self.last
        size = float(x0[bad].abs().max())
        if size <= 1e6 * max(1.0, self.model.schedule.prior_std):
            s = self.model.score(x0, torch.full((x0.shape[0],), t0, dtype=torch.float64, device=x0.device), **self.cond)
            if not torch.isfinite(s[bad]).all():
                raise FloatingPointError(
                    f"phase {phase!r}: the model's score is NaN or Inf at t={t0:g} for {where}; the network (or its "
                    f"weights or conditioning) produces non-finite values there - more steps will not help"
                )
        raise FloatingPointError(
            f"phase {phase!r}: the integration diverged between t={t0:g} and t={info.t:g} for {where} (|x| reached "
            f"{size:.3g}); the step is too large for these dynamics: use more steps or another grid"
        )


def _add_variance(total: Tensor | None, var: Tensor | None) -> Tensor | None:
    """Variances of independent phases add; a phase that reports none adds nothing."""
    if var is None:
        return total
    var = var.to(torch.float64)
    return var if total is None else total + var
