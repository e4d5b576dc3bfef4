"""log_likelihood / bits_per_dim against the exact log-density of Gaussian mixtures."""

from __future__ import annotations

import math

import pytest
import torch

import diffdensity as dd
from conftest import F64, SCHEDULE_NAMES, gaussian_flow, gen, householder_rotation, make_mixture, make_schedule
from diffdensity.divergence import DivergenceEstimator


def exact_prior(gmm: dd.GaussianMixture):
    """log p_T of the mixture itself: isolates the ODE error from the Gaussian-prior approximation."""
    return lambda z: gmm.log_prob(z, gmm.schedule.t_max)


def dopri5_tolerance(result: dd.likelihood.LikelihoodResult, tol: float) -> float:
    """dopri5 keeps each step's local error of log p below atol + rtol |log p|; the global
    error is at most about (attempted steps) x that (the 5th-order update is used, more
    accurate than the 4th-order estimate being controlled)."""
    attempts = result.settings["accepted_steps"] + result.settings["rejected_steps"]
    return attempts * tol * (1 + float(result.delta_logp.abs().max()))


class _Recorder:
    """The mixture as a model that remembers the (folded) times of its last score call."""

    def __init__(self, gmm: dd.GaussianMixture):
        self.gmm, self.schedule, self.event_shape = gmm, gmm.schedule, gmm.event_shape

    def score(self, x, t, **cond):
        self.t = t
        return self.gmm.score(x, t)


class ClosedFormDivergence(DivergenceEstimator):
    """div s from the mixture's closed-form Laplacian: exact, at the cost of one score call
    (the divergence="exact" estimator costs D Jacobian products, too slow for D >= 1024 here)."""

    def __init__(self, model: _Recorder):
        super().__init__("reverse")
        self.model = model

    def __call__(self, fn, x, nfe=None):
        fx = fn(x)
        return fx, self.model.gmm.laplacian(x, self.model.t[: x.shape[0]])


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_exact_divergence_every_schedule_d2(name):
    sched = make_schedule(name)
    gmm = make_mixture(sched, 2, k=3, seed=0)
    x = gmm.sample(8, generator=gen(1))
    tol = 1e-5
    r = dd.log_likelihood(gmm, x, solver="dopri5", divergence=dd.Exact(mode="forward"), prior_logp=exact_prior(gmm), rtol=tol, atol=tol)
    exact = gmm.log_prob(x, sched.t_min)
    err = (r.logp - exact).abs().max().item()
    assert err < dopri5_tolerance(r, tol), (err, dopri5_tolerance(r, tol))
    # result fields
    assert r.logp.shape == r.prior_logp.shape == r.delta_logp.shape == (8,)
    assert r.logp.dtype == r.prior_logp.dtype == r.delta_logp.dtype == F64
    torch.testing.assert_close(r.logp, r.prior_logp + r.delta_logp, rtol=0, atol=0)
    torch.testing.assert_close(r.prior_logp, gmm.log_prob(r.x_T, sched.t_max), rtol=0, atol=0)
    assert r.x_T.shape == x.shape
    # dopri5 with first-same-as-last: 1 + 6 evaluations per attempt, D = 2 JVPs each
    attempts = r.settings["accepted_steps"] + r.settings["rejected_steps"]
    assert r.nfe.forward == 0 and 2 * (1 + 6 * attempts) <= r.nfe.jvp + r.nfe.vjp <= 2 * (1 + 6 * attempts) + 4  # either AD mode (+ timed trials)
    assert r.steps == r.settings["accepted_steps"]


@pytest.mark.parametrize("name", ["VP", "EDM", "RectifiedFlow"])
def test_single_gaussian_end_point_is_the_exact_flow(name):
    """K = 1: the PF-ODE map is affine; x_T must be it, and log p exact."""
    sched = make_schedule(name)
    gmm = make_mixture(sched, 3, k=1, seed=2)
    x = gmm.sample(5, generator=gen(3))
    tol = 1e-7
    r = dd.log_likelihood(gmm, x, solver="dopri5", divergence="exact", prior_logp=exact_prior(gmm), rtol=tol, atol=tol)
    x_T = gaussian_flow(gmm, x, sched.t_min, sched.t_max)
    torch.testing.assert_close(r.x_T, x_T, rtol=1e-5, atol=1e-5 * float(x_T.abs().max()))
    assert (r.logp - gmm.log_prob(x, sched.t_min)).abs().max() < dopri5_tolerance(r, tol)


