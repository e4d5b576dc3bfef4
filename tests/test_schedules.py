"""Schedule identities (docs/math.md s.1) against finite differences and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

import diffdensity as dd
from diffdensity.schedules import TAPER
from conftest import F64, SCHEDULE_NAMES, SCHEDULES, gen, make_schedule


def interior_times(schedule: dd.Schedule, n: int = 13) -> torch.Tensor:
    """Times covering [t_min, t_max] (end points included), denser near t_min."""
    u = torch.linspace(0, 1, n, dtype=F64) ** 2
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def fd_step(name: str, t: torch.Tensor) -> torch.Tensor:
    """Per-point step: 1e-4 of the distance to the nearest singular point (at most 1e-4)."""
    a, b = SCHEDULES[name][1]
    dist = torch.minimum(t - a, b - t).clamp(max=1.0)
    return 1e-4 * dist


def fd(fn, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Fourth-order central difference: truncation O(h^4), round-off O(eps / h)."""
    return (-fn(t + 2 * h) + 8 * fn(t + h) - 8 * fn(t - h) + fn(t - 2 * h)) / (12 * h)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().clamp(min=1e-3 * expected.abs().max())
    err = ((actual - expected).abs() / scale).max()
    assert err < rtol, f"max relative error {err:.3e} >= {rtol:.1e}"


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_derivatives_match_finite_differences(name):
    s = make_schedule(name)
    t = interior_times(s)
    h = fd_step(name, t)
    v = s(t)
    # With h = 1e-4 x (distance to the singularity) the 4th-order stencil's truncation
    # error is ~(1e-4)^4 relative. Round-off is ~1.5 eps |alpha| / h: at VPLinear's
    # t_min = 1e-5 (h = 1e-9, d_alpha = -0.05) that is up to ~3e-6 relative, hence 1e-5.
    assert_close_rel(v.d_sigma, fd(lambda u: s(u).sigma, t, h), 1e-5)
    if name in ("VE", "EDM"):  # alpha = 1 exactly
        assert torch.equal(v.alpha, torch.ones_like(t)) and torch.equal(v.d_alpha, torch.zeros_like(t))
    else:
        assert_close_rel(v.d_alpha, fd(lambda u: s(u).alpha, t, h), 1e-5)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_f_and_g2_from_their_definitions(name):
    s = make_schedule(name)
    t = interior_times(s)
    h = fd_step(name, t)
    v = s(t)
    f_fd = fd(lambda u: torch.log(s(u).alpha), t, h)  # f = d log(alpha) / dt
    g2_fd = fd(lambda u: s(u).sigma ** 2, t, h) - 2 * f_fd * v.sigma**2  # d sigma^2/dt - 2 f sigma^2
    g2_lam = -(v.sigma**2) * fd(s.log_snr, t, h)  # g^2 = -sigma^2 d lambda / dt (docs/math.md s.1)
    if name in ("VE", "EDM"):
        assert torch.equal(v.f, torch.zeros_like(t))
    else:
        assert_close_rel(v.f, f_fd, 1e-5)
    assert_close_rel(v.g2, g2_fd, 1e-5)
    assert_close_rel(v.g2, g2_lam, 1e-5)
    assert (v.g2 > 0).all()


