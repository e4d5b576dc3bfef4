"""The registry of sampling methods, and the methods of the model's own dynamics.

A method is a name, the options it accepts (checked, never swallowed) and a builder
that turns a :class:`MethodContext` into a :class:`Plan`: a sequence of :class:`Phase`
objects, each a dynamics integrated down to a time. :func:`diffdensity.sample` looks
methods up in :data:`METHODS`; modules that define methods register them when they are
imported (this one the model's own dynamics, :mod:`diffdensity.guidance` density and
prior guidance). Guidance changes the dynamics, never the solver; tracking adds to the
state, never to the drift.

==========================  ==============================================================
``method``                  dynamics and how ``log p`` is carried
==========================  ==============================================================
``"pf-ode"``                probability-flow ODE; ``-div u_PF`` by the divergence estimator
                            (docs/math.md s.3a)
``"sde"``                   reverse SDE; the same Gaussian increments carry ``log p``, no
                            divergence and no extra network pass (s.3c; :mod:`diffdensity.sde`)
``"hd"``                    PF-ODE (or reverse SDE) down to ``log_snr_threshold``, then the
                            high-density ODE ``u = f x - g^2 s`` (s.4d; tracked by s.3b)
``"custom"``                a user drift ``drift(x, t, score)``; with ``diffusion`` an SDE
                            (s.3b, s.3d)
==========================  ==============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor

from . import _validation as v
from .divergence import DivergenceEstimator
from .dynamics import PFODE, CustomODE, CustomSDE, Dynamics, HDODE, ReverseSDE, SDEDynamics
from .models import NFE, Model, is_learned
from .schedules import Schedule

if TYPE_CHECKING:
    from .sampling import SampleResult

__all__ = ["METHODS", "Method", "MethodContext", "Option", "Phase", "Plan", "REQUIRED", "register_method", "resolve_options",
           "DEFAULT_ODE_SOLVERS", "DEFAULT_GRIDS", "default_ode_solver", "default_grid"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of an option that has to be given."""


@dataclass(frozen=True)
class Option:
    """A method option: its default (or :data:`REQUIRED`), a check and a line of help.

    ``check(value, name)`` returns the (possibly normalised) value or raises
    ``ValueError`` / ``TypeError`` (the checks of :mod:`diffdensity._validation`).
    """

    default: Any = REQUIRED
    check: Callable[[Any, str], Any] | None = None
    doc: str = ""


@dataclass
class MethodContext:
    """What a builder gets: the model, the latent and the checked options of one call.

    ``divergence`` is the estimator chosen by the caller; ``dynamics_kwargs`` hands it to
    dynamics that need ``div s`` only when the log-density is tracked.
    """

    model: Model
    schedule: Schedule
    x_T: Tensor
    options: dict[str, Any]
    track_logp: bool
    divergence: DivergenceEstimator
    cond: dict[str, Any]
    nfe: NFE

    @property
    def dim(self) -> int:
        return math.prod(self.x_T.shape[1:])

    def dynamics_kwargs(self, *, needs_divergence: bool = True) -> dict[str, Any]:
        """Keyword arguments shared by the dynamics of this call (conditioning, NFE counter, estimator)."""
        div = self.divergence if (self.track_logp and needs_divergence) else None
        return dict(cond=self.cond, nfe=self.nfe, divergence=div)


@dataclass
class Phase:
    """A dynamics integrated from where the previous phase ended down to ``t_end``.

    ``start(t, x)``, if given, is called with the state at the start of the phase
    (e.g. to anchor dynamics that depend on where they start).
    """

    dynamics: Dynamics
    t_end: float
    name: str = ""
    start: Callable[[float, Tensor], None] | None = None

    @property
    def stochastic(self) -> bool:
        return isinstance(self.dynamics, SDEDynamics)


@dataclass
class Plan:
    """A builder's answer: the phases, and optionally a replacement latent (e.g. a rescaled ``x_T``).

    ``then(result)``, if given, is called with the :class:`~diffdensity.sampling.SampleResult`
    of the plan and may return another plan to run from its own latents (iterative
    methods such as target shooting; network passes add up) or ``None`` to finish.
    ``reuse_probes``: such a follow-up plan draws the same Hutchinson probes as the first.
    """

    phases: list[Phase]
    x_T: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    then: Callable[["SampleResult"], "Plan | None"] | None = None
    reuse_probes: bool = False


