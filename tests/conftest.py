"""Shared helpers: the schedules, seeded generators, exact Gaussian mixtures and the exact flow of one Gaussian."""

from __future__ import annotations

import math
import os

from dataclasses import dataclass, field
from typing import Any

import torch

import diffdensity as dd

F64 = torch.float64

# The tests run many small float64 kernels. Under CPU contention (shared CI runners) a
# multi-threaded OpenMP pool makes tiny matmuls orders of magnitude slower while one
# thread loses little; an explicit OMP_NUM_THREADS still wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# (factory, singular points (a, b) of the formulas; finite differences keep away from them)
SCHEDULES = {
    "VP": (lambda: dd.VP(), (-math.inf, math.inf)),
    "VPLinear": (lambda: dd.VPLinear(), (0.0, math.inf)),
    "VPCosine": (lambda: dd.VPCosine(), (0.0, 1.0)),
    "VE": (lambda: dd.VE(), (-math.inf, math.inf)),
    "EDM": (lambda: dd.EDM(), (0.0, math.inf)),
    "RectifiedFlow": (lambda: dd.RectifiedFlow(), (0.0, 1.0)),
}
SCHEDULE_NAMES = list(SCHEDULES)


def make_schedule(name: str) -> dd.Schedule:
    return SCHEDULES[name][0]()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def householder_rotation(dim: int, *, generator: torch.Generator, reflections: int = 3) -> torch.Tensor:
    """A dense orthogonal matrix built in O(reflections * D^2) (no O(D^3) QR at large D)."""
    q = torch.eye(dim, dtype=F64)
    for _ in range(reflections):
        u = torch.randn(dim, generator=generator, dtype=F64)
        u = u / u.norm()
        q = q - 2 * torch.outer(q @ u, u)
    return q


def make_mixture(
    schedule: dd.Schedule,
    dim: int,
    k: int = 3,
    *,
    seed: int = 0,
    rotate: bool = True,
    std_range: tuple[float, float] = (0.1, 1.0),
    mean_scale: float = 1.0,
    event_shape: tuple[int, ...] | None = None,
    rotation: torch.Tensor | None = None,
) -> dd.GaussianMixture:
    """A K-component mixture with diagonal stds spread log-uniformly over ``std_range``."""
    g = gen(seed)
    lo, hi = math.log(std_range[0]), math.log(std_range[1])
    means = mean_scale * torch.randn(k, dim, generator=g, dtype=F64)
    stds = torch.exp(torch.empty(k, dim, dtype=F64).uniform_(lo, hi, generator=g))
    weights = torch.empty(k, dtype=F64).uniform_(0.5, 1.5, generator=g)
    if rotation is None and rotate:
        rotation = dd.random_rotation(dim, generator=g)
    if event_shape is not None:
        means = means.reshape(k, *event_shape)
        stds = stds.reshape(k, *event_shape)
    return dd.GaussianMixture(means, stds, weights, schedule=schedule, rotation=rotation)


def gaussian_flow(gmm: dd.GaussianMixture, x0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """Exact PF-ODE map of a single Gaussian: in the rotated frame each coordinate is
    y_t = alpha_t m + sqrt(v_t / v_t0) (y_t0 - alpha_t0 m), v_t = alpha_t^2 s^2 + sigma_t^2."""
    assert gmm.means.shape[0] == 1, "a single Gaussian"
    q = gmm.rotation if gmm.rotation is not None else torch.eye(gmm.dim, dtype=F64)
    m, s = gmm.means[0] @ q, gmm.stds[0]
    x0 = x0.reshape(x0.shape[0], gmm.dim)
    a0, a1 = gmm.schedule(t0), gmm.schedule(t1)
    v0, v1 = a0.alpha**2 * s**2 + a0.sigma**2, a1.alpha**2 * s**2 + a1.sigma**2
    y0 = x0 @ q
    y1 = a1.alpha * m + (v1 / v0).sqrt() * (y0 - a0.alpha * m)
    return (y1 @ q.T).reshape(x0.shape[0], *gmm.event_shape)


@dataclass
class Counted:
    """A model whose score calls are counted into ``nfe.forward``."""

    model: Any
    nfe: dd.NFE = field(default_factory=dd.NFE)

    @property
    def schedule(self) -> dd.Schedule:
        return self.model.schedule

    def score(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.nfe.forward += 1
        return self.model.score(x, t, **cond)
