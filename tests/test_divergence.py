"""Divergence estimators (docs/math.md s.6) against the exact Laplacian of a Gaussian mixture."""

from __future__ import annotations

import time

import pytest
import torch

import diffdensity as dd
from conftest import F64, gen, make_mixture
from diffdensity import divergence
from diffdensity.divergence import make_divergence, model_fn


def setup(dim: int = 6, b: int = 4, *, rotate: bool = True, seed: int = 0, t: float = 0.6):
    """A rotated VP mixture and points at t = 0.6, where the components overlap (mixed responsibilities)."""
    gmm = make_mixture(dd.VP(), dim, k=3, seed=seed, rotate=rotate)
    tt = torch.full((b,), t, dtype=F64)
    x = gmm.sample_t(b, tt, generator=gen(seed + 1))
    return gmm, x, tt


def score_jacobian(gmm: dd.GaussianMixture, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, D, D) Jacobians of the score by autograd, one sample at a time."""
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda z: gmm.score(z[None], t[i : i + 1])[0], x[i]) for i in range(x.shape[0])]
    )


class _IdentityNoJvp(torch.autograd.Function):
    """The identity with a backward pass but no forward-mode (jvp) rule."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


class NoForwardAD:
    """A model that works under reverse-mode AD but fails under torch.func.jvp."""

    def __init__(self, gmm):
        self.gmm, self.schedule = gmm, gmm.schedule
        self.calls = 0

    def score(self, x, t, **cond):
        self.calls += 1
        return self.gmm.score(_IdentityNoJvp.apply(x), t)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