def test_default_gaussian_prior():
    """Without prior_logp the schedule's N(0, sigma_T^2 I) is used; the ODE part is unchanged."""
    sched = dd.VP()
    gmm = make_mixture(sched, 2, k=3, seed=4)
    x = gmm.sample(6, generator=gen(5))
    a = dd.log_likelihood(gmm, x, steps=16, solver="heun", divergence="exact")
    b = dd.log_likelihood(gmm, x, steps=16, solver="heun", divergence="exact", prior_logp=exact_prior(gmm))
    torch.testing.assert_close(a.prior_logp, sched.prior_log_prob(a.x_T), rtol=0, atol=0)
    torch.testing.assert_close(a.delta_logp, b.delta_logp, rtol=0, atol=0)
    torch.testing.assert_close(a.logp - b.logp, sched.prior_log_prob(a.x_T) - gmm.log_prob(a.x_T, sched.t_max), rtol=0, atol=1e-12)
    # at logSNR -10, alpha_T = 6.7e-3: the neglected mean shift costs ~alpha_T mu.x_T = O(1e-2) nats
    assert (a.logp - b.logp).abs().max() < 2e-2
    assert a.settings["solver"] == "heun" and a.settings["grid"] == "log_snr" and a.steps == 16


@pytest.mark.parametrize("name", ["VP", "EDM"])
def test_exact_divergence_rotated_d64(name):
    sched = make_schedule(name)
    gmm = make_mixture(sched, 64, k=4, seed=6)
    x = gmm.sample(3, generator=gen(7))
    tol = 1e-5
    r = dd.log_likelihood(gmm, x, solver="dopri5", divergence="exact", prior_logp=exact_prior(gmm), rtol=tol, atol=tol)
    err = (r.logp - gmm.log_prob(x, sched.t_min)).abs().max().item()
    assert err < dopri5_tolerance(r, tol), (err, dopri5_tolerance(r, tol))


def hutchinson_vs_closed_form(gmm, x, *, steps: int, probes: int, noise: str, seed: int):
    """Heun on the same grid with the closed-form divergence and with Hutchinson: the x path
    does not depend on the divergence, so their difference is pure zero-mean estimator noise."""
    model = _Recorder(gmm)
    ref = dd.log_likelihood(model, x, steps=steps, solver="heun", divergence=ClosedFormDivergence(model), prior_logp=exact_prior(gmm))
    est = dd.Hutchinson(probes, noise=noise, mode="forward")
    hut = dd.log_likelihood(gmm, x, steps=steps, solver="heun", divergence=est, generator=gen(seed), prior_logp=exact_prior(gmm))
    torch.testing.assert_close(hut.x_T, ref.x_T, rtol=0, atol=0)
    assert hut.nfe.forward == 0 and 2 * steps * probes <= hut.nfe.jvp + hut.nfe.vjp <= 2 * steps * probes + 4  # 2 Heun stages per step, either AD mode (+ timed trials)
    diff = hut.logp - ref.logp
    se = diff.std() / math.sqrt(diff.shape[0])  # measured standard error of the mean
    assert diff.abs().max() > 0  # the estimate is noisy, not silently exact
    assert diff.mean().abs() < 4 * se, (diff.mean(), se)
    return ref, hut


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_rotated_d64(noise):
    sched = dd.VP()
    gmm = make_mixture(sched, 64, k=4, seed=8)
    x = gmm.sample(8, generator=gen(9)).repeat(4, 1)  # 32 independent estimates
    ref, hut = hutchinson_vs_closed_form(gmm, x, steps=64, probes=1, noise=noise, seed=10)
    # Heun's O(h^2) bias on this grid is far below the noise; both are centred on the exact value
    exact = gmm.log_prob(x, sched.t_min)
    err = hut.logp - exact
    assert err.mean().abs() < 4 * err.std() / math.sqrt(err.shape[0]) + (ref.logp - exact).abs().max()


def test_rotated_d1024():
    """D = 1024 with a dense rotation: Heun converges at second order on the exact divergence
    (Richardson: the 64-step error is (L_32 - L_64) / 3), and Hutchinson adds only zero-mean noise."""
    sched = dd.VP()
    d = 1024
    gmm = make_mixture(sched, d, k=4, seed=11, rotation=householder_rotation(d, generator=gen(12)))
    x = gmm.sample(4, generator=gen(13))
    exact = gmm.log_prob(x, sched.t_min)
    model = _Recorder(gmm)
    runs = {n: dd.log_likelihood(model, x, steps=n, solver="heun", divergence=ClosedFormDivergence(model), prior_logp=exact_prior(gmm)) for n in (32, 64)}
    err64 = runs[64].logp - exact
    predicted = (runs[32].logp - runs[64].logp) / 3
    assert (err64.abs() < 5.0).all()  # a few nats out of |log p| ~ 1e3 at 64 steps
    torch.testing.assert_close(err64, predicted, rtol=0.15, atol=0.02)
    # Hutchinson with one Rademacher probe: 4 points x 4 repeats = 16 independent estimates
    # (the comparison is noise only, so a coarse grid will do)
    hutchinson_vs_closed_form(gmm, x.repeat(4, 1), steps=16, probes=1, noise="rademacher", seed=14)


