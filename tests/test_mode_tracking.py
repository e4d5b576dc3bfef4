"""The mode-tracking ODE (docs/math.md s.4e) against brute force, closed forms and the HD sampler."""

import math

import pytest
import torch

import diffdensity as dd
from diffdensity.mode_tracking import ModeTrackingODE, conjugate_gradient, mode_tracking
from diffdensity.sampling import sample
from conftest import gen

F64 = torch.float64


def mixture(dim, k=3, seed=0, std_range=(0.1, 1.0), mean_scale=2.0):
    g = gen(seed)
    lo, hi = math.log(std_range[0]), math.log(std_range[1])
    return dd.GaussianMixture(
        mean_scale * torch.randn(k, dim, generator=g, dtype=F64),
        torch.exp(torch.empty(k, dim, dtype=F64).uniform_(lo, hi, generator=g)),
        torch.empty(k, dtype=F64).uniform_(0.5, 1.5, generator=g),
        schedule=dd.VP(),
        rotation=dd.random_rotation(dim, generator=g),
    )


def kernel(sched, t, s):
    """``(a, c)`` of ``x_t | x_s ~ N(a x_s, c I)``."""
    sv_t, sv_s = sched(torch.tensor(t, dtype=F64)), sched(torch.tensor(s, dtype=F64))
    a = float(sv_t.alpha / sv_s.alpha)
    return a, float(sv_t.sigma**2 - a**2 * sv_s.sigma**2)


# -- conjugate gradients ----------------------------------------------------------------


def test_conjugate_gradient_solves_a_batch_of_spd_systems():
    g = gen(0)
    a = torch.randn(5, 6, 6, generator=g, dtype=F64)
    m = a @ a.transpose(1, 2) + 0.1 * torch.eye(6, dtype=F64)
    b = torch.randn(5, 6, generator=g, dtype=F64)
    b[3] = 0  # a zero right-hand side is solved at once
    w, info = conjugate_gradient(lambda p: (m @ p[..., None])[..., 0], b, rtol=1e-12, max_iter=50)
    assert torch.allclose(w, torch.linalg.solve(m, b), atol=1e-9)
    assert info["iterations"] <= 12 and not info["indefinite"].any() and (info["residual"] < 1e-12).all()


def test_conjugate_gradient_flags_indefinite_matrices():
    m = torch.stack([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)])
    w, info = conjugate_gradient(lambda p: (m @ p[..., None])[..., 0], torch.ones(2, 3, dtype=F64))
    assert info["indefinite"].tolist() == [False, True]
    assert torch.allclose(w[0], torch.ones(3, dtype=F64))


# -- docs/math.md s.4e against brute force ----------------------------------------------------------


def test_bare_ode_follows_the_brute_force_argmax_1d():
    """1-D mixture: y_s from the ODE alone (no Newton correction) equals the argmax of
    log p_s(y) - (x_t - a y)^2 / (2c), found on a dense grid and polished by Newton, to 1e-4."""
    sched = dd.VP()
    gmm = dd.GaussianMixture(
        torch.tensor([[-2.0], [0.5], [2.5]], dtype=F64),
        torch.tensor([0.3, 0.6, 0.2], dtype=F64),
        torch.tensor([0.3, 0.4, 0.3], dtype=F64),
        schedule=sched,
    )
    t = 0.5  # logSNR 0
    x_t = torch.tensor([[-2.5], [-1.0], [0.0], [0.7], [1.5], [2.5]], dtype=F64)
    r = mode_tracking(gmm, x_t, t, steps=40, solver="rk4", newton_steps=0, record_path=True)
    assert r.path.shape == (41, 6, 1) and torch.equal(r.path[0], x_t)
    ys = torch.linspace(-4, 4, 8001, dtype=F64)[:, None]
    for i in range(5, 41, 5):
        s = float(r.ts[i])
        a, c = kernel(sched, t, s)
        for b in range(6):
            xt = float(x_t[b, 0])
            phi = gmm.log_prob(ys, s) - (xt - a * ys[:, 0]) ** 2 / (2 * c)
            y = ys[phi.argmax()].clone()
            for _ in range(6):  # Newton on d/dy [log p_s(y) - (x_t - a y)^2 / 2c]
                d1 = gmm.score(y[None], s)[0, 0] + (a / c) * (xt - a * y[0])
                d2 = gmm.laplacian(y[None], s)[0] - a * a / c
                y = y - d1 / d2
            assert abs(float(y) - float(r.path[i, b, 0])) < 1e-4, (s, xt, float(y), float(r.path[i, b, 0]))
    assert float(r.gradient.max()) < 1e-3


