"""One protocol for every model: ``score(x, t, **cond) -> Tensor`` (docs/math.md s.2).

Networks are trained to predict many things; :class:`ScoreModel` turns each into the
score ``s(x, t) = grad_x log p_t(x)``. Plain callables ``fn(x, t, **cond)`` returning
the score work too, wrapped with ``ScoreModel(fn, schedule)``.

Shapes: ``x`` is ``(B, *event_shape)``; ``t`` a scalar or ``(B,)``; the score has the
shape of ``x``.

A model may declare where it computes: ``device`` and ``dtype`` attributes (``None``
where it does not know). :func:`placement` asks for them, so latents and inputs are
made where the model lives; :class:`ScoreModel` reads them off its ``network`` (the
``nn.Module`` holding the weights, if any) unless given.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from .schedules import Schedule, ScheduleValues

__all__ = [
    "Model",
    "ScoreModel",
    "ClassifierFreeGuidance",
    "NFE",
    "PARAMETRIZATIONS",
    "placement",
    "is_learned",
    "check_output",
    "prediction_to_score",
    "score_to_prediction",
]

PARAMETRIZATIONS = ("score", "eps", "x0", "v", "velocity", "edm")


@runtime_checkable
class Model(Protocol):
    """What diffdensity needs of a model: a schedule and a batched score."""

    schedule: Schedule

    def score(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor: ...


def placement(model: Any) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` the model declares, defaulting to the CPU and the default float dtype."""
    device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
    device = torch.device("cpu") if device is None else torch.device(device)
    if dtype is None:
        dtype = torch.get_default_dtype()
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{type(model).__name__}.dtype must be a floating torch.dtype or None, got {dtype!r}")
    return device, dtype


def is_learned(model: Any) -> bool:
    """Whether ``model`` declares a ``network``: a learned score, whose defaults and caveats differ from an exact one's."""
    return getattr(model, "network", None) is not None


def check_output(out: Any, x: Tensor, who: str) -> Tensor:
    """``out`` must be a floating tensor of the shape of ``x`` (a score or a prediction).

    Shape and type only (valid under ``torch.func`` transforms); non-finite values are
    caught where the state is integrated.
    """
    if not isinstance(out, Tensor):
        hint = " (unwrap it, e.g. lambda x, t: net(x, t)[0])" if isinstance(out, (tuple, list, dict)) or hasattr(out, "sample") else ""
        raise TypeError(f"{who} returned {type(out).__name__}, expected a tensor of shape {tuple(x.shape)}{hint}")
    if out.shape != x.shape:
        raise ValueError(f"{who} returned shape {tuple(out.shape)}, expected {tuple(x.shape)} (the shape of x)")
    if not out.is_floating_point():
        raise TypeError(f"{who} returned a {out.dtype} tensor, expected a floating-point one")
    return out


def _network_placement(network: torch.nn.Module | None) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of the first floating parameter (or buffer) of ``network``."""
    if network is not None:
        for p in itertools.chain(network.parameters(), network.buffers()):  # lazily: the first one usually answers
            if p.is_floating_point():
                return p.device, p.dtype
    return None, None


@dataclass
class NFE:
    """Network evaluations per sample, by kind of pass.

    ``forward``: plain score evaluations. ``jvp`` / ``vjp``: Jacobian-vector and
    vector-Jacobian passes (each also yields the score). One pass over a batch counts
    once: these are per-sample counts.
    """

    forward: int = 0
    jvp: int = 0
    vjp: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.jvp + self.vjp

    def add(self, other: "NFE") -> "NFE":
        """Add ``other``'s passes to these (in place, e.g. a second solve of the same call); returns ``self``."""
        self.forward += other.forward
        self.jvp += other.jvp
        self.vjp += other.vjp
        return self

    def __str__(self) -> str:
        return f"{self.forward} forward + {self.jvp} jvp + {self.vjp} vjp"


def _check_parametrization(p: str) -> None:
    if p not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {p!r}; expected one of {PARAMETRIZATIONS}")