@dataclass(frozen=True)
class Method:
    """A registered sampling method."""

    name: str
    build: Callable[[MethodContext], Plan]
    options: Mapping[str, Option]
    default_steps: int
    description: str = ""


METHODS: dict[str, Method] = {}

# arguments of sample() that method options may not shadow
SAMPLE_KEYWORDS = (
    "model", "n", "x_T", "method", "steps", "solver", "grid", "track_logp", "generator", "callback",
    "model_kwargs", "divergence", "probes", "prior_logp", "dtype", "device", "rtol", "atol",
)  # fmt: skip


def register_method(
    name: str,
    build: Callable[[MethodContext], Plan],
    *,
    options: Mapping[str, Option] | None = None,
    default_steps: int = 64,
    description: str = "",
    replace: bool = False,
) -> Method:
    """Add a method to :data:`METHODS` under ``name`` (``replace=True`` to overwrite)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered (pass replace=True to overwrite)")
    if not callable(build):
        raise TypeError("build must be callable as build(context) -> Plan")
    reserved = set(SAMPLE_KEYWORDS) & set(options or {})
    if reserved:
        raise ValueError(f"option names {sorted(reserved)} clash with arguments of sample()")
    method = Method(name, build, dict(options or {}), v.check_positive_int(default_steps, "default_steps"), description)
    METHODS[name] = method
    return method


def resolve_options(method: Method, given: dict[str, Any]) -> dict[str, Any]:
    """The checked options of one call: ``given`` completed with defaults; unknown or missing ones raise."""
    unknown = sorted(set(given) - set(method.options))
    if unknown:
        valid = ", ".join(sorted(method.options)) or "none"
        raise ValueError(f"unknown option(s) {unknown} for method {method.name!r}; its options: {valid}")
    out = {}
    for key, opt in method.options.items():
        if key in given:
            value = given[key]
            out[key] = opt.check(value, key) if opt.check is not None else value
        elif opt.default is REQUIRED:
            raise ValueError(f"method {method.name!r} needs option {key!r}: {opt.doc}")
        else:
            out[key] = opt.default
    return out


# -- the model's own dynamics ------------------------------------------------------------------


def threshold_time(ctx: MethodContext, log_snr: float, name: str = "log_snr_threshold") -> float:
    """The time at which the schedule's logSNR equals ``log_snr`` (clamped to the time range)."""
    sched = ctx.schedule
    sched.check_log_snr(log_snr, name=name)
    t = float(sched.t_from_log_snr(torch.tensor(log_snr, dtype=torch.float64)))
    return min(max(t, sched.t_min), sched.t_max)


def _build_pf_ode(ctx: MethodContext) -> Plan:
    return Plan([Phase(PFODE(ctx.model, **ctx.dynamics_kwargs()), ctx.schedule.t_min, "pf-ode")])


def _reverse_sde(ctx: MethodContext) -> ReverseSDE:
    return ReverseSDE(ctx.model, track_logp=ctx.track_logp, **ctx.dynamics_kwargs(needs_divergence=False))


def _build_sde(ctx: MethodContext) -> Plan:
    until = ctx.options["noise_until"]
    if until is None:
        return Plan([Phase(_reverse_sde(ctx), ctx.schedule.t_min, "reverse-sde")])
    t_s = threshold_time(ctx, until, "noise_until")
    tail = Phase(PFODE(ctx.model, **ctx.dynamics_kwargs()), ctx.schedule.t_min, "pf-ode")
    return Plan([Phase(_reverse_sde(ctx), t_s, "reverse-sde"), tail], info=dict(t_noise_until=t_s))


def _build_hd(ctx: MethodContext) -> Plan:
    t_thr = threshold_time(ctx, ctx.options["log_snr_threshold"])
    if ctx.options["start"] == "sde":
        first = Phase(_reverse_sde(ctx), t_thr, "reverse-sde")
    else:
        first = Phase(PFODE(ctx.model, **ctx.dynamics_kwargs()), t_thr, "pf-ode")
    second = Phase(HDODE(ctx.model, **ctx.dynamics_kwargs()), ctx.schedule.t_min, "hd-ode")
    return Plan([first, second], info=dict(t_threshold=t_thr))


def _build_custom(ctx: MethodContext) -> Plan:
    drift, diffusion = ctx.options["drift"], ctx.options["diffusion"]
    if diffusion is None:
        return Plan([Phase(CustomODE(ctx.model, drift, **ctx.dynamics_kwargs()), ctx.schedule.t_min, "custom-ode")])
    dyn = CustomSDE(ctx.model, drift, diffusion, track_logp=ctx.track_logp, **ctx.dynamics_kwargs())
    return Plan([Phase(dyn, ctx.schedule.t_min, "custom-sde")])