@pytest.mark.parametrize("grid", ["log_snr", "tapered", "uniform", "karras"])
def test_time_grids(grid):
    """Heun is second order on every grid: the 64-step error is (L_32 - L_64) / 3 (Richardson)."""
    sched = dd.VPCosine()
    gmm = make_mixture(sched, 2, k=2, seed=15)
    x = gmm.sample(4, generator=gen(16))
    exact = gmm.log_prob(x, sched.t_min)
    runs = {n: dd.log_likelihood(gmm, x, steps=n, solver="heun", grid=grid, divergence="exact", prior_logp=exact_prior(gmm)) for n in (32, 64)}
    assert runs[64].settings["grid"] == grid
    err64 = runs[64].logp - exact
    torch.testing.assert_close(err64, (runs[32].logp - runs[64].logp) / 3, rtol=0.3, atol=3e-4)


def test_float32_input():
    sched = dd.VP()
    gmm = make_mixture(sched, 2, k=2, seed=17)
    x = gmm.sample(4, generator=gen(18))
    a = dd.log_likelihood(gmm, x, steps=24, divergence="exact")
    b = dd.log_likelihood(gmm, x.float(), steps=24, divergence="exact")
    assert b.logp.dtype == F64 and b.x_T.dtype == torch.float32
    torch.testing.assert_close(b.logp, a.logp, rtol=0, atol=1e-3)


def image_mixture(seed: int) -> dd.GaussianMixture:
    """A mixture whose data are 1 x 4 x 4 images in [-1, 1], a few bins wide per component."""
    g = gen(seed)
    k, shape = 3, (1, 4, 4)
    means = torch.empty(k, *shape, dtype=F64).uniform_(-0.6, 0.6, generator=g)
    stds = torch.empty(k, *shape, dtype=F64).uniform_(0.05, 0.15, generator=g)
    return dd.GaussianMixture(means, stds, schedule=dd.VP(), rotation=dd.random_rotation(16, generator=g))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1 - 1e-9) + 1) * 128).floor().to(torch.uint8)


def test_bits_per_dim():
    gmm = image_mixture(19)
    images = to_uint8(gmm.sample(3, generator=gen(20)))
    tol = 1e-5
    r = dd.bits_per_dim(gmm, images, draws=2, generator=gen(21), dtype=F64, solver="dopri5", divergence="exact", prior_logp=exact_prior(gmm), rtol=tol, atol=tol)
    dim = 16
    assert r.logp.shape == (2, 3) and r.bpd.shape == (3,) and r.bpd.dtype == F64
    # the formula of docs/math.md s.7, averaged over the dequantisation draws
    torch.testing.assert_close(r.bpd, (-r.logp / (dim * math.log(2)) + 7).mean(0), rtol=1e-14, atol=0)
    # the draws are u + U(0, 1) from the generator (divergence="exact" draws no probes)
    g = gen(21)
    u = images.to(F64)
    for i in range(2):
        x = 2 * (u + torch.rand(u.shape, generator=g, dtype=F64)) / 256 - 1
        assert ((x + 1) * 128).floor().to(torch.uint8).equal(images)  # stays in its bin
        assert (r.logp[i] - gmm.log_prob(x, gmm.schedule.t_min)).abs().max() < 1e-2
    assert r.nfe.jvp > 0 and r.settings["draws"] == 2


