"""Divergence of a batched vector field, ``div F(x) = tr J_F(x)`` (docs/math.md s.6).

``F`` maps ``(B, *event_shape) -> (B, *event_shape)`` sample by sample. The estimators
take ``P`` Jacobian products ``e_p^T J`` (reverse mode) or ``J e_p`` (forward mode) from
**one primal evaluation** of the network:

* reverse: one forward pass that records the graph, then the ``P`` vector-Jacobian
  products from it (``torch.autograd.grad(..., is_grads_batched=True)``, or one backward
  pass per probe on the retained graph where batched gradients are not supported);
* forward: ``torch.func.jvp`` under ``torch.func.vmap`` over the tangents (the primal is
  computed once, unbatched); where the network cannot run under ``vmap``, the probes
  are folded into the batch (``P * B`` rows, ``P`` primal evaluations).

``mode="auto"`` chooses between the two by measurement (:meth:`DivergenceEstimator.choose_mode`).

* :class:`Exact` -- ``sum_i e_i^T J e_i`` over the D basis vectors, chunked so memory
  is bounded by ``chunk_size * B * D`` elements; in reverse mode all chunks share one
  primal.
* :class:`Hutchinson` -- ``mean_p e_p^T J e_p`` with Rademacher or Gaussian probes;
  unbiased, variance ``2 sum_{i != j} J_ij^2`` (Rademacher) per probe.

NFE: ``nfe.jvp`` / ``nfe.vjp`` count product passes per sample (``P`` per evaluation;
the primal is part of them and not counted in ``nfe.forward``). ``primal_passes`` on
the estimator counts the primal evaluations per sample that actually ran (1 per
evaluation when shared, ``P`` when folded).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .bases import check_basis, resolve_basis
from .models import NFE, Model
from .solvers import is_adaptive

__all__ = ["DivergenceEstimator", "Exact", "Hutchinson", "make_divergence", "model_fn", "jacobian_vector_product"]

Field = Callable[[Tensor], Tensor]
_MODES = ("auto", "forward", "reverse")
_AD_ERRORS = (RuntimeError, NotImplementedError, ValueError)

#: ``mode="auto"`` keeps forward mode without measuring reverse mode when one forward
#: product takes less than this (seconds), twice: for such cheap fields (small analytic
#: models) a whole solve takes seconds either way, and timings of a few milliseconds on
#: a loaded CPU would make the choice arbitrary from run to run.
AUTO_MIN_SECONDS = 0.05
#: reverse mode is chosen when it is faster than forward mode by at least this factor.
AUTO_MARGIN = 1.1


def _repeat_batch(value: Any, reps: int, batch: int) -> Any:
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat(reps, *([1] * (value.ndim - 1)))
    return value


def model_fn(model: Model, t: Tensor, cond: dict[str, Any] | None = None) -> Field:
    """The score at fixed ``t`` ``(B,)`` as a field on batches of ``B`` (or ``P * B``: t, cond repeated)."""
    cond = cond or {}
    batch = t.shape[0]

    def fn(x: Tensor) -> Tensor:
        reps = x.shape[0] // batch
        if reps == 1:
            return model.score(x, t, **cond)
        return model.score(x, t.repeat(reps), **{k: _repeat_batch(v, reps, batch) for k, v in cond.items()})

    fn.t = t  # type: ignore[attr-defined]  (lets model-aware estimators see the time)
    fn.model = model  # type: ignore[attr-defined]  (the key of the AD-mode choice)
    return fn


def _where(fn: Field) -> str:
    t = getattr(fn, "t", None)
    return f" at t={float(t.flatten()[0]):.6g}" if isinstance(t, Tensor) and t.numel() else ""


def check_finite(value: Tensor, what: str, fn: Field | None = None, hint: str = "") -> None:
    """Raise ``FloatingPointError`` naming the samples (first dimension) where ``value`` is not finite."""
    bad = ~torch.isfinite(value.detach()).reshape(value.shape[0], -1).all(1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "")
        where = _where(fn) if fn is not None else ""
        raise FloatingPointError(f"{what} is NaN or Inf{where} for {len(idx)} of {value.shape[0]} samples (indices {shown}){hint}")


_NET_HINT = "; the network itself returned it (check the model, its weights and dtype, and the inputs), more steps will not help"


class DivergenceEstimator:
    """Base class: ``est(fn, x, nfe=None) -> (fn(x), div)`` with ``div`` float64 ``(B,)``.

    ``mode``: ``"forward"``, ``"reverse"`` or ``"auto"`` (measured, see
    :meth:`choose_mode`). After a call ``resolved_mode`` says which one ran and
    ``last_samples`` holds the per-probe estimates ``(P, B)`` float64 of that call
    (their mean is ``div``; ``None`` for estimators without probes). With
    ``per_probe=True`` the call returns these per-probe estimates instead of their
    mean, so that a dynamics whose rate is linear in ``div`` returns per-probe rates
    ``(P, B)`` from which the solver estimates the variance of the log-density.
    """

    def __init__(self, mode: str = "auto"):
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
        self.mode = mode
        self.resolved_mode: str | None = None if mode == "auto" else mode
        self.per_probe = False
        self.last_samples: Tensor | None = None
        self.last_var: Tensor | None = None
        self.primal_passes = 0
        self.mode_timings: dict[str, float] = {}
        self._mode_cache: dict[tuple, str] = {}
        self._folded: set[str] = set()  # modes whose shared-primal form failed on this estimator

    @contextlib.contextmanager
    def probe_rates(self, wanted: bool = True) -> Iterator[bool]:
        """Within the block, calls return per-probe estimates ``(P, B)`` where they carry a variance.

        That is ``P >= 2`` probes shared by the stages of a step or a solve (probes fresh at
        every call carry their own estimate, ``last_var``, instead). Yields whether it is on.
        """
        self.per_probe = wanted and getattr(self, "probes", 1) > 1 and getattr(self, "resample", "call") != "call"
        try:
            yield self.per_probe
        finally:
            self.per_probe = False

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Start of a solve."""

    def begin_step(self) -> None:
        """Start of a solver step (all stages of one step share probes under ``resample="step"``)."""

    def __call__(self, fn: Field, x: Tensor, nfe: NFE | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- the AD mode ---------------------------------------------------------------------
    @staticmethod
    def signature(fn: Field, x: Tensor, probes: int) -> tuple:
        """The key of the mode choice: model identity, device, dtype, shape and probe count."""
        owner = getattr(fn, "model", None)
        owner = owner if owner is not None else getattr(fn, "__code__", type(fn))
        return (id(owner), str(x.device), x.dtype, tuple(x.shape), probes)

    def choose_mode(self, fn: Field, x: Tensor, v: Tensor, nfe: NFE | None) -> tuple[Tensor, Tensor, Callable]:
        """Measure and cache the faster AD mode for this signature; returns the products.

        Forward mode is tried first and kept if it takes less than
        :data:`AUTO_MIN_SECONDS`. Otherwise one reverse product is timed; unless
        reverse mode is clearly faster (forward over ``4 * AUTO_MIN_SECONDS`` and more
        than twice reverse's time), each mode runs once more (first calls carry one-off
        costs) and forward is kept if it is now fast. Reverse mode is chosen when its
        best time beats forward's by :data:`AUTO_MARGIN`, or when forward mode fails.
        The products of the chosen mode's run are returned; every product run here is
        counted in ``nfe``.
        """
        times: dict[str, float] = {}
        outs: dict[str, tuple[Tensor, Tensor, Callable]] = {}
        errors: dict[str, BaseException] = {}

        def attempt(mode: str) -> None:
            start = time.perf_counter()
            try:
                outs[mode] = self._run(mode, fn, x, v, nfe)
            except _AD_ERRORS as e:
                errors[mode] = e
                return
            times[mode] = min(times.get(mode, math.inf), time.perf_counter() - start)

        attempt("forward")
        if times.get("forward", math.inf) >= AUTO_MIN_SECONDS:
            attempt("reverse")
            both = "forward" in times and "reverse" in times
            clear = both and times["forward"] >= 4 * AUTO_MIN_SECONDS and 2 * times["reverse"] < times["forward"]
            if both and not clear:  # first calls carry one-off costs: once more
                attempt("forward")
                if times["forward"] >= AUTO_MIN_SECONDS:
                    attempt("reverse")
        if not times:
            raise errors["reverse"] from errors.get("forward")
        best = min(times, key=lambda m: times[m] * (AUTO_MARGIN if m == "reverse" else 1.0))
        self._mode_cache[self.signature(fn, x, v.shape[0])] = best
        self.mode_timings = dict(times)
        self.resolved_mode = best
        return outs[best]

    def _products(self, fn: Field, x: Tensor, v: Tensor, nfe: NFE | None) -> tuple[Tensor, Tensor, Callable]:
        """``(fn(x), v_p^T J or J v_p, more)`` for probes ``v`` of shape ``(P, *x.shape)``.

        The products are only meant for ``e^T J e`` style contractions (identical for
        ``J`` and ``J^T``). ``more(v')`` gives ``(fn(x), products)`` for further probes
        from the same linearisation (in reverse mode, without running the network again).
        """
        mode = self.mode if self.mode != "auto" else self._mode_cache.get(self.signature(fn, x, v.shape[0]))
        if mode is None:
            return self.choose_mode(fn, x, v, nfe)
        self.resolved_mode = mode
        return self._run(mode, fn, x, v, nfe)

    def _run(self, mode: str, fn: Field, x: Tensor, v: Tensor, nfe: NFE | None) -> tuple[Tensor, Tensor, Callable]:
        products = self._linearize(mode, fn, x)
        fx, out = products(v)
        self._count(mode, v.shape[0], nfe)
        check_finite(fx, "the network output", fn, _NET_HINT)
        return fx, out, products

    def _count(self, mode: str, p: int, nfe: NFE | None) -> None:
        if nfe is not None:
            if mode == "forward":
                nfe.jvp += p
            else:
                nfe.vjp += p

    def _linearize(self, mode: str, fn: Field, x: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """``products(v) -> (fn(x), products)`` for ``v`` of shape ``(P, *x.shape)``.

        Reverse mode evaluates the network here, once, and keeps the graph; forward mode
        evaluates it on each call of ``products`` (once under ``vmap``, ``P`` times when
        the probes have to be folded into the batch).
        """
        if mode == "reverse":
            return self._reverse(fn, x)

        def products(v: Tensor) -> tuple[Tensor, Tensor]:
            v = v.to(x.dtype)
            if "forward" not in self._folded:
                try:
                    fx, jv = torch.func.vmap(lambda u: torch.func.jvp(fn, (x,), (u,)), out_dims=(None, 0))(v)
                    self.primal_passes += 1
                    return fx, jv
                except _AD_ERRORS:
                    self._folded.add("forward")
            p = v.shape[0]
            xr = x.repeat(p, *([1] * (x.ndim - 1)))
            fx, jv = torch.func.jvp(fn, (xr,), (v.reshape(p * x.shape[0], *x.shape[1:]),))
            self.primal_passes += p
            return fx[: x.shape[0]], jv.reshape(v.shape)

        return products

    def _reverse(self, fn: Field, x: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            fx = fn(xg)
        self.primal_passes += 1

        def products(v: Tensor) -> tuple[Tensor, Tensor]:
            v = v.to(fx.dtype)
            if v.shape[0] > 1 and "reverse" not in self._folded:
                try:
                    return fx.detach(), torch.autograd.grad(fx, xg, v, retain_graph=True, is_grads_batched=True)[0]
                except _AD_ERRORS:
                    self._folded.add("reverse")
            return fx.detach(), torch.stack([torch.autograd.grad(fx, xg, vp, retain_graph=True)[0] for vp in v])

        return products


class Exact(DivergenceEstimator):
    """Exact divergence from D Jacobian products, ``chunk_size`` basis vectors at a time.

    ``chunk_size=None`` picks the largest chunk with at most ``max_elements`` elements
    in the products of one chunk (default 2^20, i.e. 8 MiB per float64 tensor).
    """

    def __init__(self, *, chunk_size: int | None = None, max_elements: int = 2**20, mode: str = "auto"):
        super().__init__(mode)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size, self.max_elements = chunk_size, int(max_elements)

    def __repr__(self) -> str:
        return f"Exact(chunk_size={self.chunk_size}, mode={self.mode!r})"

    def _basis(self, x: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        b, dim = x.shape[0], math.prod(x.shape[1:])
        idx = torch.arange(start, stop, device=x.device)
        v = torch.zeros(len(idx), b, dim, dtype=x.dtype, device=x.device)
        v[torch.arange(len(idx)), :, idx] = 1
        return idx, v.reshape(len(idx), *x.shape)

    def __call__(self, fn: Field, x: Tensor, nfe: NFE | None = None) -> tuple[Tensor, Tensor]:
        b, dim = x.shape[0], math.prod(x.shape[1:])
        chunk = self.chunk_size or max(1, self.max_elements // (b * dim))
        div = torch.zeros(b, dtype=torch.float64, device=x.device)
        fx, products = None, None
        for start in range(0, dim, chunk):
            idx, v = self._basis(x, start, min(start + chunk, dim))
            if products is None:  # the first chunk resolves the mode; the others reuse its linearisation
                fx, jv, products = self._products(fn, x, v, nfe)
            else:
                jv = products(v)[1]
                self._count(self.resolved_mode, len(idx), nfe)
            jv = jv.reshape(len(idx), b, dim)
            div += jv[torch.arange(len(idx)), :, idx].to(torch.float64).sum(0)
        check_finite(div, "the exact divergence", fn, _NET_HINT)
        self.last_samples = None
        return fx, div


class Hutchinson(DivergenceEstimator):
    """Hutchinson's estimator ``mean_p e_p^T J e_p`` with ``probes`` probes.

    ``noise``: ``"rademacher"`` (entries +-1, lowest variance) or ``"gaussian"``.
    ``resample``: fresh probes on every ``"call"`` (the default: every stage of a
    solver step draws its own, so their noise adds independently -- half the variance of
    a two-stage step whose stages share probes, measured on the bundled model), every
    solver ``"step"`` (the stages of a step share them), or one set for the whole
    ``"solve"`` (the classic FFJORD choice). All ``probes`` products of a call come from
    one primal evaluation.

    ``basis``: the orthonormal basis ``U`` of the probes ``e = U r``, where ``r`` are the
    drawn coefficients (:mod:`diffdensity.bases`). ``"auto"`` (the default) takes the
    image DCT for image-shaped samples ``(C, H, W)``, where a denoiser's Jacobian is close
    to diagonal (1.5-10x less variance on the bundled model), and pixels otherwise;
    ``"pixel"``, ``"dct"`` or a basis object choose. Gaussian probes are rotation
    invariant and ignore it; ``"auto"`` keeps pixels for half-precision samples.

    ``last_var`` after a call estimates the variance of the returned mean (see
    :meth:`_variance`); with one Rademacher probe it needs a second, independent probe,
    which under ``resample="call"`` is the previous call's.
    """

    def __init__(self, probes: int = 1, *, noise: str = "rademacher", resample: str = "call", mode: str = "auto", basis: Any = "auto"):
        super().__init__(mode)
        if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or probes < 1:
            raise ValueError(f"probes must be a positive integer, got {probes!r}")
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"unknown noise {noise!r}; expected 'rademacher' or 'gaussian'")
        if resample not in ("step", "solve", "call"):
            raise ValueError(f"unknown resample {resample!r}; expected 'step', 'solve' or 'call'")
        check_basis(basis)  # resolved per sample shape, on first use
        self.probes, self.noise, self.resample, self.basis = int(probes), noise, resample, basis
        self._bases: dict[tuple[int, ...], Any] = {}
        self._generator: torch.Generator | None = None
        self._eps: Tensor | None = None
        self._last_d: Tensor | None = None  # e * (J e) of the previous one-probe call, float64 (B, D)

    def __repr__(self) -> str:
        basis = "" if self.basis == "auto" else f", basis={self.basis!r}"
        return f"Hutchinson(probes={self.probes}, noise={self.noise!r}, resample={self.resample!r}, mode={self.mode!r}{basis})"

    def reset(self, generator: torch.Generator | None = None) -> None:
        self._generator, self._eps, self._last_d = generator, None, None

    def begin_step(self) -> None:
        if self.resample == "step":
            self._eps = None

    def basis_for(self, x: Tensor) -> Any:
        """The probe basis for samples like ``x``: the identity for Gaussian probes, and under
        ``"auto"`` for half-precision samples too (a rotated probe rounded to 8 bits of
        mantissa would no longer have ``E[e e^T] = I``; +-1 entries are exact)."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._bases:
            half = self.basis == "auto" and x.dtype not in (torch.float32, torch.float64)
            self._bases[key] = resolve_basis("pixel" if self.noise == "gaussian" or half else self.basis, key[0])
        return self._bases[key]

    def draw(self, x: Tensor) -> Tensor:
        """Fresh probe coefficients of shape ``(probes, *x.shape)`` (in the probe basis)."""
        shape = (self.probes, *x.shape)
        gen = self._generator
        device = gen.device if gen is not None else x.device
        if self.noise == "gaussian":
            e = torch.randn(shape, generator=gen, dtype=x.dtype, device=device)
        else:
            e = torch.randint(0, 2, shape, generator=gen, device=device).to(x.dtype) * 2 - 1
        return e.to(x.device)

    def terms(self, r: Tensor, jv: Tensor, x: Tensor) -> Tensor:
        """``d = r * U^T (J e)``, float64 ``(P, B, D)``, for coefficients ``r`` and products ``jv = J U r``
        ``(P, *x.shape)``: ``d.sum(-1)`` are the probes' estimates ``e^T J e``."""
        return (r * self.basis_for(x).analysis(jv)).reshape(r.shape[0], x.shape[0], -1).to(torch.float64)

    def __call__(self, fn: Field, x: Tensor, nfe: NFE | None = None) -> tuple[Tensor, Tensor]:
        if self._eps is None or self._eps.shape[1:] != x.shape or self.resample == "call":
            self._eps = self.draw(x)
        r, basis = self._eps, self.basis_for(x)
        fx, jv, more = self._products(fn, x, basis.synthesis(r), nfe)
        chained = self.probes == 1 and self.noise == "rademacher" and self.resample == "call"
        if chained and (self._last_d is None or self._last_d[0].shape != (x.shape[0], math.prod(x.shape[1:]))):
            # the first call of a solve: one more probe from the same linearisation, so that
            # its variance is estimable (and the next call has a predecessor)
            extra = self.draw(x)
            r, jv = torch.cat([r, extra]), torch.cat([jv, more(basis.synthesis(extra))[1]])
            self._count(self.resolved_mode, 1, nfe)
        d = self.terms(r, jv, x)
        quad = d.sum(-1)
        check_finite(quad, "a Jacobian product", fn, _NET_HINT)
        fro = jv.reshape(d.shape).to(torch.float64).square().sum(-1).mean(0)  # mean_p |J e_p|^2, (B,)
        self.last_samples = quad
        self.last_var = self._variance(d, fro)
        if chained:
            self._last_d = (d.mean(0), fro)
        return fx, (quad if self.per_probe else quad.mean(0))

    def _variance(self, d: Tensor, fro: Tensor) -> Tensor | None:
        """Estimated variance of the returned mean, float64 ``(B,)``, from ``d = e_p * J e_p``
        ``(P, B, D)`` and ``fro = mean_p |J e_p|^2`` ``(B,)``.

        For a symmetric ``J``, ``Var(e^T J e) = 2 (|J|_F^2 - sum_i J_ii^2)`` (Rademacher) or
        ``2 |J|_F^2`` (Gaussian). ``|J e_p|^2`` is unbiased for ``|J|_F^2`` and, for two
        independent probes, ``sum_i (e_p J e_p)_i (e_q J e_q)_i`` for ``sum_i J_ii^2``:
        sums over the D coordinates, so the estimate is far less noisy than the
        spread of ``P`` values (for a non-symmetric ``J`` it errs on the safe side).

        With one Rademacher probe the second probe is the previous call's, drawn
        independently under ``resample="call"`` at the neighbouring stage of the same
        solve, where ``J' ~ c J``: along a diffusion the score's Jacobian scales like
        ``1 / sigma^2`` from stage to stage. ``sum_i (e' J' e')_i (e J e)_i`` estimates
        ``c sum_i J_ii^2``, and ``c ~ |J' e'| / |J e|``, so the cross term is divided by that
        ratio. The ratio shares the current probe, which biases the variance low by
        ``O(1 / D)`` of itself where the diagonal carries nearly all of ``|J|_F^2``
        (measured on mixtures whose diagonal is 99 % of it: -20 % at D = 8, -4 % at 32,
        -1.5 % at 128). The first call of a solve has no predecessor: it takes a second
        probe from the same linearisation (one more product per solve, counted) and
        returns the mean of the two. ``None`` where one probe is shared
        (``resample="step"`` or ``"solve"``).
        """
        p = d.shape[0]
        if self.noise == "gaussian":
            return 2 * fro / p
        if p >= 2:
            total = d.sum(0)
            cross = (total.square().sum(-1) - d.square().sum((0, 2))) / (p * (p - 1))
            return 2 * (fro - cross).clamp_min(0) / p
        if self._last_d is None:  # kept only where each call draws its own probe
            return None
        last_d, last_fro = self._last_d
        scale = (fro / last_fro.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
        return 2 * (fro - scale * (last_d * d[0]).sum(-1)).clamp_min(0)


def make_divergence(divergence: str | DivergenceEstimator, probes: int = 1, *, solver: str | None = None, basis: Any = "auto") -> DivergenceEstimator:
    """``"exact"``, ``"hutchinson"`` or an estimator instance -> an estimator.

    ``probes`` and the probe ``basis`` (:class:`Hutchinson`) apply to ``"hutchinson"``.

    Hutchinson probes are fresh at every call, except for an adaptive ``solver`` that
    controls the tracked log-density: its embedded error estimate compares the stages of
    a step, which must then see one random integrand (``resample="step"``); with fresh
    probes per stage it would read their noise as discretisation error and shrink the steps.
    """
    if isinstance(divergence, DivergenceEstimator):
        return divergence
    if divergence == "exact":
        return Exact()
    if divergence == "hutchinson":
        return Hutchinson(probes, resample="step" if is_adaptive(solver) else "call", basis=basis)
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
