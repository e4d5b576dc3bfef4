"""Controlling log-density: density guidance and prior guidance (docs/math.md s.4a-4c).

Density guidance asks the sampler for a chosen rate ``b_t`` of ``d/dt log p_t(x_t)``.
Among ODEs with that rate the one closest to the PF-ODE moves along the score:

    u~ = u_PF + k s,    k = (div u_PF + b) / |s|^2   =>   u~ = f x - (1/2) g^2 eta s,
    eta = 1 - 2 k / g^2.

The quantile rate ``b^q = -div u_PF - (1/2) g^2 sqrt(2D) Phi^-1(q) / sigma^2`` cancels the
divergence, ``eta = 1 + sqrt(2D) Phi^-1(q) / |sigma s|^2``, so DG-ODE costs exactly what
the PF-ODE costs. ``q > 0.5`` raises ``log p_0`` (smoother samples), ``q < 0.5`` lowers
it (more detail), ``q = 0.5`` is the PF-ODE.

Stochastic density guidance (DG-SDE, docs/math.md s.4b) adds noise ``phi P dW`` projected
orthogonally to the score, ``P = I - s s^T / |s|^2``, with ``phi = phi~(t) g(t)``, and the
drift correction ``+(1/2) g^2 phi~^2 (div s / |s|^2) s`` that cancels its Ito term: the
log-density keeps the DG-ODE rate up to the residual ``-(1/2) phi^2 s^T (grad s) s / |s|^2``
(neglected by default, computed with one more JVP with ``residual=True``).

Guard: near a mode ``|s|`` vanishes and ``eta`` blows up (low dimension, ``q > 0.5``).
``eta - 1`` is clamped to ``[-eta_cap, eta_cap]``; the tracked log-density always
uses the clamped ``eta``, i.e. the dynamics actually integrated (docs/math.md s.3b):

    d/dt log p_t(x_t) = -div u_PF + s . (u~ - u_PF) = -div u_PF - (1/2) g^2 (eta - 1) |s|^2.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from . import _validation as v
from .divergence import jacobian_vector_product, model_fn
from .dynamics import PFODE, Dynamics, SDEDynamics, SDETerms, _dot, _expand
from .expint import exp_step
from .noise_windows import NOISE_WINDOWS, noise_schedule
from .methods import REQUIRED, Option, Phase, Plan, register_method
from .schedules import Schedule
from .shooting import next_z, reencode_result

__all__ = [
    "DensityGuidedODE",
    "StochasticDensityGuidance",
    "NOISE_WINDOWS",
    "noise_schedule",
    "chi_quantile",
    "normal_quantile",
    "rescale_latent",
]

def normal_quantile(q: Tensor | float) -> Tensor:
    """``Phi^-1(q)`` for ``q`` in (0, 1), float64."""
    q = torch.as_tensor(q, dtype=torch.float64)
    if not ((q > 0) & (q < 1)).all():
        raise ValueError(f"q must lie strictly between 0 and 1, got {q.tolist()}")
    return torch.special.ndtri(q)


def chi_quantile(q: float, dim: int) -> float:
    """Quantile of the chi distribution with ``dim`` degrees of freedom (norm of a standard normal in R^dim).

    Solves ``P(dim/2, r^2/2) = q`` (regularised lower incomplete gamma) by bisection on
    a Wilson-Hilferty bracket, to float64 precision.
    """
    if not 0 < q < 1:
        raise ValueError(f"q must lie strictly between 0 and 1, got {q}")
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    a = torch.tensor(dim / 2, dtype=torch.float64)
    z = float(normal_quantile(q))
    guess = dim * max(1 - 2 / (9 * dim) + z * math.sqrt(2 / (9 * dim)), 1e-3) ** 3  # chi^2 quantile
    lo, hi = 0.0, max(4 * guess, 50.0)
    while float(torch.special.gammainc(a, torch.tensor(hi / 2, dtype=torch.float64))) < q:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.special.gammainc(a, torch.tensor(mid / 2, dtype=torch.float64))) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return math.sqrt(0.5 * (lo + hi))


def rescale_latent(x_T: Tensor, q: float, schedule: Schedule) -> Tensor:
    """Prior guidance (docs/math.md s.4c): ``x_T * sigma_T chi_D^-1(q) / |x_T|``, per sample.

    ``q = 0.5`` puts every latent at the prior's median norm.
    """
    dim = math.prod(x_T.shape[1:])
    norm = x_T.reshape(x_T.shape[0], -1).to(torch.float64).norm(dim=1)
    if (norm == 0).any():
        raise ValueError("cannot rescale a latent of norm 0")
    scale = schedule.prior_std * chi_quantile(q, dim) / norm
    return x_T * scale.to(x_T.dtype).reshape(-1, *([1] * (x_T.ndim - 1)))


class _EtaGuard:
    """Records, per sample, whether ``|eta - 1|`` hit its bound, and warns once."""

    eta_cap: float
    capped: Tensor | None = None

    def _clamp(self, shift: Tensor) -> Tensor:
        over = shift.abs() > self.eta_cap
        if self.capped is None or self.capped.shape != over.shape:
            self.capped = torch.zeros_like(over)
        self.capped |= over
        return shift.clamp(-self.eta_cap, self.eta_cap)

    def warn_if_capped(self) -> None:
        """Warn once if the eta bound was active for any sample."""
        if self.capped is not None and self.capped.any():
            n = int(self.capped.sum())
            warnings.warn(
                f"density guidance asked for more than the model can give for {n} of {self.capped.numel()} samples "
                f"(|sigma s|^2 too small near a mode); |eta - 1| was capped at {self.eta_cap:g}, and the tracked "
                f"log-density is that of the capped dynamics",
                RuntimeWarning,
                stacklevel=3,
            )


def _quantile_shift(z: Tensor, dim: int, sigma: Tensor, s2: Tensor) -> Tensor:
    """``eta - 1 = sqrt(2D) Phi^-1(q) / |sigma s|^2``."""
    return math.sqrt(2 * dim) * z.to(s2.device) / (sigma**2 * s2)


def _sq_norm(s: Tensor) -> Tensor:
    return _dot(s, s).clamp_min(torch.finfo(torch.float64).tiny)


class DensityGuidedODE(_EtaGuard, Dynamics):
    """Density-guided probability-flow ODE ``u = f x - (1/2) g^2 eta s``.

    Give either ``q`` (a quantile in (0, 1), scalar or ``(B,)``: the DG-ODE), or ``z``
    (``Phi^-1(q)`` directly, for quantiles too extreme for float64), or ``rate``
    (``b(x, t) -> (B,)``, the wanted ``d/dt log p_t``; needs ``divergence``). With a
    ``divergence`` estimator the log-density is tracked. ``eta_cap`` bounds ``|eta - 1|``;
    ``capped`` records, per sample, whether the bound was ever active.
    """

    def __init__(
        self,
        model,
        *,
        q: Tensor | float | None = None,
        rate: Callable[[Tensor, Tensor], Tensor] | None = None,
        z: Tensor | float | None = None,
        eta_cap: float = 10.0,
        **kwargs: Any,
    ):
        super().__init__(model, **kwargs)
        if sum(a is not None for a in (q, rate, z)) != 1:
            raise ValueError("give exactly one of q (quantile), z (its normal score) or rate (a callable b(x, t))")
        if rate is not None and self.divergence is None:
            raise ValueError("a user rate b(x, t) needs a divergence estimator (div u_PF enters the drift)")
        if not eta_cap > 0:
            raise ValueError(f"eta_cap must be positive, got {eta_cap}")
        self.z = normal_quantile(q) if q is not None else None if z is None else torch.as_tensor(z, dtype=torch.float64)
        self.rate_fn, self.eta_cap = rate, float(eta_cap)
        self.divergence_in_drift = rate is not None  # div u_PF enters the drift

    @property
    def flow_exact(self) -> bool:
        """At ``q = 0.5`` for every sample the dynamics are the PF-ODE and the rate is exact (:class:`~diffdensity.dynamics.Dynamics`)."""
        return self.rate_fn is None and bool((self.z == 0).all())

    def __call__(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        sv = self.schedule(t)
        dim = math.prod(x.shape[1:])
        b = x.shape[0]
        if self.divergence is None:
            s, div_u = self.score(t, x), None
        else:
            s, lap = self.score_and_laplacian(t, x)
            div_u = dim * sv.f - 0.5 * sv.g2 * lap
        s2 = _sq_norm(s)
        if self.z is not None:
            shift = _quantile_shift(self.z, dim, sv.sigma, s2)
        else:
            wanted = self.rate_fn(x, t.expand(b)).to(torch.float64)
            shift = -2 * (div_u + wanted) / (sv.g2 * s2)
        shift = self._clamp(shift)
        u = _expand(sv.f, x) * x - 0.5 * _expand(sv.g2, x) * _expand(1 + shift, x) * s
        rate = None if div_u is None else -div_u - 0.5 * sv.g2 * shift * s2
        return u, rate


class StochasticDensityGuidance(_EtaGuard, SDEDynamics):
    """DG-SDE: ``dx = u dt + phi P dW_bar`` with the quantile ``q`` of the DG-ODE (docs/math.md s.4b).

    ``u = f x - (1/2) g^2 (eta - phi~^2 div s / |s|^2) s``, ``phi = phi~(t) g(t)``, ``div s``
    by the divergence estimator (Hutchinson). The log-density rate is computed for the
    drift actually integrated (after the ``eta_cap`` guard) from docs/math.md s.3d,

        d log p / dtau = D f - (1/2) g^2 div s + (1/2) g^2 (kappa - 1) |s|^2 + (1/2) phi^2 (div s - R),

    with ``kappa`` the drift's score coefficient and ``R = s^T (grad s) s / |s|^2``, taken
    as 0 unless ``residual=True``; the noise term ``s . P dW`` vanishes.

    Integrators (:func:`diffdensity.sde.sdeint`): ``"split-heun"`` (the default) splits a
    step into a Heun step of the DG-ODE from ``t`` to ``t'``, tracked as the DG-ODE, and
    one kick at ``t'``: the projected noise ``phi sqrt(h) P z`` with its drift correction
    ``(1/2) g^2 h phi~^2 (div s / |s|^2) s``, which leaves ``log p`` unchanged to first
    order (``-(1/2) phi^2 h R`` with ``residual=True``). Two passes per step, three inside
    the noise window. ``"euler-maruyama"`` integrates :meth:`terms` as before; its bias is
    of order ``D h`` (docs/guidance.md).
    """

    schemes = ("split-heun", "split-exp-heun", "euler-maruyama")

    def __init__(self, model, *, q: Tensor | float, noise: Any = "late", eta_cap: float = 10.0, residual: bool = False, **kwargs: Any):
        super().__init__(model, **kwargs)
        if self.divergence is None:
            raise ValueError("stochastic density guidance needs a divergence estimator (div s enters its drift)")
        if not eta_cap > 0:
            raise ValueError(f"eta_cap must be positive, got {eta_cap}")
        self.z, self.eta_cap, self.residual = normal_quantile(q), float(eta_cap), bool(residual)
        self.phi_tilde = noise_schedule(noise, self.schedule)
        div = self.divergence if self.track_logp else None
        self.ode = DensityGuidedODE(model, z=self.z, eta_cap=self.eta_cap, divergence=div, cond=self.cond, nfe=self.nfe)

    def split_step(self, t: float, t_next: float, x: Tensor, generator: torch.Generator | None, track: bool, scheme: str = "split-heun"):
        """One split step from ``t`` to ``t_next < t``: ``(x', d logp or None, its variance or None)``.

        ``"split-heun"``: the DG-ODE part by Heun in ``t``; ``"split-exp-heun"``: by the
        exponential Heun step of :mod:`diffdensity.expint` (for learned networks).
        """
        h, ode = t - t_next, self.ode
        t0, t1 = torch.tensor(t, dtype=torch.float64), torch.tensor(t_next, dtype=torch.float64)
        if scheme == "split-exp-heun":
            x_new, dlogp, _ = exp_step(ode, self.schedule, t, t_next, x, track=track)
            v = self.divergence_var() if track else None
            # the rate's div s enters with (1/2) g^2; both stages at the last stage's variance, fully correlated
            var = None if v is None else (0.5 * h * float(self.schedule(t1).g2)) ** 2 * v
        else:
            u1, r1 = ode(t0, x)
            v1 = self.divergence_var() if track else None
            u2, r2 = ode(t1, x - h * u1)
            v2 = self.divergence_var() if track else None
            x_new = x - 0.5 * h * (u1 + u2)
            dlogp = None if not track else -0.5 * h * (r1 + r2)
            # Var of -(h/2)(r1 + r2), r_i = ... + (1/2) g_i^2 div s: stages share probes, so the
            # Cauchy-Schwarz bound (sd1 + sd2)^2 (docs/math.md s.9)
            c1, c2 = 0.5 * float(self.schedule(t0).g2), 0.5 * float(self.schedule(t1).g2)
            var = None if v1 is None or v2 is None else (0.5 * h) ** 2 * (c1 * v1.sqrt() + c2 * v2.sqrt()) ** 2
        if ode.capped is not None:
            self.capped = ode.capped.clone() if self.capped is None else self.capped | ode.capped
        phi_t = self.phi_tilde(t1)
        if phi_t > 0:
            x_new, d_kick = self._kick(t1, x_new, phi_t, h, generator)
            if track and d_kick is not None:
                dlogp = dlogp + d_kick
        return x_new, dlogp, var

    def _kick(self, t: Tensor, x: Tensor, phi_t: float, h: float, generator: torch.Generator | None):
        """The projected noise and its drift correction at ``t``: ``(x', d logp of the residual or None)``."""
        g2 = self.schedule(t).g2
        s, lap = self.score_and_laplacian(t, x)
        s2 = _sq_norm(s)
        corr = self._clamp(phi_t**2 * lap / s2)
        unit = s / _expand(s2.sqrt(), s)
        device = generator.device if generator is not None else x.device
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
        phi = phi_t * float(g2.sqrt())
        x_new = x - 0.5 * h * _expand(g2 * corr, x) * s + phi * math.sqrt(h) * (z - unit * _expand(_dot(unit, z), z))
        if not self.residual:
            return x_new, None
        _, js, _ = jacobian_vector_product(model_fn(self.model, self._t(t, x), self.cond), x, s)
        self.nfe.jvp += 1
        return x_new, -0.5 * phi**2 * h * _dot(s, js) / s2

    def terms(self, t: Tensor, x: Tensor) -> SDETerms:
        sv = self.schedule(t)
        dim = math.prod(x.shape[1:])
        phi_t = self.phi_tilde(t)
        if phi_t > 0 or self.track_logp:
            s, lap = self.score_and_laplacian(t, x)
        else:
            s, lap = self.score(t, x), None
        s2 = _sq_norm(s)
        shift = _quantile_shift(self.z, dim, sv.sigma, s2)
        correction = phi_t**2 * lap / s2 if phi_t > 0 else torch.zeros_like(s2)
        kappa_minus_1 = self._clamp(shift - correction)
        u = _expand(sv.f, x) * x - 0.5 * _expand(sv.g2, x) * _expand(1 + kappa_minus_1, x) * s
        phi = (phi_t * sv.g2.sqrt()).to(torch.float64).expand(x.shape[0])
        rate = None
        if self.track_logp:
            rate = dim * sv.f - 0.5 * sv.g2 * lap + 0.5 * sv.g2 * kappa_minus_1 * s2 + 0.5 * phi**2 * lap
            if self.residual and phi_t > 0:
                fn = model_fn(self.model, self._t(t, x), self.cond)
                _, js, _ = jacobian_vector_product(fn, x, s)
                self.nfe.jvp += 1
                rate = rate - 0.5 * phi**2 * _dot(s, js) / s2
        unit = s / _expand(s2.sqrt(), s)

        def project(dw: Tensor) -> Tensor:
            return _expand(phi, dw) * (dw - unit * _expand(_dot(unit, dw), dw))

        var = self.divergence_var() if rate is not None else None
        # the rate's div s terms add up to -(1/2) g^2 div s (the drift correction cancels the noise's)
        rate_var = None if var is None else (0.5 * sv.g2) ** 2 * var
        return SDETerms(u, phi, s, rate, noise_fn=project, rate_var=rate_var)


# -- sampling methods ---------------------------------------------------------------------
# Registered in diffdensity.methods when this module is imported: guidance changes the
# dynamics, never the solver.


def _check_quantiles(value: Any, name: str) -> Tensor:
    q = torch.as_tensor(value, dtype=torch.float64)
    if q.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a (B,) tensor, got shape {tuple(q.shape)}")
    normal_quantile(q)  # range check
    return q


def _check_targets(value: Any, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim > 1 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be a finite scalar or (B,) tensor of log-densities in nats")
    return t


def _per_sample(value: Tensor | None, batch: int, name: str) -> Tensor | None:
    if value is None or value.ndim == 0:
        return value
    if value.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(value.shape)}, but there are {batch} samples")
    return value


def _guided_latent(ctx) -> Tensor | None:
    """The latents rescaled to the prior's median norm (``latent="median"``), else None."""
    return rescale_latent(ctx.x_T, 0.5, ctx.schedule) if ctx.options["latent"] == "median" else None


def _warn_after(dyn: _EtaGuard):
    def then(result):
        dyn.warn_if_capped()
        return None

    return then


def _build_density_guidance(ctx):
    o = ctx.options
    given = [k for k in ("q", "rate", "target_logp") if o[k] is not None]
    if len(given) != 1:
        raise ValueError(f"method 'density-guidance' needs exactly one of q, rate or target_logp; got {given or 'none'}")
    b = ctx.x_T.shape[0]
    x_T = _guided_latent(ctx)
    if o["target_logp"] is not None:
        return _target_plan(ctx, x_T, _per_sample(o["target_logp"], b, "target_logp"))
    kw = ctx.dynamics_kwargs()
    if o["rate"] is not None:
        kw["divergence"] = ctx.divergence  # div u_PF enters the drift
    dyn = DensityGuidedODE(ctx.model, q=_per_sample(o["q"], b, "q"), rate=o["rate"], eta_cap=o["eta_cap"], **kw)
    return Plan([Phase(dyn, ctx.schedule.t_min, "dg-ode")], x_T=x_T, then=_warn_after(dyn))


def _target_plan(ctx, x_T: Tensor | None, target: Tensor):
    """Shooting on ``z = Phi^-1(q)`` per sample until ``log p_0`` meets ``target``.

    ``log p_0`` (tracked, or re-encoded with ``target_measure="reencoded"``) increases with
    ``z``. Pass 0 runs at ``z = 0`` (the PF-ODE). Until a sample's target is bracketed
    by two passes, the next ``z`` is a secant step (the first one with the slope the
    quantile rate injects, ``sqrt(2D) (lambda_max - lambda_min) / 2`` per unit of ``z``),
    at most :data:`~diffdensity.shooting.MAX_DZ` away; once bracketed, regula falsi inside the bracket (a bisection
    after two passes on the same side of the target). It stops
    when every sample is within ``target_tol`` nats or ``target_passes`` passes are
    spent. Every pass reuses the same latents and Hutchinson probes.
    """
    if not ctx.track_logp:
        raise ValueError("target_logp needs track_logp=True (the tracked log-density steers the shooting)")
    b = ctx.x_T.shape[0]
    target = target.expand(b).to(ctx.x_T.device)
    o = ctx.options
    slope0 = 0.5 * math.sqrt(2 * ctx.dim) * (ctx.schedule.log_snr_max - ctx.schedule.log_snr_min)
    history: list[tuple[Tensor, Tensor]] = []

    def plan_for(z: Tensor):
        dyn = DensityGuidedODE(ctx.model, z=z, eta_cap=o["eta_cap"], **ctx.dynamics_kwargs())
        return Plan([Phase(dyn, ctx.schedule.t_min, "dg-ode")], x_T=x_T, then=lambda res: after(z, dyn, res), reuse_probes=True)

    def after(z: Tensor, dyn, res):
        if o["target_measure"] == "reencoded":
            reencode_result(ctx, res)
        history.append((z, res.logp))
        miss = target - res.logp
        res.settings["target_passes"] = len(history)
        res.settings["target_max_miss"] = float(miss.abs().max())
        res.settings["target_z"] = [float(v) for v in z]
        if miss.abs().max() <= o["target_tol"] or len(history) >= o["target_passes"]:
            dyn.warn_if_capped()
            return None
        return plan_for(next_z(history, target, slope0))

    return plan_for(torch.zeros(b, dtype=torch.float64, device=ctx.x_T.device))


def _build_stochastic_density_guidance(ctx):
    o = ctx.options
    kw = ctx.dynamics_kwargs()
    kw["divergence"] = ctx.divergence  # div s enters the drift correction
    dyn = StochasticDensityGuidance(
        ctx.model, q=_per_sample(o["q"], ctx.x_T.shape[0], "q"), noise=o["noise"], eta_cap=o["eta_cap"],
        residual=o["residual"], track_logp=ctx.track_logp, **kw,
    )  # fmt: skip
    return Plan([Phase(dyn, ctx.schedule.t_min, "dg-sde")], x_T=_guided_latent(ctx), then=_warn_after(dyn))


def _build_prior_guidance(ctx):
    q = ctx.options["q"]  # checked by _check_quantiles
    if q.ndim != 0:
        raise ValueError("prior guidance takes one quantile q for all latents")
    x_T = rescale_latent(ctx.x_T, float(q), ctx.schedule)
    return Plan([Phase(PFODE(ctx.model, **ctx.dynamics_kwargs()), ctx.schedule.t_min, "pf-ode")], x_T=x_T)


def _check_noise(value: Any, name: str) -> Any:
    if callable(value) or isinstance(value, str) or isinstance(value, (list, tuple)):
        return value
    raise ValueError(f"{name} must be 'early', 'late', a list of (log_snr_low, log_snr_high, phi) windows or a callable phi(t)")


_LATENT = Option("median", v.choice("median", "keep"), "'median': rescale latents to the prior's median norm (the paper's default); 'keep'")
_ETA_CAP = Option(10.0, v.check_positive_float, "bound on |eta - 1| (guards against |s| ~ 0 near modes)")
register_method(
    "density-guidance",
    _build_density_guidance,
    options={
        "q": Option(None, v.optional(_check_quantiles), "quantile in (0, 1), scalar or (B,): > 0.5 smoother, < 0.5 more detail"),
        "rate": Option(None, v.optional(v.check_callable), "b(x, t) -> (B,): the wanted d/dt log p_t (needs div u_PF)"),
        "target_logp": Option(None, v.optional(_check_targets), "wanted log p_0 in nats, scalar or (B,) (shooting, several passes)"),
        "target_tol": Option(0.5, v.check_positive_float, "target mode: stop once every sample is this close (nats)"),
        "target_passes": Option(5, lambda value, name: int(v.check_positive_float(value, name)), "target mode: at most this many sampling passes"),
        "target_measure": Option("tracked", lambda value, name: v.check_choice(value, name, ("tracked", "reencoded")),
                                 "target mode: steer by the tracked log p_0, or by re-encoding each pass's samples with log_likelihood "
                                 "(the density of the sample produced, where tracking off the PF-ODE is biased; a likelihood solve per pass)"),
        "latent": _LATENT,
        "eta_cap": _ETA_CAP,
    },
    default_steps=64,
    description="density guidance, DG-ODE (docs/math.md s.4a): chosen quantile, rate or final log-density",
)
register_method(
    "stochastic-density-guidance",
    _build_stochastic_density_guidance,
    options={
        "q": Option(REQUIRED, _check_quantiles, "quantile in (0, 1), scalar or (B,)"),
        "noise": Option("late", _check_noise, "phi~(t): 'early', 'late', [(log_snr_low, log_snr_high, phi), ...] or a callable"),
        "residual": Option(False, v.choice(False, True), "include the small term -(1/2) phi^2 s^T grad s s / |s|^2 (one more JVP)"),
        "latent": _LATENT,
        "eta_cap": _ETA_CAP,
    },
    default_steps=128,
    description="stochastic density guidance, DG-SDE (docs/math.md s.4b): noise orthogonal to the score",
)
register_method(
    "prior-guidance",
    _build_prior_guidance,
    options={"q": Option(REQUIRED, _check_quantiles, "chi quantile of the latent norm, in (0, 1)")},
    default_steps=64,
    description="prior guidance (docs/math.md s.4c): latents rescaled to a chi quantile, then the PF-ODE",
)