def test_bits_per_dim_validation():
    gmm = image_mixture(22)
    ok = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        dd.bits_per_dim(gmm, ok.tolist())
    for bad in (torch.full((2, 1, 4, 4), 256), torch.full((2, 1, 4, 4), -1), torch.full((2, 1, 4, 4), 0.5), torch.full((2, 1, 4, 4), float("nan"))):
        with pytest.raises(ValueError, match=r"integer values in \[0, 255\]"):
            dd.bits_per_dim(gmm, bad)
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        dd.bits_per_dim(gmm, ok, draws=0)
    with pytest.raises(ValueError, match="event shape"):
        dd.bits_per_dim(gmm, torch.zeros(2, 16, dtype=torch.uint8), draws=1, steps=2, divergence="exact")


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_hutchinson_every_schedule_d2(name):
    sched = make_schedule(name)
    gmm = make_mixture(sched, 2, k=3, seed=23)
    x = gmm.sample(8, generator=gen(24)).repeat(2, 1)
    ref, hut = hutchinson_vs_closed_form(gmm, x, steps=16, probes=1, noise="rademacher", seed=25)
    # same seed, same estimate; another seed, another one
    again = dd.log_likelihood(gmm, x, steps=16, solver="heun", divergence=dd.Hutchinson(1), generator=gen(25), prior_logp=exact_prior(gmm))
    other = dd.log_likelihood(gmm, x, steps=16, solver="heun", divergence=dd.Hutchinson(1), generator=gen(26), prior_logp=exact_prior(gmm))
    assert torch.equal(again.logp, hut.logp) and not torch.equal(other.logp, hut.logp)


# -- defaults, error bars, precision target, bad input -------------------------------------


def hard_mixture(dim: int, seed: int) -> dd.GaussianMixture:
    """Like the benchmark's hard mixture at small D: 6 components, scales 0.03..0.7 with
    per-dimension jitter, densely rotated."""
    g = gen(seed)
    base = torch.exp(torch.linspace(math.log(0.03), math.log(0.7), 6, dtype=F64))
    stds = base[:, None] * torch.empty(6, dim, dtype=F64).uniform_(math.log(0.8), math.log(1.25), generator=g).exp()
    means = torch.randn(6, dim, generator=g, dtype=F64)
    return dd.GaussianMixture(means, stds, schedule=dd.VP(), rotation=householder_rotation(dim, generator=g))


def test_default_is_accurate_and_reports_calibrated_error_bars():
    """D = 256 (the benchmark checks D = 3072): the default estimate is within 1 nat, and over
    24 probe seeds (the batch repeated) (estimate - exact - bias) / stderr has unit spread."""
    gmm = hard_mixture(256, seed=30)
    n, reps = 6, 24
    x = gmm.sample(n, generator=gen(31))
    r = dd.log_likelihood(gmm, x.repeat(reps, 1), prior_logp=exact_prior(gmm), generator=gen(32))
    assert r.settings["solver"] == "rk4" and r.steps == 24 and r.settings["divergence"].startswith("Hutchinson(probes=2")
    assert r.stderr.shape == (n * reps,) and r.stderr.dtype == F64 and (r.stderr > 0).all() and r.error is None
    exact = gmm.log_prob(x, gmm.schedule.t_min)
    err = (r.logp.reshape(reps, n) - exact)
    assert float(err.abs().mean()) < 1.0, err.abs().mean()
    bias = err.mean(0)
    z = (err - bias) / r.stderr.reshape(reps, n)
    spread = float(z.std() * math.sqrt(reps / (reps - 1)))  # the bias is estimated from the same runs
    assert 0.8 <= spread <= 1.25, spread
    # 4 evaluations per RK4 step, each one primal for its 2 products (+ at most 3 while the AD mode is measured)
    assert 4 * 24 <= r.settings["primal_passes"] <= 4 * 24 + 3 and 2 * 4 * 24 <= r.nfe.jvp + r.nfe.vjp <= 2 * (4 * 24 + 3)


def test_one_probe_states_a_calibrated_error_too():
    """One probe per evaluation: its variance comes from the previous evaluation's independent
    probe (docs/math.md s.9); over 24 probe seeds the error bars have unit spread, as with two."""
    gmm = hard_mixture(256, seed=30)
    n, reps = 6, 24
    x = gmm.sample(n, generator=gen(31))
    r = dd.log_likelihood(gmm, x.repeat(reps, 1), probes=1, prior_logp=exact_prior(gmm), generator=gen(33))
    err = r.logp.reshape(reps, n) - gmm.log_prob(x, gmm.schedule.t_min)
    z = (err - err.mean(0)) / r.stderr.reshape(reps, n)
    spread = float(z.std() * math.sqrt(reps / (reps - 1)))
    assert 0.8 <= spread <= 1.25, spread
    assert r.nfe.jvp + r.nfe.vjp <= 4 * 24 + 1 + 3  # one product per evaluation, one more for the first


