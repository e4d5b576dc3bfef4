"""Runge-Kutta solvers over (x, log p): convergence order, adaptivity, callbacks, errors."""

from __future__ import annotations

import math

import pytest
import torch

import diffdensity as dd
from conftest import F64, gaussian_flow, gen, make_mixture
from diffdensity.dynamics import PFODE
from diffdensity.solvers import TABLEAUX, odeint


class ExactPFODE:
    """PF-ODE of an exact mixture with the closed-form Laplacian (docs/math.md s.3a):
    dx/dt = f x - g^2 s / 2,  d log p_t(x_t)/dt = -D f + g^2 div s / 2. Counts its calls."""

    def __init__(self, gmm: dd.GaussianMixture):
        self.gmm, self.calls = gmm, 0

    def __call__(self, t, x):
        self.calls += 1
        v = self.gmm.schedule(t)
        u = v.f * x - 0.5 * v.g2 * self.gmm.score(x, t)
        rate = -self.gmm.dim * v.f + 0.5 * v.g2 * self.gmm.laplacian(x, t)
        return u, rate


def slope(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(step size)."""
    h = torch.tensor([1.0 / n for n in steps], dtype=F64).log()
    e = torch.tensor(errors, dtype=F64).log()
    return float(((h - h.mean()) * (e - e.mean())).sum() / (h - h.mean()).square().sum())


# step counts in the asymptotic range of each method (errors far above round-off)
ORDERS = [
    ("euler", 1, [32, 64, 128, 256]),
    ("heun", 2, [16, 32, 64, 128]),
    ("midpoint", 2, [16, 32, 64, 128]),
    ("rk4", 4, [16, 32, 64, 128]),
]


@pytest.mark.parametrize("method, order, steps", ORDERS)
def test_convergence_order_on_a_single_gaussian(method, order, steps):
    """Exact flow and density: the errors of x and of log p both shrink like h^order."""
    sched = dd.VP()
    gmm = make_mixture(sched, 3, k=1, seed=0)
    t0, t1 = 0.2, 0.8
    x0 = gmm.sample_t(6, t0, generator=gen(1))
    x1 = gaussian_flow(gmm, x0, t0, t1)
    exact_dlogp = gmm.log_prob(x1, t1) - gmm.log_prob(x0, t0)
    ex, elp = [], []
    for n in steps:
        sol = odeint(ExactPFODE(gmm), x0, torch.linspace(t0, t1, n + 1, dtype=F64), logp=torch.zeros(6, dtype=F64), method=method)
        ex.append(float((sol.x - x1).abs().max()))
        elp.append(float((sol.logp - exact_dlogp).abs().max()))
    assert abs(slope(steps, ex) - order) < 0.25, (ex, slope(steps, ex))
    assert abs(slope(steps, elp) - order) < 0.25, (elp, slope(steps, elp))


@pytest.mark.parametrize("method, order, steps", ORDERS)
def test_convergence_order_of_log_density_on_a_mixture(method, order, steps):
    """Rotated 3-component mixture: the log-density rate depends on x. Along the exact flow
    log p_t(x_t) - logp_state(t) is constant, so the defect
    logp_state - [log p_t1(X) - log p_t0(x0)] at the numerical end point X is an exact
    error measure; it converges at the solver's order."""
    gmm = make_mixture(dd.VP(), 4, k=3, seed=2)
    t0, t1 = 0.2, 0.8
    x0 = gmm.sample_t(8, t0, generator=gen(3))
    errors = []
    for n in steps:
        sol = odeint(ExactPFODE(gmm), x0, torch.linspace(t0, t1, n + 1, dtype=F64), logp=torch.zeros(8, dtype=F64), method=method)
        defect = sol.logp - (gmm.log_prob(sol.x, t1) - gmm.log_prob(x0, t0))
        errors.append(float(defect.abs().mean()))
    assert abs(slope(steps, errors) - order) < 0.25, (errors, slope(steps, errors))


@pytest.mark.parametrize("method", ["euler", "heun", "rk4", "bosh3", "dopri5"])
def test_both_directions_of_time(method):
    """Backward in t (noise -> data) from the exact x_t1 returns to x_t0 with the right density."""
    gmm = make_mixture(dd.VPCosine(), 3, k=1, seed=4)
    t0, t1 = 0.3, 0.7
    x0 = gmm.sample_t(5, t0, generator=gen(5))
    x1 = gaussian_flow(gmm, x0, t0, t1)
    lp1 = gmm.log_prob(x1, t1)
    ts = torch.linspace(t1, t0, 65, dtype=F64)  # decreasing
    sol = odeint(ExactPFODE(gmm), x1, ts, logp=lp1, method=method, rtol=1e-8, atol=1e-8)
    # 64 steps of h = 1/160: errors ~h (4e-3), ~h^2 (2e-5), ~h^4 (3e-10); adaptive: ~steps x 1e-8
    tol = {"euler": 2e-2, "heun": 1e-4, "rk4": 1e-8, "bosh3": 1e-6, "dopri5": 1e-6}[method]
    torch.testing.assert_close(sol.x, x0, rtol=0, atol=tol)
    torch.testing.assert_close(sol.logp, gmm.log_prob(x0, t0), rtol=0, atol=tol)
    assert sol.ts[0].item() == t1 and abs(sol.ts[-1].item() - t0) < 1e-12
    assert (sol.ts.diff() < 0).all()


@pytest.mark.parametrize("method", ["bosh3", "dopri5"])
def test_adaptive_solvers_reach_their_tolerance(method):
    gmm = make_mixture(dd.VP(), 3, k=1, seed=6)
    t0, t1 = 0.05, 0.95
    x0 = gmm.sample_t(4, t0, generator=gen(7))
    x1 = gaussian_flow(gmm, x0, t0, t1)
    exact_dlogp = gmm.log_prob(x1, t1) - gmm.log_prob(x0, t0)
    prev_steps = 0
    for tol in (1e-4, 1e-6, 1e-8) if method == "dopri5" else (1e-3, 1e-5, 1e-7):
        func = ExactPFODE(gmm)
        sol = odeint(func, x0, torch.tensor([t0, t0 + 0.01, t1], dtype=F64), logp=torch.zeros(4, dtype=F64), method=method, rtol=tol, atol=tol)
        # the local error per step is held below tol (x and log p scales are O(1)-O(10));
        # the global error is at most about (steps x tol)
        bound = sol.steps * tol * 10
        assert float((sol.x - x1).abs().max()) < bound
        assert float((sol.logp - exact_dlogp).abs().max()) < bound
        assert sol.steps > prev_steps  # tighter tolerance, more steps
        prev_steps = sol.steps
        # first-same-as-last: one evaluation to start, then stages - 1 per attempt
        stages = len(TABLEAUX[method].c)
        assert func.calls == 1 + (stages - 1) * (sol.steps + sol.rejected)
        assert sol.ts.shape == (sol.steps + 1,) and sol.logp_path.shape == (sol.steps + 1, 4)
        assert abs(sol.ts[-1].item() - t1) < 1e-12 and (sol.ts.diff() > 0).all()


def test_adaptive_without_fsal_and_rejections():
    gmm = make_mixture(dd.VP(), 3, k=2, seed=8)
    x0 = gmm.sample_t(4, 0.1, generator=gen(9))
    begins = []
    func = ExactPFODE(gmm)
    # a far too large first step forces rejections
    sol = odeint(func, x0, torch.tensor([0.1, 0.9], dtype=F64), logp=torch.zeros(4, dtype=F64), method="dopri5", rtol=1e-7, atol=1e-7, fsal=False, begin_step=lambda: begins.append(1))
    assert sol.rejected > 0
    assert len(begins) == sol.steps + sol.rejected
    assert func.calls == 7 * (sol.steps + sol.rejected)
    ref = odeint(ExactPFODE(gmm), x0, torch.tensor([0.1, 0.9], dtype=F64), logp=torch.zeros(4, dtype=F64), method="dopri5", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(sol.logp, ref.logp, rtol=0, atol=1e-5)


def test_callbacks_at_the_start_and_once_per_accepted_step():
    gmm = make_mixture(dd.VP(), 3, k=2, seed=10)
    x0 = gmm.sample_t(4, 0.1, generator=gen(11))
    for method, ts in (("heun", dd.VP().time_grid(12, t_start=0.1, t_end=0.9)), ("dopri5", torch.tensor([0.1, 0.9], dtype=F64))):
        seen, begins = [], []
        sol = odeint(ExactPFODE(gmm), x0, ts, logp=torch.zeros(4, dtype=F64), method=method, rtol=1e-6, atol=1e-6, callback=seen.append, begin_step=lambda: begins.append(1))
        # step 0 is the initial state; rejected attempts are never reported
        assert [info.step for info in seen] == list(range(sol.steps + 1))
        assert torch.equal(torch.tensor([info.t for info in seen], dtype=F64), sol.ts)
        assert torch.equal(torch.stack([info.logp for info in seen]), sol.logp_path)
        assert torch.equal(seen[0].x, x0) and torch.equal(seen[-1].x, sol.x)
        assert len(begins) == sol.steps + sol.rejected
        if method == "heun":  # fixed steps go exactly through the grid
            assert sol.steps == 12 and torch.equal(sol.ts, ts) and sol.rejected == 0
        else:  # the first step (0.8) is far too large: some attempts are rejected
            assert sol.rejected > 0


def test_log_density_is_optional():
    gmm = make_mixture(dd.VP(), 3, k=2, seed=12)
    x0 = gmm.sample_t(4, 0.2, generator=gen(13))
    ts = torch.linspace(0.2, 0.6, 9, dtype=F64)
    with_lp = odeint(ExactPFODE(gmm), x0, ts, logp=torch.zeros(4, dtype=F64))
    no_start = odeint(ExactPFODE(gmm), x0, ts)  # rate returned, no start: accumulates from zero
    torch.testing.assert_close(no_start.logp, with_lp.logp, rtol=0, atol=1e-14)
    assert no_start.logp.dtype == F64

    def drift_only(t, x):
        return ExactPFODE(gmm)(t, x)[0], None

    sol = odeint(drift_only, x0, ts)
    assert sol.logp is None and sol.logp_path is None
    torch.testing.assert_close(sol.x, with_lp.x, rtol=0, atol=0)


def test_float32_state_keeps_float64_log_density():
    gmm = make_mixture(dd.VP(), 3, k=2, seed=14)
    x0 = gmm.sample_t(4, 0.2, generator=gen(15), dtype=torch.float32)
    sol = odeint(ExactPFODE(gmm), x0, torch.linspace(0.2, 0.6, 9, dtype=F64), logp=torch.zeros(4, dtype=F64))
    assert sol.x.dtype == torch.float32 and sol.logp.dtype == F64


def test_pfode_dynamics_with_exact_divergence_matches_closed_form():
    gmm = make_mixture(dd.VP(), 4, k=3, seed=16)
    x = gmm.sample_t(3, 0.4, generator=gen(17))
    t = torch.tensor(0.4, dtype=F64)
    dyn = PFODE(gmm, divergence=dd.Exact())
    u, rate = dyn(t, x)
    u_ref, rate_ref = ExactPFODE(gmm)(t, x)
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rate, rate_ref, rtol=1e-10, atol=1e-10)
    assert dyn.nfe.jvp == 4 and dyn.nfe.forward == 0
    u2, none = PFODE(gmm)(t, x)
    assert none is None
    torch.testing.assert_close(u2, u_ref, rtol=1e-12, atol=1e-12)


def test_solver_errors():
    gmm = make_mixture(dd.VP(), 3, k=1, seed=18)
    x = gmm.sample_t(2, 0.2, generator=gen(19))
    ts = torch.linspace(0.2, 0.6, 5, dtype=F64)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        odeint(ExactPFODE(gmm), bad, ts)
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        odeint(ExactPFODE(gmm), bad, ts)
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        odeint(ExactPFODE(gmm), x, ts, method="rk45")
    with pytest.raises(ValueError, match="at least two time points"):
        odeint(ExactPFODE(gmm), x, ts[:1])
    with pytest.raises(RuntimeError, match="more than 3 steps"):
        odeint(ExactPFODE(gmm), x, torch.tensor([0.2, 0.2001, 0.9], dtype=F64), method="dopri5", rtol=1e-10, atol=1e-10, max_steps=3)

    def blows_up(t, x):
        u = gmm.score(x, t.expand(x.shape[0]))
        u[1] = math.nan
        return u, None

    # a NaN from the dynamics names the time, the sample and the culprit (not the step size)
    with pytest.raises(FloatingPointError, match=r"dx/dt is NaN or Inf at t=0.2 for 1 of 2 samples \(indices 1\).*more steps will not help"):
        odeint(blows_up, x, ts, method="bosh3")

    def nan_rate(t, x):
        r = torch.zeros(x.shape[0], dtype=F64)
        r[0] = math.inf if float(t) > 0.3 else 0.0
        return -x, r

    with pytest.raises(FloatingPointError, match=r"log-density rate is NaN or Inf at t=0.4 for 1 of 2 samples \(indices 0\)"):
        odeint(nan_rate, x, ts, logp=torch.zeros(2, dtype=F64))

    def explodes(t, x):  # finite rates, but the state overflows
        return torch.full_like(x, 1e308), None

    with pytest.raises(FloatingPointError, match=r"the state x is NaN or Inf at t=0.3 for 2 of 2 samples.*take more steps"):
        odeint(explodes, torch.full_like(x, 1.7e308), ts, method="euler")
    for name in ("rtol", "atol"):
        for value in (math.nan, 0.0, -1e-3, math.inf):
            with pytest.raises(ValueError, match=f"{name} must be a finite positive number"):
                odeint(ExactPFODE(gmm), x, ts, method="dopri5", **{name: value})
    with pytest.raises(ValueError, match="unknown control 'logp'"):
        odeint(ExactPFODE(gmm), x, ts, control="logp")
