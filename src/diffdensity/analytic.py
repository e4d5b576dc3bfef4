"""Exact models: Gaussian mixtures pushed through any schedule.

With ``x_0 ~ sum_k w_k N(mu_k, Q diag(s_k^2) Q^T)`` and ``x_t = alpha_t x_0 + sigma_t eps``,

    p_t(x) = sum_k w_k N(x; alpha_t mu_k, Q diag(alpha_t^2 s_k^2 + sigma_t^2) Q^T)

in closed form at every ``t``. With ``y = Q^T x``, ``m_k = Q^T mu_k``,
``v_k = alpha^2 s_k^2 + sigma^2`` (vectors of length D), responsibilities ``r_k`` and
``a_k = -(y - alpha m_k) / v_k``:

    score      s(x)     = Q sum_k r_k a_k
    Laplacian  div s(x) = sum_k r_k (|a_k|^2 - sum_d 1/v_kd) - |sum_k r_k a_k|^2

Everything is computed in float64 with ``logsumexp``; memory is O(B K D), never
O(K D^2) beyond the one D x D rotation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .models import broadcast_time
from .schedules import Schedule

__all__ = ["GaussianMixture", "random_rotation"]


def random_rotation(dim: int, *, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """A Haar-random orthogonal ``(dim, dim)`` matrix (QR of a Gaussian matrix, signs fixed)."""
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


class GaussianMixture:
    """A Gaussian mixture data distribution and its exact marginals under ``schedule``.

    Args:
        means: ``(K, *event_shape)`` component means.
        stds: per-component standard deviations along the (rotated) axes: a scalar,
            ``(K,)`` (isotropic per component) or ``(K, *event_shape)`` (diagonal).
        weights: ``(K,)`` positive mixture weights (normalised here); uniform by default.
        schedule: the forward process.
        rotation: optional ``(D, D)`` orthogonal ``Q``; component covariances become
            ``Q diag(s_k^2) Q^T`` so that Jacobians of the score are dense.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        weights: Tensor | None = None,
        *,
        schedule: Schedule,
        rotation: Tensor | None = None,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *event_shape), got {tuple(means.shape)}")
        if not torch.isfinite(means).all():
            raise ValueError("means must be finite (got NaN or Inf)")
        k = means.shape[0]
        self.event_shape = tuple(means.shape[1:])
        self.dim = math.prod(self.event_shape)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(k, self.dim)
        elif stds.shape == (k,):
            stds = stds[:, None].expand(k, self.dim)
        elif stds.shape[0] == k and math.prod(stds.shape[1:]) == self.dim:
            stds = stds.reshape(k, self.dim)
        else:
            raise ValueError(f"stds must be a scalar, (K,) or (K, *event_shape); got {tuple(stds.shape)}")
        if not ((stds > 0) & torch.isfinite(stds)).all():
            raise ValueError("stds must be positive and finite")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not ((weights > 0) & torch.isfinite(weights)).all():
            raise ValueError(f"weights must be {k} positive numbers")
        if rotation is not None:
            rotation = torch.as_tensor(rotation, dtype=torch.float64)
            if rotation.shape != (self.dim, self.dim):
                raise ValueError(f"rotation must be ({self.dim}, {self.dim}), got {tuple(rotation.shape)}")
            err = (rotation.T @ rotation - torch.eye(self.dim, dtype=torch.float64)).abs().max()
            if err > 1e-8:
                raise ValueError(f"rotation is not orthogonal (max |Q^T Q - I| = {err:.2e})")
        self.schedule = schedule
        self.means = means.reshape(k, self.dim)
        self.stds = stds.contiguous()
        self.log_weights = torch.log(weights / weights.sum())
        self.rotation = rotation
        # component means in the rotated frame y = Q^T x
        self._m = self.means if rotation is None else self.means @ rotation

    @property
    def device(self) -> torch.device:
        """Where the mixture computes: the device of its means."""
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        """The mixture's dtype (that of its means; float64 unless built otherwise)."""
        return self.means.dtype

    def __repr__(self) -> str:
        rot = ", rotated" if self.rotation is not None else ""
        return f"GaussianMixture(K={self.means.shape[0]}, event_shape={self.event_shape}{rot}, {self.schedule!r})"

    # -- frames ---------------------------------------------------------------------
    def _to_y(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], self.dim).to(torch.float64)
        return x if self.rotation is None else x @ self.rotation.to(x.device)

    def _from_y(self, y: Tensor, like: Tensor) -> Tensor:
        x = y if self.rotation is None else y @ self.rotation.to(y.device).T
        return x.reshape(like.shape).to(like.dtype)

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x must have shape (B, *{self.event_shape}), got {tuple(x.shape)}")

    def _components(self, x: Tensor, t: Tensor | float):
        """``(y, a, v, log_r, logp)``: per-component residual terms at time t (in ``[t_min, t_max]``)."""
        self._check(x)
        t = broadcast_time(t, x).to(torch.float64)
        self.schedule.check_t(t)
        sv = self.schedule(t)
        alpha, sigma = sv.alpha[:, None, None], sv.sigma[:, None, None]
        y = self._to_y(x)  # (B, D)
        m, s = self._m.to(y.device), self.stds.to(y.device)
        var = alpha**2 * s**2 + sigma**2  # (B, K, D)
        diff = y[:, None, :] - alpha * m  # (B, K, D)
        log_n = -0.5 * ((diff**2 / var).sum(-1) + torch.log(2 * math.pi * var).sum(-1))  # (B, K)
        joint = self.log_weights.to(y.device) + log_n
        logp = torch.logsumexp(joint, dim=1)
        return y, -diff / var, var, joint - logp[:, None], logp

    # -- exact quantities -----------------------------------------------------------
    def log_prob(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``log p_t(x)``, float64 ``(B,)``."""
        return self._components(x, t)[-1]

    def score(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``grad_x log p_t(x)``, same shape and dtype as ``x``. Differentiable (JVP and VJP)."""
        if cond:
            raise TypeError(f"GaussianMixture takes no conditioning, got {sorted(cond)}")
        _, a, _, log_r, _ = self._components(x, t)
        s_y = (log_r.exp()[..., None] * a).sum(1)
        return self._from_y(s_y, x)

    def laplacian(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``div s(x) = tr grad s(x)`` in closed form, float64 ``(B,)``."""
        _, a, var, log_r, _ = self._components(x, t)
        r = log_r.exp()
        s_y = (r[..., None] * a).sum(1)
        return (r * ((a**2).sum(-1) - (1 / var).sum(-1))).sum(1) - (s_y**2).sum(-1)

    # -- sampling -------------------------------------------------------------------
    def sample(self, n: int, *, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        """Draw ``(n, *event_shape)`` samples from ``p_0`` (the data distribution, alpha=1, sigma=0)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        y = self._m[k] + self.stds[k] * z
        x = y if self.rotation is None else y @ self.rotation.T
        return x.reshape(n, *self.event_shape).to(dtype)

    def sample_t(self, n: int, t: Tensor | float, *, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
        """Draw ``(n, *event_shape)`` samples from ``p_t``."""
        x0 = self.sample(n, generator=generator)
        t = broadcast_time(t, x0)
        self.schedule.check_t(t)
        sv = self.schedule(t).view(-1, *([1] * len(self.event_shape)))
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return (sv.alpha * x0 + sv.sigma * eps).to(dtype)