def test_gaussian_data_gives_the_hd_ode_and_the_posterior_mean():
    """One rotated Gaussian: grad(div s) = 0, so the mode-tracking ODE is the HD-ODE; its end
    point is the mean of the Gaussian p(x_0 | x_T) in closed form (RK4 with 24 steps:
    error 5e-5, shrinking like h^4; one Newton step per step makes it exact)."""
    dim = 6
    g = gen(1)
    stds = torch.exp(torch.empty(1, dim, dtype=F64).uniform_(-2, 0, generator=g))
    rot = dd.random_rotation(dim, generator=g)
    gmm = dd.GaussianMixture(torch.randn(1, dim, generator=g, dtype=F64), stds, schedule=dd.VP(), rotation=rot)
    sched = gmm.schedule
    x_T = sched.prior_sample((4, dim), generator=g, dtype=F64)
    m = mode_tracking(gmm, x_T, steps=24, solver="rk4", newton_steps=0)
    hd = sample(gmm, x_T=x_T, method="hd", log_snr_threshold=sched.log_snr_min, steps=24, solver="rk4", track_logp=False)
    assert torch.allclose(m.y, hd.x, atol=1e-9)
    # closed form: x_s ~ N(alpha_s mu, C_s), x_T | x_s ~ N(a x_s, c I)
    a, c = kernel(sched, sched.t_max, sched.t_min)
    sv = sched(torch.tensor(sched.t_min, dtype=F64))
    cov = rot @ torch.diag(sv.alpha**2 * stds[0] ** 2 + sv.sigma**2) @ rot.T
    mu = sv.alpha * gmm.means[0]
    gain = a * cov @ torch.linalg.inv(a * a * cov + c * torch.eye(dim, dtype=F64))
    mode = mu + (x_T - a * mu) @ gain.T
    assert torch.allclose(m.y, mode, atol=2e-4)
    assert torch.allclose(mode_tracking(gmm, x_T, steps=4).y, mode, atol=1e-10)


# -- a local mode, and the HD sampler moving towards it --------------------------------------


@pytest.fixture(scope="module")
def gmm16():
    return mixture(16)


def test_ends_at_a_local_mode_of_the_data(gmm16):
    sched = gmm16.schedule
    x_T = sched.prior_sample((8, 16), generator=gen(5), dtype=F64)
    m = mode_tracking(gmm16, x_T, steps=24)
    assert m.settings["indefinite"] == 0
    assert float(m.gradient.max()) < 1e-8  # stationary for p(x_0 | x_T)
    # anchored at t_max the likelihood term is tiny: the score of p_0 nearly vanishes ...
    pf = sample(gmm16, x_T=x_T, steps=24, track_logp=False)
    typical = gmm16.score(pf.x, sched.t_min).norm(dim=1).median()
    assert (m.score_norm < 0.01 * typical).all()
    # ... at a maximum: the Hessian of log p_0 is negative definite there
    hess = torch.func.vmap(torch.func.jacrev(lambda y: gmm16.score(y[None], sched.t_min)[0]))(m.y)
    assert torch.linalg.eigvalsh(0.5 * (hess + hess.transpose(1, 2))).max() < 0
    # the pure HD-ODE from t_max lands next to it, slightly lower
    hd = sample(gmm16, x_T=x_T, method="hd", log_snr_threshold=sched.log_snr_min, steps=24, track_logp=False)
    lp_mode, lp_hd = gmm16.log_prob(m.y, 0.0), gmm16.log_prob(hd.x, 0.0)
    assert (lp_hd <= lp_mode + 1e-9).all() and (lp_mode - lp_hd).mean() < 0.05
    assert (hd.x - m.y).norm(dim=1).mean() < 0.05 * (pf.x - m.y).norm(dim=1).mean()