def broadcast_time(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a ``(B,)`` tensor matching the batch of ``x`` (float64 kept if given)."""
    if not isinstance(t, Tensor):  # a Python number: keep its full precision
        t = torch.tensor(t, dtype=torch.float64, device=x.device)
    t = t.to(x.device)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def _bcast(v: ScheduleValues, x: Tensor) -> ScheduleValues:
    return v.view(-1, *([1] * (x.ndim - 1)))


def prediction_to_score(pred: Tensor, x: Tensor, v: ScheduleValues, parametrization: str) -> Tensor:
    """Convert a network output to the score (docs/math.md s.2).

    ``v`` holds the schedule values at the batch's times, of shape ``(B,)``. For
    ``"edm"``, ``pred`` is ``D(x / alpha; sigma / alpha)``.
    """
    _check_parametrization(parametrization)
    v = _bcast(v, x)
    a, s = v.alpha.to(x.dtype), v.sigma.to(x.dtype)
    if parametrization == "score":
        return pred
    if parametrization == "eps":
        return -pred / s
    if parametrization in ("x0", "edm"):
        return (a * pred - x) / s**2
    if parametrization == "v":
        eps = (s * x + a * pred) / (a**2 + s**2)
        return -eps / s
    # velocity = d alpha x0 + d sigma eps; solve with x = alpha x0 + sigma eps for eps
    da, ds = v.d_alpha.to(x.dtype), v.d_sigma.to(x.dtype)
    eps = (a * pred - da * x) / (a * ds - da * s)
    return -eps / s


def score_to_prediction(score: Tensor, x: Tensor, v: ScheduleValues, parametrization: str) -> Tensor:
    """Inverse of :func:`prediction_to_score`: what a perfect network would output."""
    _check_parametrization(parametrization)
    v = _bcast(v, x)
    a, s = v.alpha.to(x.dtype), v.sigma.to(x.dtype)
    eps = -s * score
    x0 = (x + s**2 * score) / a
    if parametrization == "score":
        return score
    if parametrization == "eps":
        return eps
    if parametrization in ("x0", "edm"):
        return x0
    if parametrization == "v":
        return a * eps - s * x0
    return v.d_alpha.to(x.dtype) * x0 + v.d_sigma.to(x.dtype) * eps


class ScoreModel:
    """Wrap a network ``fn`` trained to predict ``parametrization`` as a score model.

    ``fn(x, t, **cond)`` receives the schedule's own time ``t`` of shape ``(B,)``, except
    for ``parametrization="edm"``, where it is the EDM denoiser ``D(x_ve, sigma_ve, **cond)``
    on the variance-exploding input ``x_ve = x / alpha`` with ``sigma_ve = sigma / alpha``.

    =============  ============================================================
    ``score``      ``s`` itself
    ``eps``        ``s = -eps_hat / sigma``
    ``x0``         ``s = (alpha x0_hat - x) / sigma^2``
    ``v``          ``v = alpha eps - sigma x0``
    ``velocity``   ``v = alpha' x0 + sigma' eps`` (rectified flow: ``eps - x0``)
    ``edm``        ``s = (D - x_ve) / (alpha sigma_ve^2)``
    =============  ============================================================
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        schedule: Schedule,
        parametrization: str = "score",
        *,
        event_shape: tuple[int, ...] | None = None,
        network: torch.nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a diffdensity Schedule, got {type(schedule).__name__}")
        _check_parametrization(parametrization)
        if network is not None and not isinstance(network, torch.nn.Module):
            raise TypeError(f"network must be a torch.nn.Module or None, got {type(network).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.fn, self.schedule, self.parametrization = fn, schedule, parametrization
        self.event_shape = None if event_shape is None else tuple(event_shape)
        self.network = network if network is not None else (fn if isinstance(fn, torch.nn.Module) else None)
        self._device = None if device is None else torch.device(device)
        self._dtype = dtype

    @property
    def device(self) -> torch.device | None:
        """Where the network computes: as given, else its parameters' device, else ``None``."""
        return self._device or _network_placement(self.network)[0]

    @property
    def dtype(self) -> torch.dtype | None:
        """The network's floating dtype: as given, else its parameters' dtype, else ``None``."""
        return self._dtype or _network_placement(self.network)[1]

    def __repr__(self) -> str:
        return f"ScoreModel({getattr(self.fn, '__name__', type(self.fn).__name__)}, {self.schedule!r}, {self.parametrization!r})"

    def score(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = broadcast_time(t, x)
        v = self.schedule(t)
        if self.parametrization == "edm":
            a = v.alpha.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            pred = self.fn(x / a, (v.sigma / v.alpha).to(x.dtype), **cond)
        else:
            pred = self.fn(x, t.to(x.dtype), **cond)
        check_output(pred, x, "the network")
        return prediction_to_score(pred, x, v, self.parametrization)


class ClassifierFreeGuidance:
    """``s = s_uncond + w (s_cond - s_uncond)`` in one batched call.

    ``cond`` and ``uncond`` are the keyword arguments (tensors with a leading batch
    dimension, or batch-independent values shared by both) for the two branches. The
    keyword arguments given to :meth:`score` are passed to both. A leading dimension of 1
    is broadcast over the batch; one that divides the batch is tiled, matching how the
    divergence estimators fold probes into the batch (``x.repeat(P, ...)``).
    """

    def __init__(self, model: Model, scale: float, *, cond: dict[str, Any], uncond: dict[str, Any]):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
        self.model, self.scale, self.cond, self.uncond = model, float(scale), cond, uncond
        self.schedule = model.schedule
        self.event_shape = getattr(model, "event_shape", None)
        self.device, self.dtype = getattr(model, "device", None), getattr(model, "dtype", None)

    def score(self, x: Tensor, t: Tensor | float, **extra: Any) -> Tensor:
        t = broadcast_time(t, x)
        kwargs = {}
        b = x.shape[0]

        def batched(z: Any) -> bool:  # a leading dimension that tiles the batch
            return isinstance(z, Tensor) and z.ndim > 0 and b % z.shape[0] == 0

        def tile(z: Tensor) -> Tensor:  # batch-major repeat, as divergence estimators fold probes
            return z.repeat(b // z.shape[0], *([1] * (z.ndim - 1)))

        for k in self.cond:
            c, u = self.cond[k], self.uncond[k]
            if batched(c) and batched(u):
                kwargs[k] = torch.cat([tile(c), tile(u)])
            elif isinstance(c, Tensor) or isinstance(u, Tensor):
                if not (isinstance(c, Tensor) and isinstance(u, Tensor) and c.shape == u.shape and torch.equal(c, u)):
                    raise ValueError(
                        f"conditioning {k!r} must have a leading batch dimension (B, or 1 to broadcast) in cond "
                        f"and uncond, or be the same batch-independent tensor in both"
                    )
                kwargs[k] = c
            else:
                if c != u:
                    raise ValueError(f"non-tensor conditioning {k!r} must be equal in cond and uncond")
                kwargs[k] = c
        for k, e in extra.items():  # shared by both branches: batched tensors are doubled too
            if k in kwargs:
                raise TypeError(f"conditioning {k!r} is set by the guidance; do not pass it to score")
            kwargs[k] = torch.cat([e, e]) if isinstance(e, Tensor) and e.ndim > 0 and e.shape[0] == b else e
        s = self.model.score(torch.cat([x, x]), torch.cat([t, t]), **kwargs)
        s_cond, s_uncond = s.chunk(2)
        return s_uncond + self.scale * (s_cond - s_uncond)
