"""sample(): API, registry, determinism, NFE accounting, the HD sampler and bad input."""


import warnings

import pytest
import torch

import diffdensity as dd
from diffdensity.dynamics import HDODE, ModifiedODE, _expand
from diffdensity.methods import Option, Phase, Plan, register_method
from diffdensity.methods import HD_DEFAULT_THRESHOLD
from diffdensity.models import placement
from diffdensity.sampling import METHODS, SampleResult, _draw_latent, _split_grid, sample
from conftest import gen, make_mixture

F64 = torch.float64


def mixture(dim, k=3, seed=0, std_range=(0.1, 1.0), schedule=None):
    return make_mixture(schedule or dd.VP(), dim, k, seed=seed, std_range=std_range)


@pytest.fixture(scope="module")
def gmm():
    return mixture(2)


def scaled_drift(gmm, k):
    """``u = f x - k g^2 s / 2``: the PF-ODE for k = 1, the HD-ODE for k = 2."""
    sched = gmm.schedule

    def drift(x, t, s):
        sv = sched(t)
        return sv.f[:, None] * x - 0.5 * k * sv.g2[:, None] * s

    return drift


# -- results, shapes, paths ------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [("pf-ode", {}), ("sde", {}), ("hd", dict(log_snr_threshold=2.0)), ("hd", dict(log_snr_threshold=2.0, start="sde"))],
)
def test_result_shapes_and_path(gmm, method, options):
    seen = []
    r = sample(gmm, 5, method=method, steps=12, generator=gen(0), dtype=F64, callback=seen.append, **options)
    assert isinstance(r, SampleResult)
    assert r.x.shape == (5, 2) and r.x.dtype == F64
    assert r.logp.shape == (5,) and r.logp.dtype == F64
    assert r.x_T.shape == (5, 2) and r.prior_logp.shape == (5,)
    assert r.steps == 12 and r.ts.shape == (13,) and r.logp_path.shape == (13, 5)
    assert torch.equal(r.logp_path[0], r.prior_logp) and torch.equal(r.logp_path[-1], r.logp)
    assert torch.allclose(r.prior_logp, gmm.schedule.prior_log_prob(r.x_T))
    assert r.ts[0] == gmm.schedule.t_max and r.ts[-1] == gmm.schedule.t_min and (r.ts.diff() < 0).all()
    # the callback sees the initial state and every step once, with global step numbers
    assert [i.step for i in seen] == list(range(13))
    assert [i.t for i in seen] == r.ts.tolist()
    assert torch.equal(seen[-1].x, r.x)


def test_hd_phases_split_the_grid_at_the_threshold(gmm):
    thr = 2.0
    r = sample(gmm, 3, method="hd", log_snr_threshold=thr, steps=20, generator=gen(0), dtype=F64)
    first, second = r.settings["phases"]
    t_thr = float(gmm.schedule.t_from_log_snr(torch.tensor(thr, dtype=F64)))
    assert (first["name"], second["name"]) == ("pf-ode", "hd-ode")
    assert first["t_end"] == pytest.approx(t_thr, abs=1e-15) and second["t_start"] == first["t_end"]
    assert first["steps"] + second["steps"] == 20
    assert t_thr in r.ts.tolist()


def test_split_grid_keeps_step_count_and_inserts_when_needed():
    grid = torch.linspace(1, 0, 11, dtype=F64)
    a, b = _split_grid(grid, [0.42, 0.0])
    assert len(a) + len(b) - 2 == 10 and a[-1] == 0.42 == b[0]
    assert (a.diff() < 0).all() and (b.diff() < 0).all()
    # a boundary on a grid point, and at the ends (empty phases)
    a, b = _split_grid(grid, [0.5, 0.0])
    assert a[-1] == 0.5 and len(a) == 6
    a, b = _split_grid(grid, [1.0, 0.0])
    assert len(a) == 1 and len(b) == 11
    # one step: the boundary is inserted
    a, b = _split_grid(torch.tensor([1.0, 0.0], dtype=F64), [0.3, 0.0])
    assert a.tolist() == [1.0, 0.3] and b.tolist() == [0.3, 0.0]