@pytest.mark.parametrize("threshold", [6.0, 2.0, -2.0])
def test_hd_sampler_moves_towards_the_mode_of_the_denoising_distribution(gmm16, threshold):
    """PF-ODE down to the threshold, then either the HD-ODE or mode tracking anchored at the
    same x_t: the HD sample sits much closer to that mode than the PF-ODE sample, and so
    does its log p_0."""
    sched = gmm16.schedule
    x_T = sched.prior_sample((12, 16), generator=gen(5), dtype=F64)
    t_thr = float(sched.t_from_log_snr(torch.tensor(threshold, dtype=F64)))
    at_threshold = {}

    def grab(info):
        if info.t == t_thr:
            at_threshold["x"] = info.x.clone()

    hd = sample(gmm16, x_T=x_T, method="hd", log_snr_threshold=threshold, steps=32, track_logp=False, callback=grab)
    pf = sample(gmm16, x_T=x_T, steps=32, track_logp=False)
    m = mode_tracking(gmm16, at_threshold["x"], t_thr, steps=16)
    d_hd, d_pf = (hd.x - m.y).norm(dim=1), (pf.x - m.y).norm(dim=1)
    assert d_hd.mean() < 0.2 * d_pf.mean()
    lp_mode, lp_hd, lp_pf = (gmm16.log_prob(x, 0.0).mean() for x in (m.y, hd.x, pf.x))
    assert abs(lp_hd - lp_mode) < 0.1 * abs(lp_pf - lp_mode)


# -- models without a closed-form Laplacian -------------------------------------------------


def test_autograd_laplacian_matches_the_closed_form():
    gmm = mixture(4, seed=2)
    plain = dd.ScoreModel(lambda x, t: gmm.score(x, t), gmm.schedule, event_shape=(4,))
    x_T = gmm.schedule.prior_sample((3, 4), generator=gen(0), dtype=F64)
    exact = mode_tracking(gmm, x_T, steps=8)
    auto = mode_tracking(plain, x_T, steps=8)
    assert exact.settings["laplacian"] == "model" and auto.settings["laplacian"] == "exact"
    assert torch.allclose(exact.y, auto.y, atol=1e-9)
    assert auto.nfe.vjp > exact.nfe.vjp  # D double-backward passes per evaluation


def test_small_network_through_autograd():
    """An energy network E(x, t) with s = -grad E: Hessian-vector products and grad(div s)
    need second and third derivatives, all by autograd."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    sched = dd.VP()

    def score(x, t):
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            inp = torch.cat([x, t[:, None].to(x.dtype)], dim=1)
            energy = net(inp).sum() + 0.5 * (x**2).sum()
            (grad,) = torch.autograd.grad(energy, x, create_graph=True)
        return -grad

    model = dd.ScoreModel(score, sched, event_shape=(2,))
    x_t = torch.randn(4, 2, generator=gen(1), dtype=F64)
    r = mode_tracking(model, x_t, 0.5, steps=8)
    assert torch.isfinite(r.y).all() and float(r.gradient.max()) < 1e-6


# -- bad input ---------------------------------------------------------------------------


def test_bad_input(gmm16):
    x = torch.zeros(2, 16, dtype=F64)
    with pytest.raises(ValueError, match="need t_end < t"):
        mode_tracking(gmm16, x, 0.3, t_end=0.5)
    with pytest.raises(ValueError, match=r"must lie in \[t_min, t_max\]"):
        mode_tracking(gmm16, x, 1.5)
    with pytest.raises(ValueError, match="unknown laplacian"):
        mode_tracking(gmm16, x, laplacian="finite-difference")
    with pytest.raises(ValueError, match="needs model.laplacian"):
        ModeTrackingODE(dd.ScoreModel(lambda x, t: -x, dd.VP()), laplacian="model")
    with pytest.raises(ValueError, match="newton_steps must be a non-negative integer"):
        mode_tracking(gmm16, x, newton_steps=-1)
    with pytest.raises(ValueError, match="cg_rtol must be a positive number"):
        mode_tracking(gmm16, x, cg_rtol=0.0)
    with pytest.raises(ValueError, match="x_t contains NaN or Inf"):
        mode_tracking(gmm16, torch.full((2, 16), float("nan"), dtype=F64))
    with pytest.raises(RuntimeError, match="call anchor"):
        ModeTrackingODE(gmm16)(torch.tensor(0.5, dtype=F64), x)
