"""Tracked log-density of samples against the exact log p_{t_min} of rotated Gaussian mixtures.

Every test starts from the exact ``log p_{t_max}`` of the mixture (``prior_logp``), so the
difference between the tracked value and ``gmm.log_prob(x, t_min)`` is the integrator's
error alone (plus the divergence estimator's noise where Hutchinson is used). The
tolerances below are stated as functions of the number of steps N; their constants are
about twice the errors measured on these mixtures.
"""

import math

import pytest
import torch

import diffdensity as dd
from diffdensity.divergence import Exact
from diffdensity.sampling import sample
from conftest import gen, make_mixture

F64 = torch.float64
EXACT = dict(divergence=Exact(mode="reverse"))  # exact div s in D = 2 (two reverse passes)


def mixture(dim, k=3, seed=0, std_range=(0.1, 1.0), schedule=None):
    return make_mixture(schedule or dd.VP(), dim, k, seed=seed, std_range=std_range)


@pytest.fixture(scope="module")
def gmm2():
    return mixture(2)


@pytest.fixture(scope="module")
def gmm512():
    return mixture(512, seed=1)


def scaled_drift(gmm, k):
    """``u = f x - k g^2 s / 2``: PF-ODE drift for k = 1, reverse-SDE drift for k = 2."""

    def drift(x, t, s):
        sv = gmm.schedule(t)
        return sv.f[:, None] * x - 0.5 * k * sv.g2[:, None] * s

    return drift


def gamma_diffusion(gmm, gamma):
    """``phi = gamma g(t)``; with drift ``k = 1 + gamma^2`` this SDE keeps the marginals p_t."""
    return lambda x, t: gamma * gmm.schedule(t).g2.sqrt()


def tracking_error(gmm, n, *, seed=1, **kwargs):
    sched = gmm.schedule
    r = sample(gmm, n, generator=gen(seed), dtype=F64, prior_logp=lambda x: gmm.log_prob(x, sched.t_max), **kwargs)
    return r.logp - gmm.log_prob(r.x, sched.t_min), r


def slope(ns, errs):
    """Least-squares slope of log(error) against log(N)."""
    x = torch.log(torch.tensor(ns, dtype=F64))
    y = torch.log(torch.tensor(errs, dtype=F64))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


# -- deterministic dynamics: Heun, second order --------------------------------------------

ODE_CASES = {
    "pf-ode": lambda g: dict(method="pf-ode"),
    "hd": lambda g: dict(method="hd", log_snr_threshold=2.0),
    "custom-ode": lambda g: dict(method="custom", drift=scaled_drift(g, 1.5)),
}


@pytest.mark.parametrize("case", list(ODE_CASES))
def test_ode_tracking_converges_at_second_order_d2(gmm2, case):
    """D = 2, exact divergence: per-sample error <= 400 / N^2 nats (Heun's O(h^2);
    measured: mean abs error <= 40 / N^2, worst sample <= 240 / N^2) and log-log slope ~ -2."""
    ns, maes = (48, 96, 192), []
    for n in ns:
        err, r = tracking_error(gmm2, 48, steps=n, **ODE_CASES[case](gmm2), **EXACT)
        assert err.abs().max() <= 400 / n**2, (n, float(err.abs().max()))
        maes.append(float(err.abs().mean()))
    assert -2.5 < slope(ns, maes) < -1.7, maes


@pytest.mark.parametrize("case", list(ODE_CASES))
def test_ode_tracking_in_high_dimension(gmm512, case):
    """D = 512, Hutchinson (4 probes): error dominated by the estimator's noise, about
    2 nats at N = 32 and shrinking like N^-1/2 (Heun's own bias is ~1 nat here):
    per-sample tolerance 8 sqrt(32 / N) nats."""
    n = 32
    err, r = tracking_error(gmm512, 4, steps=n, probes=4, **ODE_CASES[case](gmm512))
    assert err.abs().max() <= 8 * math.sqrt(32 / n), err
    assert r.nfe.forward == 0 and r.nfe.jvp == 2 * n * 4


# -- stochastic dynamics ----------------------------------------------------------------