def test_threshold_at_the_end_of_the_range_gives_pure_hd_ode(gmm):
    sched = gmm.schedule
    x_T = sched.prior_sample((4, 2), generator=gen(1), dtype=F64)
    r = sample(gmm, x_T=x_T, method="hd", log_snr_threshold=sched.log_snr_min, steps=10, track_logp=False)
    assert [p["name"] for p in r.settings["phases"]] == ["hd-ode"]
    custom = sample(gmm, x_T=x_T, method="custom", drift=scaled_drift(gmm, 2), steps=10, track_logp=False)
    assert torch.allclose(r.x, custom.x, atol=1e-12)


# -- randomness, NFE, tracking never changes the samples -----------------------------------


@pytest.mark.parametrize(
    "method, options",
    [
        ("pf-ode", {}),
        ("sde", {}),
        ("sde", dict(solver="euler-maruyama")),
        ("hd", dict(log_snr_threshold=3.0, start="sde")),
        ("custom", dict(drift=None, diffusion=0.3)),
    ],
)
def test_same_seed_same_result_and_tracking_keeps_samples(gmm, method, options):
    if "drift" in options:
        options = dict(options, drift=scaled_drift(gmm, 1.5))
    a = sample(gmm, 6, method=method, steps=16, generator=gen(3), dtype=F64, **options)
    b = sample(gmm, 6, method=method, steps=16, generator=gen(3), dtype=F64, **options)
    assert torch.equal(a.x, b.x) and torch.equal(a.logp, b.logp)
    c = sample(gmm, 6, method=method, steps=16, generator=gen(4), dtype=F64, **options)
    assert not torch.equal(a.x_T, c.x_T)
    plain = sample(gmm, 6, method=method, steps=16, generator=gen(3), dtype=F64, track_logp=False, **options)
    assert plain.logp is None and plain.logp_path is None and plain.prior_logp is None
    # forward-mode JVPs return the same primal; stochastic methods see the same noise
    assert torch.allclose(plain.x, a.x, rtol=0, atol=1e-12)


def test_sde_tracking_costs_no_extra_network_pass(gmm):
    for solver in ("tweedie", "ancestral", "euler-maruyama"):
        tracked = sample(gmm, 4, method="sde", steps=25, solver=solver, generator=gen(0))
        plain = sample(gmm, 4, method="sde", steps=25, solver=solver, generator=gen(0), track_logp=False)
        assert (tracked.nfe.forward, tracked.nfe.jvp, tracked.nfe.vjp) == (25, 0, 0)
        assert (plain.nfe.forward, plain.nfe.jvp, plain.nfe.vjp) == (25, 0, 0)


def test_pf_ode_nfe_accounting(gmm):
    plain = sample(gmm, 4, steps=10, generator=gen(0), track_logp=False)
    assert (plain.nfe.forward, plain.nfe.jvp) == (20, 0)  # Heun: two passes per step
    tracked = sample(gmm, 4, steps=10, generator=gen(0), probes=3)
    assert (tracked.nfe.forward, tracked.nfe.jvp) == (0, 60)  # each pass a JVP per probe


def test_model_dtype_by_default_and_float32_sampling(gmm):
    assert sample(gmm, 3, method="sde", steps=8, generator=gen(0)).x.dtype == F64  # the mixture's dtype
    r = sample(gmm, 3, method="sde", steps=8, generator=gen(0), dtype=torch.float32)
    assert r.x.dtype == torch.float32 and r.logp.dtype == F64


