"""Exact Gaussian mixtures against dense computations, autograd and sample moments."""

from __future__ import annotations

import math
import time

import pytest
import torch

import diffdensity as dd
from conftest import F64, SCHEDULE_NAMES, gen, householder_rotation, make_mixture, make_schedule


def dense_log_prob(gmm: dd.GaussianMixture, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log p_t(x) from K full-covariance MultivariateNormals (no use of the diagonal frame)."""
    d = gmm.dim
    q = gmm.rotation if gmm.rotation is not None else torch.eye(d, dtype=F64)
    x = x.reshape(x.shape[0], d)
    v = gmm.schedule(t)
    a, s = v.alpha[:, None, None], v.sigma[:, None, None]
    var = a**2 * gmm.stds**2 + s**2  # (B, K, D) along the rotated axes
    cov = q @ torch.diag_embed(var) @ q.T  # (B, K, D, D)
    mvn = torch.distributions.MultivariateNormal(a * gmm.means, covariance_matrix=0.5 * (cov + cov.mT))
    return torch.logsumexp(gmm.log_weights + mvn.log_prob(x[:, None, :]), dim=1)


def spread_times(schedule: dd.Schedule, n: int) -> torch.Tensor:
    u = torch.linspace(0, 1, n, dtype=F64)
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def points(gmm: dd.GaussianMixture, t: torch.Tensor, seed: int) -> torch.Tensor:
    """One draw of x_t per entry of t (so each point is typical for its own time)."""
    g = gen(seed)
    x0 = gmm.sample(t.shape[0], generator=g)
    v = gmm.schedule(t)
    shape = (-1, *([1] * len(gmm.event_shape)))
    return v.alpha.reshape(shape) * x0 + v.sigma.reshape(shape) * torch.randn(x0.shape, generator=g, dtype=F64)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("rotate", [False, True])
def test_log_prob_matches_dense_covariance(name, rotate):
    sched = make_schedule(name)
    gmm = make_mixture(sched, 4, k=3, seed=1, rotate=rotate)
    t = spread_times(sched, 9)
    x = points(gmm, t, seed=2)
    lp = gmm.log_prob(x, t)
    assert lp.shape == (9,) and lp.dtype == F64
    torch.testing.assert_close(lp, dense_log_prob(gmm, x, t), rtol=1e-10, atol=1e-9)


def test_log_prob_event_shape_and_float32_input():
    sched = dd.VP()
    gmm = make_mixture(sched, 12, k=2, seed=3, event_shape=(3, 2, 2))
    assert gmm.event_shape == (3, 2, 2) and gmm.dim == 12
    x = gmm.sample(5, generator=gen(4))
    assert x.shape == (5, 3, 2, 2)
    t = torch.full((5,), 0.3, dtype=F64)
    torch.testing.assert_close(gmm.log_prob(x, 0.3), dense_log_prob(gmm, x, t), rtol=1e-10, atol=1e-9)
    # float32 inputs are evaluated in float64 internally; the score keeps the input dtype
    x32 = x.float()
    torch.testing.assert_close(gmm.log_prob(x32, 0.3), gmm.log_prob(x32.double(), 0.3), rtol=0, atol=0)
    assert gmm.log_prob(x32, 0.3).dtype == F64 and gmm.score(x32, 0.3).dtype == torch.float32


def test_log_prob_is_stable_far_from_the_data():
    """Every component underflows in exp(); logsumexp keeps the answer exact."""
    sched = dd.EDM()
    gmm = make_mixture(sched, 3, k=2, seed=5, std_range=(0.01, 0.02))
    x = torch.full((2, 3), 40.0, dtype=F64)
    t = torch.full((2,), sched.t_min, dtype=F64)
    lp = gmm.log_prob(x, t)
    assert torch.isfinite(lp).all() and (lp < -1e6).all()
    torch.testing.assert_close(lp, dense_log_prob(gmm, x, t), rtol=1e-12, atol=0)
    assert torch.isfinite(gmm.score(x, t)).all() and torch.isfinite(gmm.laplacian(x, t)).all()


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_score_is_gradient_of_log_prob(name):
    sched = make_schedule(name)
    gmm = make_mixture(sched, 6, k=4, seed=6)
    t = spread_times(sched, 7)
    x = points(gmm, t, seed=7).requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, t).sum(), x)
    s = gmm.score(x.detach(), t)
    torch.testing.assert_close(s, grad, rtol=1e-10, atol=1e-10 * grad.abs().max().item())


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("rotate", [False, True])
def test_laplacian_is_trace_of_hessian(name, rotate):
    sched = make_schedule(name)
    gmm = make_mixture(sched, 5, k=3, seed=8, rotate=rotate)
    t = spread_times(sched, 6)
    x = points(gmm, t, seed=9)
    expected = []
    for i in range(x.shape[0]):
        hess = torch.autograd.functional.hessian(lambda z: gmm.log_prob(z[None], t[i : i + 1]).sum(), x[i])
        expected.append(torch.diagonal(hess).sum())
    expected = torch.stack(expected)
    lap = gmm.laplacian(x, t)
    assert lap.shape == (6,) and lap.dtype == F64
    torch.testing.assert_close(lap, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_single_gaussian_closed_forms():
    """K = 1 without rotation: log N(x; alpha mu, v), score -(x - alpha mu)/v, div s = -sum 1/v."""
    sched = dd.VPCosine()
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    std = torch.tensor([[0.2, 1.0, 3.0]], dtype=F64)
    gmm = dd.GaussianMixture(mu, std, schedule=sched)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    x = torch.randn(3, 3, generator=gen(10), dtype=F64)
    v = sched(t)
    a, s = v.alpha[:, None], v.sigma[:, None]
    var = a**2 * std**2 + s**2
    lp = torch.distributions.Normal(a * mu, var.sqrt()).log_prob(x).sum(1)
    torch.testing.assert_close(gmm.log_prob(x, t), lp, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gmm.score(x, t), -(x - a * mu) / var, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gmm.laplacian(x, t), -(1 / var).sum(1), rtol=1e-13, atol=1e-13)


def mixture_moments(gmm: dd.GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of p_0."""
    w = gmm.log_weights.exp()
    q = gmm.rotation if gmm.rotation is not None else torch.eye(gmm.dim, dtype=F64)
    mean = (w[:, None] * gmm.means).sum(0)
    second = sum(w[k] * (q @ torch.diag(gmm.stds[k] ** 2) @ q.T + torch.outer(gmm.means[k], gmm.means[k])) for k in range(len(w)))
    return mean, second - torch.outer(mean, mean)


def assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, z: float = 4.5) -> None:
    """Sample mean and covariance within ``z`` standard errors of the exact values.

    The standard error of each mean is sqrt(cov_ii / n); that of each covariance entry
    is the sample standard deviation of (x_i - m_i)(x_j - m_j) over sqrt(n).
    """
    n = x.shape[0]
    se_mean = (torch.diagonal(cov) / n).sqrt()
    dev = ((x.mean(0) - mean).abs() / se_mean).max()
    assert dev < z, f"sample mean {dev:.2f} standard errors off"
    c = x - mean
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    dev = ((prods.mean(0) - cov).abs() / se_cov).max()
    assert dev < z, f"sample covariance {dev:.2f} standard errors off"