def test_known_closed_forms():
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    vpl = dd.VPLinear(beta_min=0.1, beta_max=20.0)
    beta = 0.1 + (20.0 - 0.1) * t
    torch.testing.assert_close(vpl(t).f, -beta / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(vpl(t).g2, beta, rtol=1e-12, atol=0)
    torch.testing.assert_close(vpl(t).alpha ** 2 + vpl(t).sigma ** 2, torch.ones_like(t), rtol=1e-14, atol=0)
    vp = dd.VP(-8.0, 6.0)
    torch.testing.assert_close(vp(t).g2, 14.0 * vp(t).sigma ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(vp(t).alpha ** 2, torch.sigmoid(6.0 - 14.0 * t), rtol=1e-14, atol=0)
    edm_t = torch.tensor([0.002, 0.5, 80.0], dtype=F64)
    torch.testing.assert_close(dd.EDM()(edm_t).g2, 2 * edm_t, rtol=1e-14, atol=0)
    ve = dd.VE(0.01, 50.0)
    sigma = 0.01 * (50.0 / 0.01) ** t
    torch.testing.assert_close(ve(t).sigma, sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(ve(t).g2, 2 * sigma**2 * math.log(5000.0), rtol=1e-12, atol=0)
    rf = dd.RectifiedFlow()
    torch.testing.assert_close(rf(t).alpha, 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(rf(t).f, -1 / (1 - t), rtol=1e-14, atol=0)
    cos = dd.VPCosine()
    torch.testing.assert_close(cos(t).alpha, torch.cos(math.pi * t / 2), rtol=1e-15, atol=0)


def test_python_float_time_is_not_rounded_to_float32():
    for name in SCHEDULE_NAMES:
        s = make_schedule(name)
        t = s.t_min + 0.3 * (s.t_max - s.t_min)
        a = s(t)
        b = s(torch.tensor(t, dtype=F64))
        assert a.alpha.dtype == F64
        assert torch.equal(a.sigma, b.sigma) and torch.equal(a.alpha, b.alpha), name


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_log_snr_consistent_and_decreasing(name):
    s = make_schedule(name)
    t = interior_times(s, 41)
    v = s(t)
    lam = s.log_snr(t)
    torch.testing.assert_close(lam, 2 * torch.log(v.alpha / v.sigma), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lam, v.log_snr, rtol=1e-10, atol=1e-10)
    assert (lam.diff() < 0).all()
    assert math.isclose(s.log_snr_max, float(lam[0]), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(s.log_snr_min, float(lam[-1]), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(s.prior_std, float(v.sigma[-1]), rel_tol=1e-14)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_t_from_log_snr_round_trips(name):
    s = make_schedule(name)
    t = interior_times(s, 41)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-10, atol=1e-12)
    lam = torch.linspace(s.log_snr_min, s.log_snr_max, 41, dtype=F64)
    torch.testing.assert_close(s.log_snr(s.t_from_log_snr(lam)), lam, rtol=1e-10, atol=1e-9)


def test_vp_cosine_range_follows_log_snr_limits():
    s = dd.VPCosine(-7.0, 9.0)
    assert math.isclose(s.log_snr_min, -7.0, abs_tol=1e-12)
    assert math.isclose(s.log_snr_max, 9.0, abs_tol=1e-12)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("spacing", ["uniform", "log_snr", "tapered", "karras"])
def test_time_grid(name, spacing):
    s = make_schedule(name)
    for steps in (1, 7, 32):
        grid = s.time_grid(steps, spacing=spacing)
        assert grid.dtype == F64 and grid.shape == (steps + 1,)
        assert grid[0].item() == s.t_max and grid[-1].item() == s.t_min
        assert (grid.diff() < 0).all()
        up = s.time_grid(steps, spacing=spacing, t_start=s.t_min, t_end=s.t_max)
        assert up[0].item() == s.t_min and up[-1].item() == s.t_max
        assert (up.diff() > 0).all()
        torch.testing.assert_close(up, grid.flip(0), rtol=1e-10, atol=1e-12)
        # the quantity that must be uniformly spaced
        if spacing == "uniform":
            q = grid
        elif spacing == "log_snr":
            q = s.log_snr(grid)
        elif spacing == "tapered":  # logSNR steps shrinking linearly from (1 + TAPER) h to (1 - TAPER) h
            h = s.log_snr(grid).diff()
            mean = (s.log_snr_max - s.log_snr_min) / steps
            if steps > 1:
                torch.testing.assert_close(h.diff(), h.diff().mean().expand(steps - 1), rtol=1e-8, atol=1e-10)
                torch.testing.assert_close(h[[0, -1]] / mean, torch.tensor([1 + TAPER, 1 - TAPER], dtype=F64) * (steps - 1) / steps + 1 / steps, rtol=1e-8, atol=0)
            q = h.cumsum(0)  # the range is covered exactly
            torch.testing.assert_close(q[-1], torch.tensor(s.log_snr_max - s.log_snr_min, dtype=F64), rtol=1e-10, atol=1e-9)
            continue
        else:
            q = torch.exp(-s.log_snr(grid) / (2 * 7.0))  # sigma_ve^(1/rho)
        d = q.diff()
        torch.testing.assert_close(d, d.mean().expand_as(d), rtol=1e-8, atol=1e-12)


def test_karras_grid_matches_edm_formula():
    s = dd.EDM(0.002, 80.0)
    n, rho = 18, 7.0
    i = torch.arange(n + 1, dtype=F64)
    smax, smin = 80.0 ** (1 / rho), 0.002 ** (1 / rho)
    expected = (smax + i / n * (smin - smax)) ** rho  # Karras et al. (2022), eq. 5
    torch.testing.assert_close(s.time_grid(n, spacing="karras", rho=rho), expected, rtol=1e-12, atol=0)


def test_time_grid_sub_interval():
    s = dd.VP()
    grid = s.time_grid(10, spacing="log_snr", t_start=0.8, t_end=0.2)
    assert grid[0].item() == 0.8 and grid[-1].item() == 0.2
    lam = s.log_snr(grid)
    torch.testing.assert_close(lam.diff(), torch.full((10,), (lam[-1] - lam[0]).item() / 10, dtype=F64))


def test_time_grid_errors():
    s = dd.VP()
    with pytest.raises(ValueError, match="steps"):
        s.time_grid(0)
    with pytest.raises(ValueError, match="steps"):
        s.time_grid(2.5)
    with pytest.raises(ValueError, match="spacing"):
        s.time_grid(4, spacing="cosine")
    with pytest.raises(ValueError, match="t_min, t_max"):
        s.time_grid(4, t_start=1.5)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_prior_log_prob_is_normal_density(name):
    s = make_schedule(name)
    x = 3.0 * torch.randn(5, 2, 3, generator=gen(1), dtype=F64)
    expected = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(s.prior_std, dtype=F64)).log_prob(x).reshape(5, -1).sum(1)
    lp = s.prior_log_prob(x)
    assert lp.shape == (5,) and lp.dtype == F64
    torch.testing.assert_close(lp, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_prior_sample(name):
    s = make_schedule(name)
    n, d = 4000, 8
    z = s.prior_sample((n, d), generator=gen(2), dtype=F64)
    assert z.shape == (n, d) and z.dtype == F64
    assert torch.equal(z, s.prior_sample((n, d), generator=gen(2), dtype=F64))
    # mean of z^2 / sigma_T^2 is 1 with standard error sqrt(2 / (n d))
    m2 = (z / s.prior_std).square().mean().item()
    assert abs(m2 - 1) < 4 * math.sqrt(2 / (n * d))
    assert abs(z.mean().item()) < 4 * s.prior_std / math.sqrt(n * d)


def test_check_t():
    s = dd.EDM()
    s.check_t(torch.tensor([0.002, 1.0, 80.0]))
    s.check_t(80.0)
    for bad in (0.001, 80.5, -1.0):
        with pytest.raises(ValueError, match=r"t must lie in \[t_min, t_max\]"):
            s.check_t(bad)
    with pytest.raises(ValueError, match="finite"):
        s.check_t(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="logSNR range"):
        dd.VP().check_log_snr(11.0)
    dd.VP().check_log_snr(0.0)


def test_view_reshapes_all_values():
    v = dd.VP()(torch.linspace(0.1, 0.9, 4, dtype=F64)).view(4, 1, 1)
    assert v.alpha.shape == v.sigma.shape == v.d_alpha.shape == v.d_sigma.shape == (4, 1, 1)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: dd.VP(1.0, -1.0), "log_snr_min < log_snr_max"),
        (lambda: dd.VPCosine(2.0, 2.0), "log_snr_min < log_snr_max"),
        (lambda: dd.VPLinear(beta_min=0.0), "beta_min"),
        (lambda: dd.VPLinear(beta_min=20.0, beta_max=0.1), "beta_min < beta_max"),
        (lambda: dd.VPLinear(t_min=0.0), "t_min"),
        (lambda: dd.VE(sigma_min=0.0), "sigma_min"),
        (lambda: dd.VE(5.0, 1.0), "sigma_min < sigma_max"),
        (lambda: dd.EDM(-0.1, 80.0), "sigma_min"),
        (lambda: dd.RectifiedFlow(t_min=0.0), "t_min"),
        (lambda: dd.RectifiedFlow(t_max=1.0), "t_max"),
        (lambda: dd.RectifiedFlow(0.6, 0.4), "t_min < t_max"),
    ],
)
def test_constructor_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_transition_kernel_closed_form_and_composition(name):
    """``(a, c)`` of q(x_t | x_s): a = alpha_t / alpha_s, c = sigma_t^2 - a^2 sigma_s^2 (docs/math.md s.10),
    zero at t = s, and two steps compose: a_rt = a_rs a_st, c_rt = a_st^2 c_rs + c_st."""
    sched = make_schedule(name)
    lo, hi = sched.t_min, sched.t_max
    r, s, t = (lo + (hi - lo) * u for u in (0.2, 0.45, 0.7))
    a, c = sched.transition(s, t)
    vs, vt = sched(torch.tensor(s, dtype=torch.float64)), sched(torch.tensor(t, dtype=torch.float64))
    assert a == pytest.approx(float(vt.alpha / vs.alpha), rel=1e-12)
    assert c == pytest.approx(float(vt.sigma**2 - a**2 * vs.sigma**2), rel=1e-9)
    assert sched.transition(s, s) == (pytest.approx(1.0), 0.0)
    a_rs, c_rs = sched.transition(r, s)
    a_rt, c_rt = sched.transition(r, t)
    assert a_rt == pytest.approx(a_rs * a, rel=1e-12)
    assert c_rt == pytest.approx(a**2 * c_rs + c, rel=1e-9)