def test_exact_divergence_has_zero_stderr_and_a_single_shared_probe_none():
    gmm = make_mixture(dd.VP(), 3, k=2, seed=33)
    x = gmm.sample(4, generator=gen(34))
    exact = dd.log_likelihood(gmm, x, steps=8, divergence="exact")
    assert torch.equal(exact.stderr, torch.zeros(4, dtype=F64))
    shared = dd.log_likelihood(gmm, x, steps=8, divergence=dd.Hutchinson(1, resample="step"), generator=gen(35))
    assert shared.stderr is None
    adaptive = dd.log_likelihood(gmm, x, solver="bosh3", divergence="exact", rtol=1e-6, atol=1e-6, prior_logp=exact_prior(gmm))
    truth = gmm.log_prob(x, gmm.schedule.t_min)
    # the embedded estimate bounds the error of the higher-order result
    assert adaptive.error.shape == (4,) and ((adaptive.logp - truth).abs() <= adaptive.error.abs() + 1e-9).all()
    cos = make_mixture(dd.VPCosine(), 2, k=2, seed=15)  # the mixture of test_time_grids: Heun in its asymptotic range
    xc = cos.sample(4, generator=gen(16))
    halved = dd.log_likelihood(cos, xc, steps=64, solver="heun", divergence="exact", prior_logp=exact_prior(cos), step_halving=True)
    torch.testing.assert_close(halved.error, halved.logp - cos.log_prob(xc, cos.schedule.t_min), rtol=0.3, atol=3e-4)
    assert halved.settings["step_halving"]["steps"] == 32


def test_target_stderr_adds_probes_until_met():
    gmm = hard_mixture(128, seed=36)
    x = gmm.sample(4, generator=gen(37))
    first = dd.log_likelihood(gmm, x, steps=8, prior_logp=exact_prior(gmm), generator=gen(38))
    target = 0.5 * float(first.stderr.min())
    r = dd.log_likelihood(gmm, x, steps=8, prior_logp=exact_prior(gmm), generator=gen(38), target_stderr=target)
    info = r.settings["target_stderr"]
    assert info["met"] and (r.stderr <= target).all() and info["rounds"] >= 1 and info["max_probes_used"] >= 8
    assert info["extra_nfe"] > 0 and r.nfe.total == first.nfe.total + info["extra_nfe"]
    ref = dd.log_likelihood(gmm, x, steps=8, divergence="exact", prior_logp=exact_prior(gmm))
    assert ((r.logp - ref.logp).abs() < 4 * r.stderr).all()  # same grid: the difference is probe noise
    with pytest.warns(UserWarning, match="not met with max_probes=4"):
        dd.log_likelihood(gmm, x, steps=8, prior_logp=exact_prior(gmm), generator=gen(38), target_stderr=1e-6, max_probes=4)
    with pytest.raises(ValueError, match="target_stderr needs"):
        dd.log_likelihood(gmm, x, steps=8, divergence=dd.Hutchinson(1, resample="step"), target_stderr=1.0)


def test_bits_per_dim_stderr():
    gmm = image_mixture(39)
    images = to_uint8(gmm.sample(3, generator=gen(40)))
    r = dd.bits_per_dim(gmm, images, draws=2, generator=gen(41), dtype=F64, steps=8)
    assert r.stderr.shape == (3,) and (r.stderr > 0).all()
    assert dd.bits_per_dim(gmm, images, draws=1, generator=gen(41), dtype=F64, steps=8, divergence="exact").stderr.abs().max() == 0


class _NaNModel(_Recorder):
    def score(self, x, t, **cond):
        s = super().score(x, t).clone()
        s[1] = float("nan")
        return s


def test_bad_input_is_refused_clearly():
    import numpy as np

    gmm = make_mixture(dd.VP(), 3, k=2, seed=42)
    x = gmm.sample(4, generator=gen(43))
    r = dd.log_likelihood(gmm, x, steps=np.int64(4), divergence="exact")  # numpy integers are integers
    assert r.steps == 4
    for value in (math.nan, 0.0, -1.0):
        for name in ("rtol", "atol"):
            with pytest.raises(ValueError, match=f"{name} must be"):
                dd.log_likelihood(gmm, x, solver="dopri5", **{name: value})
    for generator in (0, np.random.default_rng(0)):
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            dd.log_likelihood(gmm, x, generator=generator)
    with pytest.raises(ValueError, match=r"x has values up to 1e\+300"):
        dd.log_likelihood(gmm, torch.full_like(x, 1e300))
    with pytest.raises(FloatingPointError, match=r"network output is NaN or Inf at t=0 for 1 of 4 samples \(indices 1\).*more steps will not help"):
        dd.log_likelihood(_NaNModel(gmm), x, steps=4)
    bad_prior = lambda z: torch.where(torch.arange(4) == 3, math.nan, 0.0).to(F64)  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"prior_logp\(x_T\) is NaN or Inf at t=1 for 1 of 4 samples \(indices 3\)"):
        dd.log_likelihood(gmm, x, steps=4, divergence="exact", prior_logp=bad_prior)
