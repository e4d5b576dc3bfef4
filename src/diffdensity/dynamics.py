"""What a sampler integrates: drift, noise and log-density rate (MATH.md s.3-4).

A dynamics object is called as ``dyn(t, x) -> (dx/dt, d log p_t(x_t)/dt)`` with ``t`` a
float64 scalar tensor and ``x`` ``(B, *event_shape)``; the rate is float64 ``(B,)``
or ``None`` when log-density is not tracked. The same object serves both directions:
integrating forward in ``t`` (data -> noise, likelihood) or backward (sampling).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .divergence import DivergenceEstimator, model_fn
from .models import NFE, Model

__all__ = ["Dynamics", "PFODE"]


class Dynamics:
    """Base class. Subclasses implement :meth:`__call__`.

    ``model`` is the score model, ``cond`` its conditioning keyword arguments and
    ``nfe`` the counter every network pass is added to. ``divergence`` (an estimator,
    or ``None`` when the log-density is not tracked or not needed) is told when a
    solve and a step begin.
    """

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

    def __call__(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


def _expand(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class PFODE(Dynamics):
    """Probability-flow ODE ``u = f x - (1/2) g^2 s`` (MATH.md s.3a).

    With a divergence estimator the log-density rate is
    ``d/dt log p_t(x_t) = -div u = -D f + (1/2) g^2 div s``; without, it is ``None``.
    """

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