def test_sample_moments():
    gmm = make_mixture(dd.VP(), 3, k=3, seed=11, mean_scale=2.0)
    n = 20000
    x = gmm.sample(n, generator=gen(12))
    assert x.shape == (n, 3) and x.dtype == F64
    mean, cov = mixture_moments(gmm)
    assert_moments(x, mean, cov)
    assert torch.equal(x, gmm.sample(n, generator=gen(12)))
    assert gmm.sample(4, generator=gen(12), dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("name", ["VP", "VE", "RectifiedFlow"])
def test_sample_t_moments(name):
    sched = make_schedule(name)
    gmm = make_mixture(sched, 3, k=3, seed=13, mean_scale=2.0)
    mean0, cov0 = mixture_moments(gmm)
    n = 20000
    for t in (sched.t_min + 0.3 * (sched.t_max - sched.t_min), sched.t_max):
        v = sched(t)
        x = gmm.sample_t(n, t, generator=gen(14))
        # x_t = alpha x_0 + sigma eps: mean alpha m, covariance alpha^2 C + sigma^2 I
        assert_moments(x, v.alpha * mean0, v.alpha**2 * cov0 + v.sigma**2 * torch.eye(3, dtype=F64))


def test_sample_t_with_per_sample_times():
    sched = dd.VP()
    gmm = make_mixture(sched, 2, k=2, seed=15)
    n = 20000
    t = torch.tensor([0.2, 0.8], dtype=F64).repeat(n // 2)
    x = gmm.sample_t(n, t, generator=gen(16))
    mean0, cov0 = mixture_moments(gmm)
    for i, ti in enumerate((0.2, 0.8)):
        v = sched(ti)
        assert_moments(x[i::2], v.alpha * mean0, v.alpha**2 * cov0 + v.sigma**2 * torch.eye(2, dtype=F64))


def test_random_rotation_is_orthogonal_and_seeded():
    q = dd.random_rotation(7, generator=gen(17))
    torch.testing.assert_close(q.T @ q, torch.eye(7, dtype=F64), rtol=0, atol=1e-13)
    assert torch.equal(q, dd.random_rotation(7, generator=gen(17)))
    assert not torch.equal(q, dd.random_rotation(7, generator=gen(18)))
    assert dd.random_rotation(3, generator=gen(17), dtype=torch.float32).dtype == torch.float32


def test_large_dimension_is_fast_and_linear_in_memory():
    """D = 3072, K = 10, B = 64: a B x K x D x D temporary would need 48 GB and hours."""
    d, k, b = 3072, 10, 64
    g = gen(19)
    gmm = make_mixture(dd.VP(), d, k=k, seed=20, std_range=(0.05, 1.0), rotation=householder_rotation(d, generator=g))
    x = gmm.sample(b, generator=g)
    start = time.perf_counter()
    lp, s, lap = gmm.log_prob(x, 0.1), gmm.score(x, 0.1), gmm.laplacian(x, 0.1)
    elapsed = time.perf_counter() - start
    assert lp.shape == (b,) and s.shape == (b, d) and lap.shape == (b,)
    assert torch.isfinite(lp).all() and torch.isfinite(s).all() and torch.isfinite(lap).all()
    assert elapsed < 10.0, f"log_prob + score + laplacian took {elapsed:.1f} s"
    # the score still is the gradient of log_prob at this size
    xs = x[:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(xs, 0.1).sum(), xs)
    torch.testing.assert_close(s[:2], grad, rtol=1e-9, atol=1e-9 * grad.abs().max().item())


def test_constructor_forms_and_errors():
    sched = dd.VP()
    means = torch.zeros(2, 3, dtype=F64)
    a = dd.GaussianMixture(means, 0.5, schedule=sched)
    b = dd.GaussianMixture(means, torch.tensor([0.5, 0.5]), schedule=sched)
    c = dd.GaussianMixture(means, torch.full((2, 3), 0.5), schedule=sched)
    assert torch.equal(a.stds, b.stds) and torch.equal(a.stds, c.stds)
    torch.testing.assert_close(a.log_weights.exp(), torch.full((2,), 0.5, dtype=F64))
    w = dd.GaussianMixture(means, 0.5, torch.tensor([1.0, 3.0]), schedule=sched)
    torch.testing.assert_close(w.log_weights.exp(), torch.tensor([0.25, 0.75], dtype=F64))
    with pytest.raises(ValueError, match="means must have shape"):
        dd.GaussianMixture(torch.zeros(3), 0.5, schedule=sched)
    with pytest.raises(ValueError, match="stds must be a scalar"):
        dd.GaussianMixture(means, torch.ones(3, 3), schedule=sched)
    with pytest.raises(ValueError, match="stds must be positive"):
        dd.GaussianMixture(means, torch.tensor([0.5, 0.0]), schedule=sched)
    with pytest.raises(ValueError, match="weights must be 2 positive"):
        dd.GaussianMixture(means, 0.5, torch.tensor([1.0, -1.0]), schedule=sched)
    with pytest.raises(ValueError, match=r"rotation must be \(3, 3\)"):
        dd.GaussianMixture(means, 0.5, schedule=sched, rotation=torch.eye(2))
    with pytest.raises(ValueError, match="not orthogonal"):
        dd.GaussianMixture(means, 0.5, schedule=sched, rotation=2 * torch.eye(3))
    with pytest.raises(TypeError, match="no conditioning"):
        a.score(torch.zeros(1, 3, dtype=F64), 0.5, label=1)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_fokker_planck_for_log_density(name):
    """docs/math.md (FP): d/dt log p_t(x) = -D f - f x.s + g^2 (div s + |s|^2) / 2 at fixed x,
    checked with a 4th-order central difference of the exact log p_t in t."""
    sched = make_schedule(name)
    gmm = make_mixture(sched, 3, k=3, seed=21)
    u = torch.linspace(0.1, 0.9, 5, dtype=F64)
    t = sched.t_min + (sched.t_max - sched.t_min) * u
    x = points(gmm, t, seed=22)
    h = 1e-4 * t.clamp(max=1.0)

    def lp(tt):
        return gmm.log_prob(x, tt)

    dt_lp = (-lp(t + 2 * h) + 8 * lp(t + h) - 8 * lp(t - h) + lp(t - 2 * h)) / (12 * h)
    v = sched(t)
    s = gmm.score(x, t)
    rhs = -gmm.dim * v.f - v.f * (x * s).sum(1) + 0.5 * v.g2 * (gmm.laplacian(x, t) + s.square().sum(1))
    torch.testing.assert_close(dt_lp, rhs, rtol=1e-6, atol=1e-6 * rhs.abs().max().item())


def test_mixture_refuses_bad_parameters_and_times():
    means = torch.zeros(2, 3, dtype=F64)
    for bad in (dict(means=means.clone().fill_(math.nan), stds=0.5), dict(means=means, stds=0.0), dict(means=means, stds=-1.0),
                dict(means=means, stds=math.inf), dict(means=means, stds=torch.tensor([0.5, math.nan]))):  # fmt: skip
        with pytest.raises(ValueError, match="means|stds"):
            dd.GaussianMixture(bad["means"], bad["stds"], schedule=dd.VP())
    with pytest.raises(ValueError, match="weights"):
        dd.GaussianMixture(means, 0.5, torch.tensor([1.0, math.inf]), schedule=dd.VP())
    g = dd.GaussianMixture(means, 0.5, schedule=dd.VP())
    x = torch.zeros(1, 3, dtype=F64)
    assert torch.isfinite(g.log_prob(x, g.schedule.t_max))
    for t in (2.0, math.nan, -0.5, math.inf):
        for f in (g.log_prob, g.score, g.laplacian):
            with pytest.raises(ValueError, match="t "):
                f(x, t)