def test_model_kwargs_reach_the_model():
    sched = dd.VP()

    def fn(x, t, shift):  # exact score of data N(shift, 0.1^2 I)
        sv = sched(t)
        var = (0.01 * sv.alpha**2 + sv.sigma**2).to(x.dtype)[:, None]
        return -(x - sv.alpha.to(x.dtype)[:, None] * shift) / var

    model = dd.ScoreModel(fn, sched, event_shape=(2,))
    shift = torch.tensor([[3.0, -3.0]])
    r = sample(model, 4, steps=16, generator=gen(0), model_kwargs=dict(shift=shift), track_logp=False)
    assert torch.allclose(r.x, shift.expand(4, 2), atol=0.5)


def test_custom_prior_logp(gmm):
    sched = gmm.schedule
    r = sample(gmm, 3, steps=8, generator=gen(0), dtype=F64, prior_logp=lambda x: gmm.log_prob(x, sched.t_max))
    assert torch.allclose(r.prior_logp, gmm.log_prob(r.x_T, sched.t_max))


# -- the registry ------------------------------------------------------------------------


class ScaledScoreODE(ModifiedODE):
    """``u = f x - k g^2 s / 2`` (tracked by docs/math.md s.3b)."""

    def __init__(self, model, k, **kwargs):
        super().__init__(model, **kwargs)
        self.k = k

    def drift(self, t, x, s):
        sv = self.schedule(t)
        delta = -0.5 * (self.k - 1) * _expand(sv.g2, x) * s
        return _expand(sv.f, x) * x - 0.5 * _expand(sv.g2, x) * s + delta, delta


def test_registering_a_method_extends_sample_without_touching_it(gmm):
    def build(ctx):
        return Plan([Phase(ScaledScoreODE(ctx.model, ctx.options["k"], **ctx.dynamics_kwargs()), ctx.schedule.t_min, "scaled")])

    def check_k(value, name):
        if not value >= 1:
            raise ValueError(f"{name} must be >= 1")
        return float(value)

    register_method("scaled-score", build, options={"k": Option(2.0, check_k, "score multiplier")}, default_steps=12)
    try:
        x_T = gmm.schedule.prior_sample((4, 2), generator=gen(2), dtype=F64)
        r = sample(gmm, x_T=x_T, method="scaled-score", generator=gen(0))
        hd = sample(gmm, x_T=x_T, method="hd", log_snr_threshold=gmm.schedule.log_snr_min, steps=12, generator=gen(0))
        assert r.steps == 12 and torch.allclose(r.x, hd.x, atol=1e-12)
        assert torch.allclose(r.logp, hd.logp, atol=1e-9)
        with pytest.raises(ValueError, match="k must be >= 1"):
            sample(gmm, 2, method="scaled-score", k=0.5)
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['q'\] for method 'scaled-score'; its options: k"):
            sample(gmm, 2, method="scaled-score", q=0.3)
        with pytest.raises(ValueError, match="already registered"):
            register_method("scaled-score", build)
    finally:
        METHODS.pop("scaled-score", None)


def test_registry_rejects_option_names_of_sample():
    with pytest.raises(ValueError, match="clash"):
        register_method("bad-method", lambda ctx: None, options={"steps": Option(1)})
    assert "bad-method" not in METHODS


# -- the high-density sampler ----------------------------------------------------------------


