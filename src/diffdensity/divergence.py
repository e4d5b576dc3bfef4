"""Divergence of a batched vector field, ``div F(x) = tr J_F(x)`` (MATH.md s.6).

``F`` maps ``(N, *event_shape) -> (N, *event_shape)`` sample by sample. Probes are
folded into the batch (``N = P * B``), so any network that runs on a batch runs here,
without ``vmap``. Jacobian products use forward mode (``torch.func.jvp``) where the
network supports it and fall back to reverse mode (``torch.autograd.grad``)
automatically: many real networks (group norm, fused attention) fail under forward AD.

* :class:`Exact` -- ``sum_i e_i^T J e_i`` over the D basis vectors, chunked so memory
  is bounded by ``chunk_size * B * D`` elements.
* :class:`Hutchinson` -- ``mean_p e_p^T J e_p`` with Rademacher or Gaussian probes;
  unbiased, variance ``2 sum_{i != j} J_ij^2`` (Rademacher) per probe.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .models import NFE, Model

__all__ = ["DivergenceEstimator", "Exact", "Hutchinson", "make_divergence", "model_fn", "jacobian_vector_product"]

Field = Callable[[Tensor], Tensor]
_MODES = ("auto", "forward", "reverse")


def _repeat_batch(value: Any, reps: int, batch: int) -> Any:
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat(reps, *([1] * (value.ndim - 1)))
    return value


def model_fn(model: Model, t: Tensor, cond: dict[str, Any] | None = None) -> Field:
    """The score at fixed ``t`` ``(B,)`` as a field on batches of ``P * B`` (t, cond repeated)."""
    cond = cond or {}
    batch = t.shape[0]

    def fn(x: Tensor) -> Tensor:
        reps = x.shape[0] // batch
        return model.score(x, t.repeat(reps), **{k: _repeat_batch(v, reps, batch) for k, v in cond.items()})

    fn.t = t  # type: ignore[attr-defined]  (lets model-aware estimators see the time)
    return fn


class DivergenceEstimator:
    """Base class: ``est(fn, x, nfe=None) -> (fn(x), div)`` with ``div`` float64 ``(B,)``.

    ``mode`` selects forward-mode (``"forward"``), reverse-mode (``"reverse"``) or
    forward with a reverse fallback (``"auto"``); after the first call
    ``resolved_mode`` says which one ran.
    """

    def __init__(self, mode: str = "auto"):
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
        self.mode = mode
        self.resolved_mode: str | None = None if mode == "auto" else mode

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Start of a solve."""

    def begin_step(self) -> None:
        """Start of a solver step (all stages of one step share probes)."""

    def __call__(self, fn: Field, x: Tensor, nfe: NFE | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- Jacobian products on folded probes ------------------------------------------
    def _products(self, fn: Field, x: Tensor, v: Tensor, nfe: NFE | None) -> tuple[Tensor, Tensor]:
        """``(fn(x), v_p^T J)`` or ``(fn(x), J v_p)`` for probes ``v`` of shape ``(P, *x.shape)``.

        The returned products are only meant for ``e^T J e`` style contractions
        (identical for ``J`` and ``J^T``).
        """
        p = v.shape[0]
        xr = x.repeat(p, *([1] * (x.ndim - 1)))
        vr = v.reshape(p * x.shape[0], *x.shape[1:]).to(x.dtype)
        if self.resolved_mode in (None, "forward"):
            try:
                fx, jv = torch.func.jvp(fn, (xr,), (vr,))
                self.resolved_mode = "forward"
                if nfe is not None:
                    nfe.jvp += p
                return fx[: x.shape[0]], jv.reshape(v.shape)
            except (RuntimeError, NotImplementedError):
                if self.mode == "forward":
                    raise
                self.resolved_mode = "reverse"
        with torch.enable_grad():
            xr = xr.detach().requires_grad_(True)
            fx = fn(xr)
            (vj,) = torch.autograd.grad(fx, xr, vr)
        if nfe is not None:
            nfe.vjp += p
        return fx[: x.shape[0]].detach(), vj.reshape(v.shape)


class Exact(DivergenceEstimator):
    """Exact divergence from D Jacobian products, ``chunk_size`` basis vectors at a time.

    ``chunk_size=None`` picks the largest chunk with at most ``max_elements`` elements
    in a folded batch (default 2^20, i.e. 8 MiB per float64 tensor).
    """

    def __init__(self, *, chunk_size: int | None = None, max_elements: int = 2**20, mode: str = "auto"):
        super().__init__(mode)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size, self.max_elements = chunk_size, int(max_elements)

    def __repr__(self) -> str:
        return f"Exact(chunk_size={self.chunk_size}, mode={self.mode!r})"

    def __call__(self, fn: Field, x: Tensor, nfe: NFE | None = None) -> tuple[Tensor, Tensor]:
        b, dim = x.shape[0], math.prod(x.shape[1:])
        chunk = self.chunk_size or max(1, self.max_elements // (b * dim))
        div = torch.zeros(b, dtype=torch.float64, device=x.device)
        fx = None
        for start in range(0, dim, chunk):
            idx = torch.arange(start, min(start + chunk, dim), device=x.device)
            v = torch.zeros(len(idx), b, dim, dtype=x.dtype, device=x.device)
            v[torch.arange(len(idx)), :, idx] = 1
            fx, jv = self._products(fn, x, v.reshape(len(idx), *x.shape), nfe)
            jv = jv.reshape(len(idx), b, dim)
            div += jv[torch.arange(len(idx)), :, idx].to(torch.float64).sum(0)
        return fx, div


class Hutchinson(DivergenceEstimator):
    """Hutchinson's estimator ``mean_p e_p^T J e_p`` with ``probes`` probes.

    ``noise``: ``"rademacher"`` (entries +-1, lowest variance) or ``"gaussian"``.
    ``resample``: fresh probes every solver ``"step"`` (default; the variance of the
    accumulated log-density then shrinks with the step size), one set for the whole
    ``"solve"`` (the classic FFJORD choice), or fresh on every ``"call"``.
    """

    def __init__(self, probes: int = 1, *, noise: str = "rademacher", resample: str = "step", mode: str = "auto"):
        super().__init__(mode)
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive integer, got {probes!r}")
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"unknown noise {noise!r}; expected 'rademacher' or 'gaussian'")
        if resample not in ("step", "solve", "call"):
            raise ValueError(f"unknown resample {resample!r}; expected 'step', 'solve' or 'call'")
        self.probes, self.noise, self.resample = probes, noise, resample
        self._generator: torch.Generator | None = None
        self._eps: Tensor | None = None

    def __repr__(self) -> str:
        return f"Hutchinson(probes={self.probes}, noise={self.noise!r}, resample={self.resample!r}, mode={self.mode!r})"

    def reset(self, generator: torch.Generator | None = None) -> None:
        self._generator, self._eps = generator, None

    def begin_step(self) -> None:
        if self.resample == "step":
            self._eps = None

    def draw(self, x: Tensor) -> Tensor:
        """Fresh probes of shape ``(probes, *x.shape)``."""
        shape = (self.probes, *x.shape)
        gen = self._generator
        device = gen.device if gen is not None else x.device
        if self.noise == "gaussian":
            e = torch.randn(shape, generator=gen, dtype=x.dtype, device=device)
        else:
            e = torch.randint(0, 2, shape, generator=gen, device=device).to(x.dtype) * 2 - 1
        return e.to(x.device)

    def __call__(self, fn: Field, x: Tensor, nfe: NFE | None = None) -> tuple[Tensor, Tensor]:
        if self._eps is None or self._eps.shape[1:] != x.shape or self.resample == "call":
            self._eps = self.draw(x)
        eps = self._eps
        fx, jv = self._products(fn, x, eps, nfe)
        quad = (eps * jv).reshape(self.probes, x.shape[0], -1).to(torch.float64).sum(-1)
        return fx, quad.mean(0)


def make_divergence(divergence: str | DivergenceEstimator, probes: int = 1) -> DivergenceEstimator:
    """``"exact"``, ``"hutchinson"`` or an estimator instance -> an estimator."""
    if isinstance(divergence, DivergenceEstimator):
        return divergence
    if divergence == "exact":
        return Exact()
    if divergence == "hutchinson":
        return Hutchinson(probes)
    raise ValueError(f"unknown divergence {divergence!r}; expected 'exact', 'hutchinson' or an estimator")


def jacobian_vector_product(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, *, mode: str = "auto") -> tuple[Tensor, Tensor, str]:
    """``(fn(x), J_fn(x) v, mode_used)``: forward mode, or the double-VJP trick in reverse mode.

    Reverse mode computes ``J v = d/dw [ (J^T w) . v ]`` (needs double backward); called on
    an ``x`` that requires grad (nested in another product) it keeps the graph.
    """
    if mode in ("auto", "forward"):
        try:
            fx, jv = torch.func.jvp(fn, (x,), (v,))
            return fx, jv, "forward"
        except (RuntimeError, NotImplementedError):
            if mode == "forward":
                raise
    with torch.enable_grad():
        nested = x.requires_grad  # inside an outer differentiation: keep the graph
        xg = x if nested else x.detach().requires_grad_(True)
        fx = fn(xg)
        w = torch.zeros_like(fx, requires_grad=True)
        (jtw,) = torch.autograd.grad(fx, xg, w, create_graph=True)
        (jv,) = torch.autograd.grad(jtw, w, v, create_graph=nested)
    return (fx if nested else fx.detach()), jv, "reverse"