@pytest.mark.parametrize("chunk_size", [1, 4, 6, None])
def test_exact_equals_laplacian(rotate, mode, chunk_size):
    gmm, x, t = setup(rotate=rotate)
    est = dd.Exact(chunk_size=chunk_size, mode=mode)
    nfe = dd.NFE()
    with torch.no_grad():  # how the solvers call it
        fx, div = est(model_fn(gmm, t), x, nfe)
    lap = gmm.laplacian(x, t)
    assert div.dtype == F64 and div.shape == (4,)
    torch.testing.assert_close(div, lap, rtol=1e-10, atol=1e-10 * lap.abs().max().item())
    torch.testing.assert_close(fx, gmm.score(x, t), rtol=1e-13, atol=1e-13)
    expected_mode = "forward" if mode == "auto" else mode
    assert est.resolved_mode == expected_mode
    # one Jacobian product per basis vector, per sample
    assert (nfe.jvp, nfe.vjp, nfe.forward) == ((6, 0, 0) if expected_mode == "forward" else (0, 6, 0))
    # from one primal (reverse: one graph for all chunks) or one per chunk (forward)
    chunks = -(-6 // (chunk_size or 6))
    assert est.primal_passes == (chunks if expected_mode == "forward" else 1)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_exact_on_event_shaped_input_and_memory_bound(mode):
    """Chunks of 5 basis vectors (max_elements = 5 B D): 3 chunks of products for D = 12.
    Forward mode runs the network once per chunk (unbatched primal under vmap), reverse
    mode once for all chunks (one graph, 3 batched backward passes)."""
    gmm = make_mixture(dd.VP(), 12, k=2, seed=2, event_shape=(3, 2, 2))
    t = torch.full((3,), 0.5, dtype=F64)
    x = gmm.sample_t(3, t, generator=gen(3))
    sizes = []

    def fn(z):
        sizes.append(z.shape[0])
        return gmm.score(z, t.repeat(z.shape[0] // 3))

    nfe = dd.NFE()
    est = dd.Exact(max_elements=5 * 3 * 12, mode=mode)
    _, div = est(fn, x, nfe)
    torch.testing.assert_close(div, gmm.laplacian(x, t), rtol=1e-10, atol=1e-8)
    assert sizes == ([3, 3, 3] if mode == "forward" else [3])
    assert est.primal_passes == len(sizes) and (nfe.jvp + nfe.vjp) == 12


def test_exact_matches_laplacian_at_d512():
    """Dense (rotated) Jacobian in D = 512: float64 round-off only."""
    gmm, x, t = setup(dim=512, b=2, seed=4, t=0.2)
    _, div = dd.Exact(chunk_size=256)(model_fn(gmm, t), x)
    lap = gmm.laplacian(x, t)
    torch.testing.assert_close(div, lap, rtol=1e-11, atol=0)


def test_forward_ad_failure_falls_back_to_reverse():
    gmm, x, t = setup()
    model = NoForwardAD(gmm)
    with pytest.raises((RuntimeError, NotImplementedError)):
        dd.Exact(mode="forward")(model_fn(model, t), x)
    for est, reference in ((dd.Exact(), dd.Exact(mode="forward")), (dd.Hutchinson(4), dd.Hutchinson(4, mode="forward"))):
        assert est.mode == "auto" and est.resolved_mode is None
        nfe = dd.NFE()
        est.reset(gen(30))
        with torch.no_grad():
            fx, div = est(model_fn(model, t), x, nfe)
        assert est.resolved_mode == "reverse"
        assert nfe.jvp == 0 and nfe.vjp == (6 if isinstance(est, dd.Exact) else 4)
        torch.testing.assert_close(fx, gmm.score(x, t), rtol=1e-13, atol=1e-13)
        # same probes through the model that supports forward AD: the same estimate
        reference.reset(gen(30))
        torch.testing.assert_close(div, reference(model_fn(gmm, t), x)[1], rtol=1e-10, atol=1e-8)
    # once resolved, the estimator does not retry forward mode
    calls = model.calls
    est = dd.Exact(chunk_size=6)
    est(model_fn(model, t), x)
    est(model_fn(model, t), x)
    assert model.calls - calls == 4  # failed jvp attempts (under vmap, then folded), then one reverse pass per call


def hutchinson_variance(jac: torch.Tensor, noise: str) -> torch.Tensor:
    """Var(e^T J e) for symmetric J: 2 sum_{i != j} J_ij^2 (Rademacher), 2 |J|_F^2 (Gaussian)."""
    fro = jac.square().sum((-1, -2))
    if noise == "gaussian":
        return 2 * fro
    return 2 * (fro - torch.diagonal(jac, dim1=-2, dim2=-1).square().sum(-1))


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_4_standard_errors(noise):
    gmm, x, t = setup(dim=8, b=3, seed=5)
    jac = score_jacobian(gmm, x, t)
    torch.testing.assert_close(jac, jac.mT, rtol=1e-9, atol=1e-9)  # a Hessian
    var = hutchinson_variance(jac, noise)
    probes = 4000
    est = dd.Hutchinson(probes, noise=noise, mode="forward")
    est.reset(gen(6))
    nfe = dd.NFE()
    _, div = est(model_fn(gmm, t), x, nfe)
    assert nfe.jvp == probes
    exact = gmm.laplacian(x, t)
    se = (var / probes).sqrt()
    z = ((div - exact) / se).abs()
    assert (z < 4).all(), f"Hutchinson mean is {z.max():.2f} standard errors from the trace"
    # n single-probe estimates at once: the batch repeated n times, one probe per row (probes
    # shared by the stages of a step: the first call of a solve takes no second probe)
    n = 4000
    single = dd.Hutchinson(1, noise=noise, mode="forward", resample="step")
    single.reset(gen(7))
    _, draws = single(model_fn(gmm, t.repeat(n)), x.repeat(n, 1))
    draws = draws.reshape(n, -1)
    z = ((draws.mean(0) - exact) / se).abs()
    assert (z < 4).all(), f"mean of single-probe estimates is {z.max():.2f} standard errors from the trace"
    # their spread matches the theoretical variance; the relative standard error of a
    # sample variance is sqrt((kurtosis - 1) / n), a few percent here: allow 20 %
    ratio = draws.var(0) / var
    assert ((ratio - 1).abs() < 0.2).all(), ratio


def test_hutchinson_on_a_diagonal_jacobian_with_rademacher_is_exact():
    gmm, x, t = setup(rotate=False, seed=8)
    single = make_mixture(dd.VP(), 6, k=1, seed=8, rotate=False)  # K = 1: J = diag(-1/v)
    est = dd.Hutchinson(1)
    est.reset(gen(9))
    _, div = est(model_fn(single, t), x)
    torch.testing.assert_close(div, single.laplacian(x, t), rtol=1e-13, atol=0)


def test_resample_semantics():
    gmm, x, t = setup(seed=10)
    fn = model_fn(gmm, t)

    def run(resample: str, seed: int = 11) -> list[torch.Tensor]:
        est = dd.Hutchinson(2, resample=resample)
        est.reset(gen(seed))
        out = []
        for _ in range(3):  # three solver steps of two stages each
            est.begin_step()
            out.append(est(fn, x)[1])
            out.append(est(fn, x)[1])
        return out

    solve, step, call = run("solve"), run("step"), run("call")
    assert dd.Hutchinson(2).resample == "call"  # the default: every stage its own probes
    # "solve": one set of probes for the whole solve
    assert all(torch.equal(solve[0], d) for d in solve)
    # "step": the stages of a step share probes; begin_step draws fresh ones
    assert torch.equal(step[0], step[1]) and torch.equal(step[2], step[3]) and torch.equal(step[4], step[5])
    assert not torch.equal(step[0], step[2]) and not torch.equal(step[2], step[4])
    # "call": fresh probes on every call
    assert all(not torch.equal(call[i], call[i + 1]) for i in range(5))
    # same seed, same result; another seed, other probes
    assert all(torch.equal(a, b) for a, b in zip(step, run("step")))
    assert not torch.equal(step[0], run("step", seed=12)[0])
    # reset starts over
    est = dd.Hutchinson(2, resample="solve")
    est.reset(gen(11))
    first = est(fn, x)[1]
    est.reset(gen(11))
    assert torch.equal(first, est(fn, x)[1])


def test_probes_are_shared_by_the_batch_layout():
    """Probe draws depend on the seed only; the same probes give the same estimate in either mode."""
    gmm, x, t = setup(seed=13)
    outs = []
    for mode in ("forward", "reverse"):
        est = dd.Hutchinson(3, mode=mode, noise="gaussian")
        est.reset(gen(14))
        outs.append(est(model_fn(gmm, t), x)[1])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-11, atol=1e-9)
    e = dd.Hutchinson(3, noise="gaussian")
    e.reset(gen(15))
    assert e.draw(x).shape == (3, *x.shape)
    r = dd.Hutchinson(5)
    r.reset(gen(15))
    assert set(r.draw(x).unique().tolist()) == {-1.0, 1.0}


def test_conditioning_is_repeated_over_folded_probes():
    sched = dd.VP()
    gmm = make_mixture(sched, 5, k=2, seed=16)
    b = 3
    t = torch.full((b,), 0.4, dtype=F64)
    x = gmm.sample_t(b, t, generator=gen(17))
    shift = torch.randn(b, 5, generator=gen(18), dtype=F64)
    model = dd.ScoreModel(lambda z, tt, *, shift: gmm.score(z - shift, tt), sched)
    _, div = dd.Exact(chunk_size=2)(model_fn(model, t, {"shift": shift}), x)
    torch.testing.assert_close(div, gmm.laplacian(x - shift, t), rtol=1e-10, atol=1e-9)
    # classifier-free guidance is linear in the scores, hence in their divergences
    w = 3.0
    cfg = dd.ClassifierFreeGuidance(model, w, cond={"shift": shift}, uncond={"shift": torch.zeros(1, 5, dtype=F64)})
    _, div = dd.Exact(chunk_size=2)(model_fn(cfg, t), x)
    lap_c, lap_u = gmm.laplacian(x - shift, t), gmm.laplacian(x, t)
    torch.testing.assert_close(div, lap_u + w * (lap_c - lap_u), rtol=1e-10, atol=1e-8)


def test_make_divergence_and_options():
    assert isinstance(make_divergence("exact"), dd.Exact)
    h = make_divergence("hutchinson", 7)
    assert isinstance(h, dd.Hutchinson) and h.probes == 7
    est = dd.Hutchinson(2, noise="gaussian")
    assert make_divergence(est) is est
    with pytest.raises(ValueError, match="unknown divergence 'hutch'"):
        make_divergence("hutch")
    with pytest.raises(ValueError, match="unknown mode 'jvp'"):
        dd.Exact(mode="jvp")
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        dd.Exact(chunk_size=0)
    with pytest.raises(ValueError, match="probes must be a positive integer"):
        dd.Hutchinson(0)
    with pytest.raises(ValueError, match="probes must be a positive integer"):
        dd.Hutchinson(1.5)
    with pytest.raises(ValueError, match="unknown noise 'normal'"):
        dd.Hutchinson(1, noise="normal")
    with pytest.raises(ValueError, match="unknown resample 'never'"):
        dd.Hutchinson(1, resample="never")


class CountingNet:
    """The mixture's score as a model that counts its network calls and the rows they see."""

    def __init__(self, gmm):
        self.gmm, self.schedule = gmm, gmm.schedule
        self.rows: list[int] = []

    def score(self, x, t, **cond):
        self.rows.append(x.shape[0])
        return self.gmm.score(x, t)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_probes_share_one_primal_evaluation(mode):
    """P = 5 probes: the network runs once per evaluation, on the B rows of the batch, and the
    products equal those of the folded batch (P * B rows) they replace."""
    gmm, x, t = setup(dim=6, b=4, seed=40)
    net = CountingNet(gmm)
    est = dd.Hutchinson(5, mode=mode)
    est.reset(gen(41))
    nfe = dd.NFE()
    fx, div = est(model_fn(net, t), x, nfe)
    assert net.rows == [4] and est.primal_passes == 1
    assert (nfe.forward, nfe.jvp, nfe.vjp) == ((0, 5, 0) if mode == "forward" else (0, 0, 5))
    torch.testing.assert_close(fx, gmm.score(x, t), rtol=1e-13, atol=1e-13)
    eps = est._eps
    jac = score_jacobian(gmm, x, t)
    quad = torch.einsum("pbi,bij,pbj->pb", eps, jac, eps)
    torch.testing.assert_close(est.last_samples, quad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(div, quad.mean(0), rtol=1e-10, atol=1e-10)
    # per_probe: the P estimates themselves
    est.per_probe = True
    _, samples = est(model_fn(net, t), x)
    assert samples.shape == (5, 4) and torch.equal(samples, est.last_samples)


class NoVmap(CountingNet):
    """A network that refuses to run under vmap (like one with data-dependent Python control flow)."""

    def score(self, x, t, **cond):
        out = super().score(x, t)
        if torch._C._functorch.is_batchedtensor(out) or torch._C._functorch.is_functorch_wrapped_tensor(out) and torch._C._functorch.maybe_get_level(out) > 1:
            raise RuntimeError("no batching rule")
        return out


def test_forward_mode_without_vmap_folds_the_probes():
    gmm, x, t = setup(dim=6, b=4, seed=42)
    net = NoVmap(gmm)
    est = dd.Hutchinson(3, mode="forward")
    est.reset(gen(43))
    _, div = est(model_fn(net, t), x)
    ref = dd.Hutchinson(3, mode="reverse")
    ref.reset(gen(43))
    torch.testing.assert_close(div, ref(model_fn(gmm, t), x)[1], rtol=1e-10, atol=1e-10)
    assert net.rows[-1] == 12 and est.primal_passes == 3  # folded: P * B rows, P primal evaluations


class SlowTangents(CountingNet):
    """Forward-mode products take at least ``delay`` seconds (a sleep when tangents flow)."""

    def __init__(self, gmm, delay):
        super().__init__(gmm)
        self.delay = delay

    def score(self, x, t, **cond):
        if torch._C._functorch.is_batchedtensor(x) or torch._C._functorch.is_functorch_wrapped_tensor(x):
            time.sleep(self.delay)
        return super().score(x, t)


def test_auto_mode_is_measured_and_cached_per_signature():
    gmm, x, t = setup(dim=6, b=4, seed=44)
    net = SlowTangents(gmm, 4 * divergence.AUTO_MIN_SECONDS + 0.05)
    est = dd.Hutchinson(2)
    est.reset(gen(45))
    nfe = dd.NFE()
    est(model_fn(net, t), x, nfe)
    # forward was slow, reverse timed once, clearly faster and chosen; all passes counted
    assert est.resolved_mode == "reverse" and set(est.mode_timings) == {"forward", "reverse"}
    assert est.mode_timings["forward"] > 4 * divergence.AUTO_MIN_SECONDS > 2 * est.mode_timings["reverse"]
    assert (nfe.jvp, nfe.vjp) == (2, 2)
    calls = len(net.rows)
    est(model_fn(net, t), x, nfe)  # cached for this model, device, dtype, shape: no new measurement
    assert len(net.rows) == calls + 1 and nfe.vjp == 4
    est(model_fn(net, t[:2]), x[:2], nfe)  # another shape: measured again
    assert len(net.rows) > calls + 2
    # a fast field keeps forward mode without timing reverse mode
    fast = dd.Hutchinson(2)
    fast.reset(gen(46))
    nfe = dd.NFE()
    fast(model_fn(gmm, t), x, nfe)
    assert fast.resolved_mode == "forward" and "reverse" not in fast.mode_timings and nfe.vjp == 0


class NaNNet(CountingNet):
    def score(self, x, t, **cond):
        out = super().score(x, t).clone()
        out[2] = float("nan")
        return out


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_network_nan_is_named_not_blamed_on_steps(mode):
    gmm, x, t = setup(dim=6, b=4, seed=47)
    for est in (dd.Hutchinson(2, mode=mode), dd.Exact(mode=mode)):
        est.reset(gen(48))
        with pytest.raises(FloatingPointError, match=r"network output is NaN or Inf at t=0.6 for 1 of 4 samples \(indices 2\).*more steps will not help"):
            est(model_fn(NaNNet(gmm), t), x)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_variance_estimate_is_unbiased(noise):
    """last_var estimates Var(mean of P probes) = Var(e^T J e) / P; averaged over 3000 draws
    it matches the closed form (2 sum_{i != j} J_ij^2, or 2 |J|_F^2) within 5 %."""
    gmm, x, t = setup(dim=8, b=3, seed=49)
    var = hutchinson_variance(score_jacobian(gmm, x, t), noise)
    n, p = 3000, 3
    est = dd.Hutchinson(p, noise=noise)
    est.reset(gen(50))
    est(model_fn(gmm, t.repeat(n)), x.repeat(n, 1))
    mean_var = est.last_var.reshape(n, -1).mean(0)
    assert ((mean_var / (var / p) - 1).abs() < 0.05).all(), mean_var / (var / p)
    if noise == "gaussian":
        return
    # one Rademacher probe: the diagonal term needs a second, independent probe, the previous
    # call's; rescaling it by |J' e'| / |J e| costs O(1/D) of bias, hence a larger D here
    gmm, x, t = setup(dim=128, b=3, seed=49)
    jac = score_jacobian(gmm, x, t)
    var = hutchinson_variance(jac, noise)
    single = dd.Hutchinson(1, mode="forward")
    single.reset(gen(51))
    fn = model_fn(gmm, t.repeat(n))
    nfe = dd.NFE()
    single(fn, x.repeat(n, 1), nfe)  # no predecessor: a second probe, counted, and the mean of two
    assert nfe.jvp == 2 and single.last_samples.shape == (2, 3 * n)  # passes per sample
    first = single.last_var.reshape(n, -1).mean(0)
    assert ((first / (var / 2) - 1).abs() < 0.05).all(), first / (var / 2)
    single(fn, x.repeat(n, 1), nfe)
    assert nfe.jvp == 3
    second = single.last_var.reshape(n, -1).mean(0)
    assert ((second / var - 1).abs() < 0.05).all(), second / var
    # ... and by the Jacobian's scale: a field twice as steep as the previous call's
    single(lambda z: 2 * fn(z), x.repeat(n, 1))
    scaled = single.last_var.reshape(n, -1).mean(0)
    assert ((scaled / (4 * var) - 1).abs() < 0.05).all(), scaled / (4 * var)
    shared = dd.Hutchinson(1, resample="step")
    shared.reset(gen(52))
    shared(model_fn(gmm, t), x)
    shared(model_fn(gmm, t), x)
    assert shared.last_var is None  # the same probe twice: the diagonal term is not estimable
