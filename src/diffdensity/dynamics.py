"""What a sampler integrates: drift, noise and log-density rate (docs/math.md s.3-4).

Deterministic dynamics are called as ``dyn(t, x) -> (dx/dt, d log p_t(x_t)/dt)`` with
``t`` a float64 scalar tensor and ``x`` ``(B, *event_shape)``; the rate is float64
``(B,)`` or ``None`` when log-density is not tracked. The same object serves both
directions: integrating forward in ``t`` (data -> noise, likelihood) or backward
(sampling). Any ODE solver of :mod:`diffdensity.solvers` integrates them.

Stochastic dynamics (:class:`SDEDynamics`) describe ``dx = u dt + G dW_bar`` integrated
backwards in ``t`` and return their coefficients as :class:`SDETerms`; the integrators
of :mod:`diffdensity.sde` turn them into steps.

=====================  ==========================================  ====================
class                  drift ``u`` (``dx/dt``)                     log-density (MATH)
=====================  ==========================================  ====================
:class:`PFODE`         ``f x - g^2 s / 2``                         ``-div u_PF``  (3a)
:class:`HDODE`         ``f x - g^2 s``                             3b
:class:`CustomODE`     user ``u(x, t, s)``                         3b
:class:`ReverseSDE`    ``f x - g^2 s``, noise ``g dW``             3c (no divergence)
:class:`CustomSDE`     user ``u(x, t, s)``, noise ``phi dW``       3d
=====================  ==========================================  ====================

Tracking the log-density changes what is computed alongside the state, never the
drift: with tracking off the same ``x`` path results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .divergence import DivergenceEstimator, jacobian_vector_product, model_fn
from .kernels import GaussianKernel, tweedie_kernel
from .models import NFE, Model, is_learned

__all__ = [
    "Dynamics",
    "PFODE",
    "ModifiedODE",
    "HDODE",
    "CustomODE",
    "SDETerms",
    "SDEDynamics",
    "ReverseSDE",
    "CustomSDE",
]


class Dynamics:
    """Base class. Subclasses implement :meth:`__call__`.

    ``model`` is the score model, ``cond`` its conditioning keyword arguments and
    ``nfe`` the counter every network pass is added to. ``divergence`` (an estimator,
    or ``None`` when the log-density is not tracked or not needed) is told when a
    solve and a step begin.

    ``flow_exact``: whether the tracked log-density is that of the model's own PF-ODE
    whatever the network (the rate uses only ``div u_PF``, docs/math.md s.3a). Where it
    carries ``s . (u - u_PF)`` or an SDE's Ito terms it is exact only if the network's
    score is the gradient of that density, and on learned networks it is biased
    (docs/math.md s.13; :func:`diffdensity.check_consistency` measures it).
    """

    flow_exact = False

    def __init__(
        self,
        model: Model,
        *,
        divergence: DivergenceEstimator | None = None,
        cond: dict[str, Any] | None = None,
        nfe: NFE | None = None,
    ):
        self.model, self.schedule = model, model.schedule
        self.divergence = divergence
        self.cond = dict(cond or {})
        self.nfe = nfe if nfe is not None else NFE()

    divergence_in_drift = False
    """Whether the divergence estimate enters the drift (then it cannot be kept per probe)."""

    @property
    def step_dependent(self) -> bool:
        """Whether evaluations depend on the step they belong to (fresh random probes)."""
        d = self.divergence
        return d is not None and getattr(d, "resample", "solve") != "solve"

    def reset(self, generator: torch.Generator | None = None) -> None:
        if self.divergence is not None:
            self.divergence.reset(generator)

    def begin_step(self) -> None:
        if self.divergence is not None:
            self.divergence.begin_step()

    # -- helpers for subclasses ----------------------------------------------------------
    def _t(self, t: Tensor, x: Tensor) -> Tensor:
        return t.to(torch.float64).expand(x.shape[0])

    def score(self, t: Tensor, x: Tensor) -> Tensor:
        """The score at ``(x, t)``, counted as one forward pass."""
        self.nfe.forward += 1
        return self.model.score(x, self._t(t, x), **self.cond)

    def score_and_laplacian(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """The score and an estimate of ``div s`` (float64 ``(B,)``) from the divergence estimator."""
        if self.divergence is None:
            raise RuntimeError("this dynamics needs a divergence estimator")
        return self.divergence(model_fn(self.model, self._t(t, x), self.cond), x, self.nfe)

    def divergence_var(self) -> Tensor | None:
        """Variance ``(B,)`` of the last ``div s`` estimate (its probes' mean), or ``None``.

        The estimator's own estimate from that call's products (``last_var``) where it
        gives one, else the spread of its ``P >= 2`` per-probe estimates (sample variance
        / ``P``); docs/math.md s.9. ``None`` for an exact divergence or where neither exists.
        """
        var = getattr(self.divergence, "last_var", None)
        if var is not None:
            return var.to(torch.float64)
        samples = getattr(self.divergence, "last_samples", None)
        if samples is None or samples.ndim != 2 or samples.shape[0] < 2:
            return None
        return samples.to(torch.float64).var(0) / samples.shape[0]

    def rate_var(self, t: Tensor) -> Tensor | None:
        """Variance ``(B,)`` of the last log-density rate of a deterministic dynamics, or ``None``.

        Every deterministic rate here is ``-D f + (1/2) g^2 div s`` plus terms free of the
        divergence estimate (s.3a, s.3b), so ``Var(rate) = ((1/2) g^2)^2 Var(div s)``
        (:meth:`divergence_var`). ``None`` where the estimate enters the drift, and while
        the estimator returns per-probe rates (whose spread carries the variance instead).
        """
        if self.divergence_in_drift or getattr(self.divergence, "per_probe", False):
            return None
        var = self.divergence_var()
        return None if var is None else (0.5 * self.schedule(t).g2.to(torch.float64)) ** 2 * var

    def __call__(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


def _expand(v: Tensor, x: Tensor) -> Tensor:
    """``v`` (a scalar or ``(B,)``) shaped to broadcast against ``x``, on its device and dtype."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class PFODE(Dynamics):
    """Probability-flow ODE ``u = f x - (1/2) g^2 s`` (docs/math.md s.3a).

    With a divergence estimator the log-density rate is
    ``d/dt log p_t(x_t) = -div u = -D f + (1/2) g^2 div s``; without, it is ``None``.
    """

    flow_exact = True

    def __call__(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        sv = self.schedule(t)
        if self.divergence is None:
            s, rate = self.score(t, x), None
        else:
            s, lap = self.score_and_laplacian(t, x)
            dim = math.prod(x.shape[1:])
            rate = -dim * sv.f + 0.5 * sv.g2 * lap
        u = _expand(sv.f, x) * x - 0.5 * _expand(sv.g2, x) * s
        return u, rate


# -- modified deterministic dynamics (docs/math.md s.3b, s.4d) ------------------------------------


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product in float64, ``(B,)``."""
    return (a.to(torch.float64) * b.to(torch.float64)).reshape(a.shape[0], -1).sum(1)


class ModifiedODE(Dynamics):
    """Base of deterministic dynamics ``dx/dt = u = u_PF + delta`` (docs/math.md s.3b).

    Subclasses implement :meth:`drift`, returning ``u`` and ``delta = u - u_PF``. With a
    divergence estimator the log-density rate is

        d/dt log p_t(x_t) = -div u_PF + s . delta = -D f + (1/2) g^2 div s + s . delta,

    exact when ``s`` is the true score; ``delta`` is returned separately so that the
    inner product is not computed from a difference of nearly equal drifts.
    """

    def drift(self, t: Tensor, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, u - u_PF)`` at ``(t, x)`` given the score ``s``."""
        raise NotImplementedError

    def __call__(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.divergence is None:
            s, lap = self.score(t, x), None
        else:
            s, lap = self.score_and_laplacian(t, x)
        u, delta = self.drift(t, x, s)
        if lap is None:
            return u, None
        sv = self.schedule(t)
        dim = math.prod(x.shape[1:])
        return u, -dim * sv.f + 0.5 * sv.g2 * lap + _dot(s, delta)


class HDODE(ModifiedODE):
    """High-density ODE ``u_HD = f x - g^2 s``: the reverse-SDE drift without its noise (docs/math.md s.4d).

    Compared with the PF-ODE it follows the score twice as strongly, so integrated
    backwards it climbs the density: ``d/dt log p = -div u_PF - (1/2) g^2 |s|^2``.
    For Gaussian data it is exactly the mode-tracking ODE of docs/math.md s.4e.
    """

    def drift(self, t: Tensor, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        sv = self.schedule(t)
        return _expand(sv.f, x) * x - _expand(sv.g2, x) * s, -0.5 * _expand(sv.g2, x) * s


DriftFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _check_field(value: Any, x: Tensor, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != x.shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
    return value


class CustomODE(ModifiedODE):
    """A user drift ``dx/dt = drift(x, t, s)`` (docs/math.md s.3b).

    ``drift`` receives ``x`` ``(B, *event_shape)``, ``t`` float64 ``(B,)`` and the score
    ``s`` at ``(x, t)``, and returns ``dx/dt`` of the shape of ``x`` (time runs from data
    ``t_min`` to noise ``t_max``; sampling integrates it backwards). The log-density
    rate needs ``div s`` (the divergence estimator), never ``div u``.
    """

    def __init__(self, model: Model, drift: DriftFn, **kwargs: Any):
        super().__init__(model, **kwargs)
        if not callable(drift):
            raise TypeError(f"drift must be callable as drift(x, t, score), got {type(drift).__name__}")
        self.user_drift = drift

    def drift(self, t: Tensor, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        u = _check_field(self.user_drift(x, self._t(t, x), s), x, "drift(x, t, score)")
        sv = self.schedule(t)
        x64, s64 = x.to(torch.float64), s.to(torch.float64)
        u_pf = _expand(sv.f, x64) * x64 - 0.5 * _expand(sv.g2, x64) * s64
        return u, u.to(torch.float64) - u_pf


# -- stochastic dynamics (docs/math.md s.3c, s.3d) ---------------------------------------------


@dataclass
class SDETerms:
    """Coefficients of ``dx = u dt + G dW_bar`` at one ``(t, x)`` (``t`` decreasing).

    ``drift``: ``u`` (``dx/dt``, shape of ``x``). ``diffusion``: ``phi``, float64 ``(B,)``
    with ``G = phi I`` unless ``noise_fn`` is given, which maps a Brownian increment
    ``dW`` (shape of ``x``) to ``G dW`` (e.g. a projected noise). ``score``: ``s`` at
    ``(t, x)``, whose inner product with ``G dW`` is the log-density's noise term.
    ``rate``: the deterministic part of ``d log p / d tau`` (``tau = -t``), float64
    ``(B,)``; ``None`` when the log-density is not tracked. ``rate_var``: float64 ``(B,)``
    variance of the rate's Hutchinson estimate, or ``None`` (exact, or unknown).
    """

    drift: Tensor
    diffusion: Tensor
    score: Tensor
    rate: Tensor | None = None
    noise_fn: Callable[[Tensor], Tensor] | None = None
    rate_var: Tensor | None = None

    def noise(self, dw: Tensor) -> Tensor:
        """``G dW`` for a Brownian increment ``dW`` of the shape of ``x``."""
        if self.noise_fn is not None:
            return self.noise_fn(dw)
        return _expand(self.diffusion, dw) * dw


class SDEDynamics(Dynamics):
    """Base of stochastic dynamics; subclasses implement :meth:`terms`.

    ``track_logp`` says whether :meth:`terms` must return the log-density rate. A
    divergence estimator is needed only by dynamics whose rate involves ``div s``.
    """

    schemes: tuple[str, ...] = ("euler-maruyama",)
    """The integrators of :mod:`diffdensity.sde` these dynamics support, the default first."""

    def __init__(self, model: Model, *, track_logp: bool = True, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.track_logp = bool(track_logp)

    def terms(self, t: Tensor, x: Tensor) -> SDETerms:
        raise NotImplementedError

    def kernel(self, t: float, t_next: float, x: Tensor, scheme: str, generator: torch.Generator | None = None) -> GaussianKernel:
        """The Gaussian reverse kernel of ``scheme`` from ``(t, x)`` to ``t_next`` (dynamics that have one)."""
        raise NotImplementedError(f"{type(self).__name__} has no Gaussian reverse kernel; its schemes: {self.schemes}")

    def __call__(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        raise TypeError(f"{type(self).__name__} is stochastic: integrate it with diffdensity.sde.sdeint")


class ReverseSDE(SDEDynamics):
    """The model's reverse SDE ``dx = (f x - g^2 s) dt + g dW_bar`` (docs/math.md s.3c).

    Carried by the same increment ``dW`` that moves ``x``,

        d log p = (D f + (1/2) g^2 |s|^2) dtau + g s . dW,

    so tracking needs no divergence and no extra network pass. Its transition over a
    finite step is close to a Gaussian known in closed form (:meth:`kernel`), which the
    Bayes-rule integrators of :mod:`diffdensity.sde` use.
    """

    @property
    def schemes(self) -> tuple[str, ...]:
        """Its integrators, the default first: ``"tweedie-jvp"`` for a learned network (a
        model that declares its ``network``), ``"tweedie"`` for exact scores (measured,
        docs/sampling.md: on the bundled model at 32 steps the median gap to re-encoding
        falls from 146 to 50 nats at the same number of passes, each a JVP)."""
        first = "tweedie-jvp" if is_learned(self.model) else "tweedie"
        return (first, *(s for s in ("tweedie", "tweedie-jvp", "ancestral", "euler-maruyama") if s != first))

    def kernel(self, t: float, t_next: float, x: Tensor, scheme: str, generator: torch.Generator | None = None) -> GaussianKernel:
        """``N(m, v I)`` of :func:`~diffdensity.kernels.tweedie_kernel` from one network pass at ``(t, x)``.

        ``"tweedie-jvp"`` draws a Rademacher probe from ``generator`` (tracked or not, so
        that the samples do not depend on tracking) and makes the pass a JVP.
        """
        tt = torch.tensor(t, dtype=torch.float64)
        if scheme != "tweedie-jvp":
            return tweedie_kernel(self.schedule, t, t_next, x, self.score(tt, x), scheme)
        device = generator.device if generator is not None else x.device
        e = (torch.randint(0, 2, x.shape, generator=generator, device=device).to(x.dtype) * 2 - 1).to(x.device)
        s, je, _ = jacobian_vector_product(model_fn(self.model, self._t(tt, x), self.cond), x, e)
        self.nfe.jvp += 1
        return tweedie_kernel(self.schedule, t, t_next, x, s, scheme, probe=(e, je))

    def terms(self, t: Tensor, x: Tensor) -> SDETerms:
        sv = self.schedule(t)
        s = self.score(t, x)
        u = _expand(sv.f, x) * x - _expand(sv.g2, x) * s
        g = sv.g2.sqrt().to(device=x.device, dtype=torch.float64).expand(x.shape[0])
        rate = None
        if self.track_logp:
            dim = math.prod(x.shape[1:])
            rate = dim * sv.f + 0.5 * sv.g2 * _dot(s, s)
        return SDETerms(u, g, s, rate)


DiffusionFn = Callable[[Tensor, Tensor], "Tensor | float"]


class CustomSDE(SDEDynamics):
    """A user SDE ``dx = drift(x, t, s) dt + phi dW_bar`` with ``G = phi I`` (docs/math.md s.3d).

    ``diffusion`` is a number ``phi >= 0`` or a callable ``diffusion(x, t)`` returning a
    number or a ``(B,)`` tensor (``t`` float64 ``(B,)``). With the true score,

        d log p = [D f + f x.s - (1/2) g^2 (div s + |s|^2) - s.u + (1/2) phi^2 div s] dtau
                  + phi s . dW,

    where ``div s`` comes from the divergence estimator (needed only when tracking).
    """

    def __init__(self, model: Model, drift: DriftFn, diffusion: float | DiffusionFn, **kwargs: Any):
        super().__init__(model, **kwargs)
        if not callable(drift):
            raise TypeError(f"drift must be callable as drift(x, t, score), got {type(drift).__name__}")
        if not callable(diffusion):
            phi = float(diffusion)
            if not (math.isfinite(phi) and phi >= 0):
                raise ValueError(f"diffusion must be a finite number >= 0 or a callable, got {diffusion!r}")
        if self.track_logp and self.divergence is None:
            raise ValueError("tracking the log-density of a custom SDE needs a divergence estimator")
        self.user_drift, self.user_diffusion = drift, diffusion

    def _phi(self, t: Tensor, x: Tensor) -> Tensor:
        d = self.user_diffusion
        phi = d(x, self._t(t, x)) if callable(d) else d
        phi = torch.as_tensor(phi, dtype=torch.float64, device=x.device)
        if phi.ndim == 0:
            phi = phi.expand(x.shape[0])
        if phi.shape != (x.shape[0],):
            raise ValueError(f"diffusion(x, t) must return a number or a ({x.shape[0]},) tensor, got shape {tuple(phi.shape)}")
        if not (torch.isfinite(phi).all() and (phi >= 0).all()):
            raise ValueError("diffusion(x, t) must be finite and >= 0")
        return phi

    def terms(self, t: Tensor, x: Tensor) -> SDETerms:
        sv = self.schedule(t)
        if self.track_logp:
            s, lap = self.score_and_laplacian(t, x)
        else:
            s, lap = self.score(t, x), None
        u = _check_field(self.user_drift(x, self._t(t, x), s), x, "drift(x, t, score)")
        phi = self._phi(t, x)
        rate = None
        if lap is not None:
            dim = math.prod(x.shape[1:])
            x64, s64 = x.to(torch.float64), s.to(torch.float64)
            # D f + f x.s - s.u, written as D f - s.(u - f x) to avoid cancellation
            rate = dim * sv.f - _dot(s64, u.to(torch.float64) - sv.f * x64)
            rate = rate - 0.5 * sv.g2 * (lap + _dot(s64, s64)) + 0.5 * phi**2 * lap
        var = self.divergence_var() if lap is not None else None
        rate_var = None if var is None else (0.5 * (phi**2 - sv.g2)) ** 2 * var
        return SDETerms(u, phi, s, rate, rate_var=rate_var)