SDE_CASES = {
    "sde-tweedie": lambda g: dict(method="sde", solver="tweedie"),
    "sde-ancestral": lambda g: dict(method="sde", solver="ancestral"),
    "sde-euler-maruyama": lambda g: dict(method="sde", solver="euler-maruyama"),
    "custom-sde": lambda g: dict(method="custom", drift=scaled_drift(g, 1.25), diffusion=gamma_diffusion(g, 0.5)),
}


@pytest.mark.parametrize("case", list(SDE_CASES))
def test_sde_tracking_converges_at_strong_order_half_d2(gmm2, case):
    """D = 2: the pathwise error is a martingale of O(sqrt(h)) plus an O(h) bias. RMS error
    <= 35 / sqrt(N) nats (measured constants: 4 custom SDE, 9 tweedie, 12 ancestral,
    16 Euler-Maruyama) and it halves when N quadruples (log-log slope ~ -1/2)."""
    ns, rms = (128, 512), []
    for n in ns:
        err, _ = tracking_error(gmm2, 256, steps=n, **SDE_CASES[case](gmm2), **EXACT)
        rms.append(float(err.pow(2).mean().sqrt()))
        assert rms[-1] <= 35 / math.sqrt(n), (n, rms[-1])
    assert -0.8 < slope(ns, rms) < -0.35, rms


# mean error <= C D dlambda with dlambda = 20 / N the logSNR step (measured C: 0.07-0.10
# tweedie, 1.4-1.6 ancestral, 1.4-2.2 Euler-Maruyama, 0-0.11 custom SDE)
SDE_BIAS_CONSTANT = {"sde-tweedie": 0.25, "sde-ancestral": 3.0, "sde-euler-maruyama": 3.0, "custom-sde": 0.25}


@pytest.mark.parametrize("case", list(SDE_CASES))
def test_sde_tracking_in_high_dimension(gmm512, case):
    """D = 512: the error is mostly bias, first order in the step and proportional to D.
    Per-sample tolerance: C D (20 / N) + 5 nats, C from SDE_BIAS_CONSTANT."""
    n = 64
    opts = SDE_CASES[case](gmm512)
    if case == "custom-sde":
        opts["probes"] = 4
    err, r = tracking_error(gmm512, 4, steps=n, **opts)
    tol = SDE_BIAS_CONSTANT[case] * 512 * 20 / n + 5
    assert err.abs().max() <= tol, (float(err.abs().max()), tol)
    if case != "custom-sde":
        assert (r.nfe.forward, r.nfe.jvp, r.nfe.vjp) == (n, 0, 0)


def test_sde_bias_is_first_order_and_tweedie_beats_euler_maruyama(gmm512):
    """D = 512: quadrupling N divides the mean error by ~4 (slope -1); at equal network
    passes the Bayes-rule scheme with the Tweedie variance is >= 4x closer than
    Euler-Maruyama (measured ~25x here)."""
    ns = (32, 128)
    means = {}
    for solver in ("tweedie", "euler-maruyama"):
        means[solver] = [float(tracking_error(gmm512, 8, steps=n, method="sde", solver=solver)[0].mean()) for n in ns]
        assert -1.3 < slope(ns, means[solver]) < -0.7, (solver, means[solver])
    for i in range(len(ns)):
        assert 4 * abs(means["tweedie"][i]) < means["euler-maruyama"][i], means


@pytest.mark.parametrize("name", ["VPLinear", "VPCosine", "VE", "EDM", "RectifiedFlow"])
def test_tracking_on_other_schedules(name):
    """The Gaussian kernels and the ODE tracking hold for every schedule (D = 2). Heun's
    worst-sample constant depends on the schedule (measured 100 cosine ... 870 VE, in
    nats step^2): tolerance 2000 / N^2."""
    sched = {"VPLinear": dd.VPLinear(), "VPCosine": dd.VPCosine(), "VE": dd.VE(), "EDM": dd.EDM(), "RectifiedFlow": dd.RectifiedFlow()}[name]
    gmm = mixture(2, schedule=sched)
    err, _ = tracking_error(gmm, 64, steps=256, method="sde")
    assert err.pow(2).mean().sqrt() < 35 / math.sqrt(256), err
    err, _ = tracking_error(gmm, 16, steps=64, method="pf-ode", **EXACT)
    assert err.abs().max() < 2000 / 64**2, err