def test_hd_threshold_raises_log_density_and_smooths_samples():
    """D = 512: lower thresholds -> strictly higher exact mean log p_0 and lower variance across pixels."""
    gmm = mixture(512, seed=7)
    x_T = gmm.schedule.prior_sample((24, 512), generator=gen(3), dtype=F64)
    logp, pixel_var = [], []
    for thr in (8.0, 6.0, 4.0, 2.0):
        r = sample(gmm, x_T=x_T, method="hd", log_snr_threshold=thr, steps=24, track_logp=False)
        logp.append(float(gmm.log_prob(r.x, 0.0).mean()))
        pixel_var.append(float(r.x.var(dim=1).mean()))
    pf = sample(gmm, x_T=x_T, steps=24, track_logp=False)
    logp.insert(0, float(gmm.log_prob(pf.x, 0.0).mean()))
    pixel_var.insert(0, float(pf.x.var(dim=1).mean()))
    assert all(b > a for a, b in zip(logp, logp[1:])), logp
    assert all(b < a for a, b in zip(pixel_var, pixel_var[1:])), pixel_var


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="ddim"), ValueError, "unknown method 'ddim'"),
        (dict(method="pf-ode", q=0.7), ValueError, r"unknown option\(s\) \['q'\] for method 'pf-ode'; its options: none"),
        (dict(method="sde", log_snr_threshold=2.0), ValueError, "unknown option"),
        (dict(method="hd", log_snr_threshold=12.0), ValueError, r"log_snr_threshold=12 is outside the logSNR range \[-10, 10\]"),
        (dict(method="hd", log_snr_threshold=-10.5), ValueError, "outside the logSNR range"),
        (dict(method="hd", log_snr_threshold=float("nan")), ValueError, "finite number"),
        (dict(method="hd", log_snr_threshold="2"), ValueError, "finite number"),
        (dict(method="hd", log_snr_threshold=2.0, start="ode"), ValueError, "unknown start 'ode'"),
        (dict(method="custom"), ValueError, "needs option 'drift'"),
        (dict(method="custom", drift=3.0), TypeError, "drift must be callable"),
        (dict(method="custom", drift=lambda x, t, s: x, diffusion=-1.0), ValueError, "diffusion must be >= 0"),
        (dict(method="custom", drift=lambda x, t, s: x[:, :1]), ValueError, "drift.* must return a tensor of the shape of x"),
        (dict(method="custom", drift=lambda x, t, s: x, diffusion=0.5, solver="tweedie"), ValueError, r"solver 'tweedie' needs a Gaussian reverse kernel .* supports \('euler-maruyama',\)"),
        (dict(method="custom", drift=lambda x, t, s: x, diffusion=lambda x, t: -torch.ones(len(x))), ValueError, "finite and >= 0"),
        (dict(solver="rk45"), ValueError, "unknown solver 'rk45'"),
        (dict(solver="tweedie"), ValueError, "solver 'tweedie' integrates stochastic phases, but method 'pf-ode' has none"),
        (dict(method="sde", solver="heun"), ValueError, "integrates deterministic phases"),
        (dict(solver={"ode": "heun"}), ValueError, "unknown solver"),
        (dict(steps=0), ValueError, "steps must be a positive integer"),
        (dict(grid="cosine"), ValueError, "unknown grid"),
        (dict(probes=0), ValueError, "probes must be a positive integer"),
        (dict(divergence="sketch"), ValueError, "unknown divergence"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(track_logp=1), TypeError, "track_logp must be a bool"),
        (dict(prior_logp=lambda x: x.sum()), ValueError, r"prior_logp must return a \(3,\) tensor"),
        (dict(model_kwargs=[1]), TypeError, "model_kwargs must be a dict"),
    ],
)
def test_bad_input_raises_clear_errors(gmm, kwargs, error, match):
    kwargs = dict(kwargs)
    kwargs.setdefault("steps", 4)
    kwargs.setdefault("generator", gen(0))
    with pytest.raises(error, match=match):
        sample(gmm, 3, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_latents_raise(gmm, bad):
    x_T = torch.zeros(4, 2)
    x_T[2, 1] = bad
    with pytest.raises(ValueError, match=r"x_T contains NaN or Inf in 1 of 4 samples \(first: index 2\)"):
        sample(gmm, x_T=x_T, method="sde")


def test_latent_and_count_errors(gmm):
    with pytest.raises(ValueError, match="give the number of samples n or the latents x_T"):
        sample(gmm)
    with pytest.raises(ValueError, match="n=3 disagrees with the batch of x_T"):
        sample(gmm, 3, x_T=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="event shape"):
        sample(gmm, x_T=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample(gmm, 0)
    bare = dd.ScoreModel(lambda x, t: -x, dd.VP())
    with pytest.raises(ValueError, match="no event_shape: pass x_T"):
        sample(bare, 3)
    with pytest.raises(TypeError, match="model must provide"):
        sample(object(), 3)


@pytest.mark.parametrize("method", ["sde", "pf-ode"])
def test_a_network_returning_nan_is_named_as_the_cause(method):
    sched = dd.VP()

    def fn(x, t):  # NaN below t = 0.5, for the second sample only
        nan = (t[:, None] < 0.5) & (torch.arange(len(x))[:, None] == 1)
        return torch.where(nan, torch.full_like(x, float("nan")), -x)

    model = dd.ScoreModel(fn, sched, event_shape=(2,))
    with pytest.raises(FloatingPointError, match=r"NaN or Inf at t=0\.\d+ for .*\b1\b.*of 3.*more steps will not help"):
        sample(model, 3, method=method, steps=8, generator=gen(0))


def test_a_step_too_large_is_named_as_the_cause():
    sched = dd.VP()
    model = dd.ScoreModel(lambda x, t: -1e30 * x, sched, event_shape=(2,))  # finite (float32), but explodes any step
    with pytest.raises(FloatingPointError, match=r"integration diverged .*\|x\| reached .* step is too large .* use more steps"):
        sample(model, 3, method="sde", steps=4, track_logp=False, generator=gen(0))


@pytest.mark.parametrize("out, error, match", [
    (lambda x: (x,), TypeError, r"returned tuple, expected a tensor of shape \(3, 2\) \(unwrap it"),
    (lambda x: x[:, :1], ValueError, r"returned shape \(3, 1\), expected \(3, 2\)"),
    (lambda x: x.long(), TypeError, "returned a torch.int64 tensor"),
])  # fmt: skip
def test_network_output_is_checked(out, error, match):
    model = dd.ScoreModel(lambda x, t: out(x), dd.VP(), event_shape=(2,))
    with pytest.raises(error, match=match):
        sample(model, 3, steps=2, generator=gen(0))


def test_hd_ode_is_the_reverse_sde_drift(gmm):
    x = torch.randn(3, 2, generator=gen(0), dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    u, rate = HDODE(gmm)(t, x)
    sv = gmm.schedule(t)
    assert rate is None
    assert torch.allclose(u, sv.f * x - sv.g2 * gmm.score(x, t))


def test_a_method_whose_dynamics_forget_the_estimator_fails_loudly(gmm):
    def build(ctx):  # forgets ctx.dynamics_kwargs(): no divergence, no rate
        return Plan([Phase(dd.dynamics.PFODE(ctx.model, nfe=ctx.nfe), ctx.schedule.t_min, "broken")])

    register_method("broken-tracking", build)
    try:
        with pytest.raises(RuntimeError, match="returned no log-density rate although track_logp=True"):
            sample(gmm, 2, method="broken-tracking", steps=4)
        assert sample(gmm, 2, method="broken-tracking", steps=4, track_logp=False).logp is None
    finally:
        METHODS.pop("broken-tracking", None)


def test_hd_has_a_default_threshold(gmm):
    x_T = gmm.schedule.prior_sample((3, *gmm.event_shape), generator=gen(3), dtype=F64)
    default = sample(gmm, x_T=x_T, method="hd", steps=8, track_logp=False)
    explicit = sample(gmm, x_T=x_T, method="hd", log_snr_threshold=HD_DEFAULT_THRESHOLD, steps=8, track_logp=False)
    assert torch.equal(default.x, explicit.x) and default.settings["options"]["log_snr_threshold"] == HD_DEFAULT_THRESHOLD


class _Net(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x, t):
        return self.lin(x)


def test_latents_take_the_device_and_dtype_the_model_declares(gmm):
    sched = gmm.schedule
    # an exact mixture computes in float64
    assert sample(gmm, 2, steps=2, track_logp=False).x.dtype == torch.float64
    # a network model: its parameters say where it lives
    net64 = _Net(4).to(torch.float64)
    m = dd.ScoreModel(net64, sched, "eps", event_shape=(4,))
    assert m.network is net64 and m.dtype == torch.float64 and m.device == torch.device("cpu")
    assert sample(m, 2, steps=2, track_logp=False).x.dtype == torch.float64
    # a wrapped callable declares its network (as the diffusers adapter does)
    m32 = dd.ScoreModel(lambda x, t: net64(x.double(), t).to(x.dtype), sched, "eps", event_shape=(4,), network=_Net(4))
    assert m32.dtype == torch.float32
    # explicit declarations win, and latents are made there (meta: no memory, any machine)
    meta = dd.ScoreModel(lambda x, t: x, sched, "eps", event_shape=(4,), device="meta", dtype=torch.float16)
    z = _draw_latent(meta, 3, None, None, None)
    assert z.device.type == "meta" and z.dtype == torch.float16 and z.shape == (3, 4)
    # classifier-free guidance declares what the guided model declares
    cfg = dd.ClassifierFreeGuidance(m, 2.0, cond={}, uncond={})
    assert placement(cfg) == (torch.device("cpu"), torch.float64)
    # nothing declared: the CPU and the default dtype
    assert placement(object()) == (torch.device("cpu"), torch.get_default_dtype())
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        dd.ScoreModel(lambda x, t: x, sched, dtype=torch.int64)


def test_default_ode_solver_follows_the_kind_of_model(gmm):
    assert sample(gmm, 2, steps=2, track_logp=False).settings["solvers"] == ["heun"]
    net = dd.ScoreModel(_Net(4).double(), gmm.schedule, "eps", event_shape=(4,))
    assert sample(net, 2, steps=2, track_logp=False).settings["solvers"] == ["exp-heun"]


def test_default_grid_follows_the_kind_of_model_and_of_dynamics(gmm):
    """Tapered logSNR steps for ODE methods on a learned network, uniform logSNR steps for
    exact scores and for plans with a stochastic phase; a given grid is kept."""
    net = dd.ScoreModel(_Net(4).double(), gmm.schedule, "eps", event_shape=(4,))
    grid = lambda model, **kw: sample(model, 2, steps=4, track_logp=False, **kw).settings["grid"]  # noqa: E731
    assert grid(gmm) == "log_snr" and grid(gmm, method="sde") == "log_snr"
    assert grid(net) == "tapered" and grid(net, method="density-guidance", q=0.7) == "tapered"
    assert grid(net, method="sde") == "log_snr" and grid(net, method="sde", noise_until=3.0) == "log_snr"
    assert grid(net, grid="karras") == "karras" and grid(gmm, grid="tapered") == "tapered"
    ts = sample(net, 2, steps=4, track_logp=False).ts
    lam = net.schedule.log_snr(ts)
    torch.testing.assert_close(ts, net.schedule.time_grid(4, spacing="tapered"))
    assert float(lam.diff()[0]) > float(lam.diff()[-1]) > 0  # shrinking towards the data end


@pytest.mark.parametrize("probes", [1, 2])
@pytest.mark.parametrize("method, options", [("pf-ode", {}), ("density-guidance", dict(q=0.7))])
def test_tracked_standard_error_matches_the_spread_over_probe_seeds(method, options, probes):
    g = mixture(64, std_range=(0.1, 1.0))
    x_T = g.schedule.prior_sample((4, 64), generator=gen(1), dtype=F64)
    runs = [sample(g, x_T=x_T, method=method, steps=16, probes=probes, generator=gen(100 + k), **options) for k in range(24)]
    logp = torch.stack([r.logp for r in runs])
    se = torch.stack([r.logp_stderr for r in runs]).mean(0)
    ratio = logp.std(0) / se
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio
    # one probe shared by the stages of a step: no second probe to estimate the variance from
    shared = dd.Hutchinson(1, resample="step")
    assert sample(g, x_T=x_T, method=method, steps=16, divergence=shared, generator=gen(0), **options).logp_stderr is None


def test_fresh_probes_at_every_stage_halve_the_tracked_variance():
    """Two-stage steps whose stages draw their own probes (the default) against stages sharing
    them: the spread of the tracked log p over probe seeds, on the same trajectory."""
    g = mixture(64, std_range=(0.1, 1.0))
    x_T = g.schedule.prior_sample((4, 64), generator=gen(1), dtype=F64)

    def spread(resample: str) -> torch.Tensor:
        runs = [sample(g, x_T=x_T, steps=32, divergence=dd.Hutchinson(1, resample=resample), generator=gen(200 + k)) for k in range(48)]
        return torch.stack([r.logp for r in runs]).var(0)

    # each variance from 48 draws is within ~25 % of its value: the ratio of the pooled ones
    ratio = float(spread("call").sum() / spread("step").sum())
    assert ratio < 0.75, ratio


@pytest.mark.parametrize("solver, fine_steps", [(None, 32), ("exp-2m", 63)])
def test_too_few_steps_for_the_tracked_log_density_warn(solver, fine_steps):
    """HD-ODE from logSNR -10 on a D = 64 mixture: 4 steps are ~10^5 nats off, 32 within 1 nat
    (one-evaluation exp-2m steps: the spread between consecutive evaluations, 63 steps)."""
    g = mixture(64, k=4, std_range=(0.05, 1.0))
    x_T = g.schedule.prior_sample((4, 64), generator=gen(2), dtype=F64)
    with pytest.warns(RuntimeWarning, match="4 steps do not resolve the tracked log-density"):
        coarse = sample(g, x_T=x_T, method="hd", log_snr_threshold=-10.0, steps=4, solver=solver, divergence="exact")
    assert (coarse.logp - g.log_prob(coarse.x, g.schedule.t_min)).abs().max() > 100
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fine = sample(g, x_T=x_T, method="hd", log_snr_threshold=-10.0, steps=fine_steps, solver=solver, divergence="exact")
    assert (fine.logp - g.log_prob(fine.x, g.schedule.t_min)).abs().max() < 2


def test_results_say_whether_tracking_is_exact_for_the_models_flow():
    """PF-ODE, prior guidance and density guidance at q = 0.5 track the density of the model's
    own flow whatever the network (docs/math.md s.3a); every other method relies on the score
    being that density's gradient, and says so."""
    from diffdensity.zoo import gmm_preset

    gmm = gmm_preset("mix64")
    x_T = gmm.schedule.prior_sample((2, *gmm.event_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cases = {("pf-ode", None): True, ("prior-guidance", 0.3): True, ("density-guidance", 0.5): True,
             ("density-guidance", 0.8): False, ("hd", None): False, ("sde", None): False}  # fmt: skip
    for (method, q), exact in cases.items():
        opts = {} if q is None else {"q": q}
        r = dd.sample(gmm, x_T=x_T, method=method, steps=4, generator=torch.Generator().manual_seed(1), **opts)
        assert r.settings["logp_exact_for_flow"] is exact, (method, q)


def test_adaptive_solvers_share_probes_across_the_stages_of_a_step():
    """An embedded pair compares the stages of a step: with fresh probes per stage it would read
    their noise as discretisation error and shrink its steps. Stages share them, so the step count
    stays that of the exact divergence, and the result stays unbiased within its error."""
    g = mixture(16, seed=41)
    x_T = g.schedule.prior_sample((8, 16), generator=gen(42), dtype=torch.float64)
    opts = dict(x_T=x_T, method="pf-ode", solver="bosh3", rtol=1e-4, atol=1e-4)
    exact = sample(g, divergence="exact", **opts)
    runs = [sample(g, generator=gen(43 + k), **opts) for k in range(6)]
    assert max(r.steps for r in runs) <= 1.5 * exact.steps, ([r.steps for r in runs], exact.steps)
    err = torch.stack([r.logp for r in runs]) - exact.logp
    assert float(err.mean(0).abs().max()) < 4 * float(err.std(0).max()) / 6**0.5 + 1e-6
    assert dd.divergence.make_divergence("hutchinson", solver="bosh3").resample == "step"
    assert dd.divergence.make_divergence("hutchinson", solver="exp-heun").resample == "call"