_THRESHOLD_DOC = "logSNR at which to switch to the high-density ODE (lower: earlier switch, higher log p_0)"
HD_DEFAULT_THRESHOLD = 2.0
"""Default ``log_snr_threshold`` of ``"hd"``: the switch near the middle of a typical logSNR range."""

register_method(
    "pf-ode",
    _build_pf_ode,
    default_steps=64,
    description="probability-flow ODE; log p from the divergence of its drift (docs/math.md s.3a)",
)
register_method(
    "sde",
    _build_sde,
    options={
        "noise_until": Option(None, v.optional(v.check_float), "None: the reverse SDE down to the data; a logSNR: "
                              "the reverse SDE up to it, then the PF-ODE (noise only above that noise level, as EDM's S_tmin; "
                              "on learned networks it keeps tracked log p off the data end's bias, docs/sampling.md)"),
    },
    default_steps=256,
    description="reverse SDE; log p carried by the same Gaussian increments (docs/math.md s.3c)",
)
register_method(
    "hd",
    _build_hd,
    options={
        "log_snr_threshold": Option(HD_DEFAULT_THRESHOLD, v.check_float, _THRESHOLD_DOC),
        "start": Option("pf-ode", v.choice("pf-ode", "sde"), "dynamics above the threshold: 'pf-ode' or 'sde'"),
    },
    default_steps=64,
    description="high-density sampling: PF-ODE (or SDE) to a logSNR threshold, then u = f x - g^2 s (docs/math.md s.4d)",
)
register_method(
    "custom",
    _build_custom,
    options={
        "drift": Option(REQUIRED, v.check_callable, "drift(x, t, score) -> dx/dt (t float64 (B,))"),
        "diffusion": Option(None, v.check_diffusion, "None (ODE), a number phi >= 0 or diffusion(x, t) -> phi (SDE, G = phi I)"),
    },
    default_steps=64,
    description="a user ODE (docs/math.md s.3b) or SDE with G = phi I (s.3d)",
)


DEFAULT_ODE_SOLVERS = {"network": "exp-heun", "exact": "heun"}
"""Default solver of deterministic phases, by the kind of model (measured, docs/sampling.md):
a learned network (a model that declares its ``network``) gets Heun in the variables that
make the PF-ODE's linear part exact (:mod:`diffdensity.expint`), whose tracked log p stays
close to the density of the sample it produces at few steps (median gap 6 nats against
77 for Heun on the bundled model at 32 steps); an exact or closed-form score gets plain
Heun, second order in ``t`` (5 nats against 12 for the exponential solver on the D = 3072
mixture at 64 steps)."""


def default_ode_solver(model: Any) -> str:
    """The default ODE solver for ``model`` (see :data:`DEFAULT_ODE_SOLVERS`)."""
    return DEFAULT_ODE_SOLVERS["network" if is_learned(model) else "exact"]


DEFAULT_GRIDS = {"network": "tapered", "exact": "log_snr", "stochastic": "log_snr"}
"""Default time grid, by the kind of model and of dynamics (measured, docs/sampling.md): a
learned network sampled by ODEs gets logSNR steps that shrink towards the data end, where
its density sharpens and a step's error costs many nats (PF-ODE on the bundled model at 32
steps, 24 samples: median / max gap to the re-encoded density 4.2 / 17.9 nats against
8.5 / 44.5 uniform in logSNR); a plan with a stochastic phase keeps uniform logSNR steps,
whose error sits where the tapered grid is coarser (a custom SDE with Euler-Maruyama:
14.9 / 48.5 against 63.6 / 102.7 tapered), and so does an exact score, where exponential
Heun's error sits mid-schedule (30.6 tapered against 29.8 at 32 steps, 11.5 against 8.9 at
64, on the D = 3072 mixture)."""


def default_grid(model: Any, phases: list | None = None) -> str:
    """The default time grid of :func:`sample` for ``model`` and a plan's ``phases`` (see :data:`DEFAULT_GRIDS`)."""
    if not is_learned(model):
        return DEFAULT_GRIDS["exact"]
    return DEFAULT_GRIDS["stochastic" if any(p.stochastic for p in phases or []) else "network"]
