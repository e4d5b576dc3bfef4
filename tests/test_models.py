"""Model adapters (docs/math.md s.2): parametrization round trips, formulas, guidance, NFE."""

from __future__ import annotations

import pytest
import torch

import diffdensity as dd
from conftest import F64, SCHEDULE_NAMES, Counted, gen, make_mixture, make_schedule
from diffdensity.models import PARAMETRIZATIONS, prediction_to_score, score_to_prediction

DIM = 5


def times(schedule: dd.Schedule, n: int) -> torch.Tensor:
    """``n`` times spread over the interior of the schedule's range, one per sample."""
    u = torch.linspace(0.02, 0.98, n, dtype=F64)
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def network_for(gmm: dd.GaussianMixture, parametrization: str):
    """What a perfect network trained to predict ``parametrization`` would compute."""
    sched = gmm.schedule

    if parametrization == "edm":

        def denoiser(x_ve, sigma_ve):
            # recover the schedule time from sigma_ve = sigma / alpha = exp(-lambda / 2)
            t = sched.t_from_log_snr(-2 * torch.log(sigma_ve.to(F64)))
            alpha = sched(t).alpha.reshape(-1, *([1] * (x_ve.ndim - 1)))
            x = alpha * x_ve
            return score_to_prediction(gmm.score(x, t), x, sched(t), "x0")

        return denoiser

    def fn(x, t):
        return score_to_prediction(gmm.score(x, t), x, sched(t), parametrization)

    return fn


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_parametrization_round_trip(name, parametrization):
    sched = make_schedule(name)
    gmm = make_mixture(sched, DIM, seed=3)
    t = times(sched, 16)
    x = gmm.sample(16, generator=gen(4)) * sched(t).alpha[:, None] + sched(t).sigma[:, None] * torch.randn(
        16, DIM, generator=gen(5), dtype=F64
    )
    model = dd.ScoreModel(network_for(gmm, parametrization), sched, parametrization=parametrization)
    expected = gmm.score(x, t)
    got = model.score(x, t)
    assert got.shape == x.shape and got.dtype == F64
    # the "edm" route also round-trips t through t_from_log_snr (accurate to ~1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_predictions_of_a_known_sample(name):
    """x = alpha x0 + sigma eps: the conditional score -eps/sigma maps to the known targets."""
    sched = make_schedule(name)
    t = times(sched, 6)
    v = sched(t)
    a, s, da, ds = (q[:, None] for q in (v.alpha, v.sigma, v.d_alpha, v.d_sigma))
    x0 = torch.randn(6, DIM, generator=gen(6), dtype=F64)
    eps = torch.randn(6, DIM, generator=gen(7), dtype=F64)
    x = a * x0 + s * eps
    score = -eps / s  # grad log N(x; alpha x0, sigma^2 I)
    targets = {
        "score": score,
        "eps": eps,
        "x0": x0,
        "edm": x0,
        "v": a * eps - s * x0,
        "velocity": da * x0 + ds * eps,  # d x_t / dt along the straight path
    }
    for p, target in targets.items():
        torch.testing.assert_close(score_to_prediction(score, x, v, p), target, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(prediction_to_score(target, x, v, p), score, rtol=1e-9, atol=1e-9)


def test_math_md_formulas():
    """The conversions written in docs/math.md s.2, evaluated literally."""
    g = gen(8)
    x = torch.randn(4, DIM, generator=g, dtype=F64)
    pred = torch.randn(4, DIM, generator=g, dtype=F64)
    # VP v-prediction: eps_hat = sigma x + alpha v, s = -eps_hat / sigma
    vp = dd.VP()
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=F64)
    v = vp(t)
    a, s = v.alpha[:, None], v.sigma[:, None]
    torch.testing.assert_close(prediction_to_score(pred, x, v, "v"), -(s * x + a * pred) / s, rtol=1e-12, atol=1e-12)
    # rectified-flow velocity v = eps - x0: s = -(x + (1 - t) v) / t
    rf = dd.RectifiedFlow()
    tt = t[:, None]
    torch.testing.assert_close(
        prediction_to_score(pred, x, rf(t), "velocity"), -(x + (1 - tt) * pred) / tt, rtol=1e-12, atol=1e-12
    )
    # EDM denoiser on x_ve = x / alpha: s = (D - x_ve) / (alpha sigma_ve^2)
    x_ve, sigma_ve = x / a, s / a
    torch.testing.assert_close(
        prediction_to_score(pred, x, v, "edm"), (pred - x_ve) / (a * sigma_ve**2), rtol=1e-12, atol=1e-12
    )


def test_edm_network_receives_ve_input_and_sigma():
    sched = dd.VPLinear()
    t = torch.tensor([0.2, 0.7], dtype=F64)
    x = torch.randn(2, DIM, generator=gen(9), dtype=F64)
    seen = {}

    def denoiser(x_ve, sigma_ve):
        seen["x"], seen["sigma"] = x_ve, sigma_ve
        return torch.zeros_like(x_ve)

    dd.ScoreModel(denoiser, sched, parametrization="edm").score(x, t)
    v = sched(t)
    torch.testing.assert_close(seen["x"], x / v.alpha[:, None], rtol=1e-14, atol=0)
    torch.testing.assert_close(seen["sigma"], v.sigma / v.alpha, rtol=1e-14, atol=0)


def test_scalar_time_and_conditioning_are_passed_through():
    sched = dd.VP()
    calls = []

    def fn(x, t, *, label):
        calls.append((t, label))
        return torch.zeros_like(x)

    x = torch.randn(3, DIM, generator=gen(10), dtype=F64)
    dd.ScoreModel(fn, sched).score(x, 0.25, label=7)
    (t, label), = calls
    assert t.shape == (3,) and torch.equal(t, torch.full((3,), 0.25, dtype=F64)) and label == 7


def test_classifier_free_guidance():
    sched = dd.VP()
    gmm = make_mixture(sched, DIM, seed=11)
    calls = []

    def fn(x, t, *, shift):
        calls.append(x.shape[0])
        return gmm.score(x - shift, t)  # conditioning shifts the distribution

    model = dd.ScoreModel(fn, sched)
    b = 6
    x = gmm.sample_t(b, 0.4, generator=gen(12))
    t = torch.full((b,), 0.4, dtype=F64)
    shift = torch.randn(b, DIM, generator=gen(13), dtype=F64)
    zero = torch.zeros(1, DIM, dtype=F64)  # unconditional branch, broadcast over the batch
    s_cond, s_uncond = gmm.score(x - shift, t), gmm.score(x, t)
    for w in (0.0, 1.0, 0.5, 3.0):
        calls.clear()
        cfg = dd.ClassifierFreeGuidance(model, w, cond={"shift": shift}, uncond={"shift": zero})
        s = cfg.score(x, t)
        assert calls == [2 * b], "both branches must go through one batched call"
        torch.testing.assert_close(s, s_uncond + w * (s_cond - s_uncond), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dd.ClassifierFreeGuidance(model, 1.0, cond={"shift": shift}, uncond={"shift": zero}).score(x, t), s_cond)
    torch.testing.assert_close(dd.ClassifierFreeGuidance(model, 0.0, cond={"shift": shift}, uncond={"shift": zero}).score(x, t), s_uncond)
    assert cfg.schedule is sched
    with pytest.raises(ValueError, match="same keys"):
        dd.ClassifierFreeGuidance(model, 2.0, cond={"shift": shift}, uncond={})


def test_classifier_free_guidance_non_tensor_conditioning():
    sched = dd.VP()

    def fn(x, t, *, scale):
        return scale * x

    x = torch.randn(2, DIM, generator=gen(14), dtype=F64)
    cfg = dd.ClassifierFreeGuidance(dd.ScoreModel(fn, sched), 2.0, cond={"scale": 3.0}, uncond={"scale": 3.0})
    torch.testing.assert_close(cfg.score(x, 0.5), 3.0 * x)
    bad = dd.ClassifierFreeGuidance(dd.ScoreModel(fn, sched), 2.0, cond={"scale": 3.0}, uncond={"scale": 1.0})
    with pytest.raises(ValueError, match="'scale'"):
        bad.score(x, 0.5)


def test_counted_model():
    sched = dd.VP()
    gmm = make_mixture(sched, DIM, seed=15)
    counted = Counted(gmm)
    x = gmm.sample(3, generator=gen(16))
    for _ in range(4):
        torch.testing.assert_close(counted.score(x, 0.5), gmm.score(x, 0.5))
    assert counted.nfe.forward == 4 and counted.nfe.total == 4 and counted.schedule is sched
    nfe = dd.NFE(forward=2, jvp=3, vjp=5)
    assert nfe.total == 10 and str(nfe) == "2 forward + 3 jvp + 5 vjp"


def test_protocol():
    sched = dd.VP()
    from diffdensity.models import Model

    assert isinstance(make_mixture(sched, DIM), Model)
    assert isinstance(dd.ScoreModel(lambda x, t: x, sched), Model)


def test_score_model_errors():
    sched = dd.VP()
    with pytest.raises(ValueError, match="unknown parametrization 'noise'"):
        dd.ScoreModel(lambda x, t: x, sched, parametrization="noise")
    with pytest.raises(TypeError, match="fn must be callable"):
        dd.ScoreModel(42, sched)
    with pytest.raises(TypeError, match="schedule"):
        dd.ScoreModel(lambda x, t: x, "vp")
    x = torch.randn(3, DIM, generator=gen(22), dtype=F64)
    bad = dd.ScoreModel(lambda x, t: x[:, :-1], sched, parametrization="eps")
    with pytest.raises(ValueError, match=r"returned shape \(3, 4\), expected \(3, 5\)"):
        bad.score(x, 0.5)
    with pytest.raises(ValueError, match="t must be a scalar or of shape"):
        dd.ScoreModel(lambda x, t: x, sched).score(x, torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="unknown parametrization"):
        prediction_to_score(x, x, sched(torch.full((3,), 0.5)), "x_0")


def test_classifier_free_guidance_batch_conventions():
    """Leading dimension 1 broadcasts; a divisor of the batch tiles (probe folding); extras double."""
    sched = dd.VP()
    gmm = make_mixture(sched, DIM, seed=17)

    def fn(x, t, *, shift, offset):
        return gmm.score(x - shift - offset, t)

    model = dd.ScoreModel(fn, sched)
    b, w = 4, 2.5
    x = gmm.sample_t(b, 0.3, generator=gen(18))
    one = torch.randn(1, DIM, generator=gen(19), dtype=F64)
    offset = 0.1 * torch.randn(b, DIM, generator=gen(20), dtype=F64)
    zero = torch.zeros(1, DIM, dtype=F64)
    cfg = dd.ClassifierFreeGuidance(model, w, cond={"shift": one}, uncond={"shift": zero})
    s = cfg.score(x, 0.3, offset=offset)
    s_c, s_u = gmm.score(x - one - offset, 0.3), gmm.score(x - offset, 0.3)
    torch.testing.assert_close(s, s_u + w * (s_c - s_u), rtol=1e-12, atol=1e-12)
    # a batch folded as x.repeat(3, 1) sees per-sample conditioning tiled the same way
    shift = torch.randn(b, DIM, generator=gen(21), dtype=F64)
    cfg = dd.ClassifierFreeGuidance(model, w, cond={"shift": shift}, uncond={"shift": zero})
    xr = x.repeat(3, 1)
    s = cfg.score(xr, 0.3, offset=offset.repeat(3, 1))
    s_c, s_u = gmm.score(xr - shift.repeat(3, 1) - offset.repeat(3, 1), 0.3), gmm.score(xr - offset.repeat(3, 1), 0.3)
    torch.testing.assert_close(s, s_u + w * (s_c - s_u), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="'shift' is set by the guidance"):
        cfg.score(x, 0.3, shift=shift, offset=offset)
    bad = dd.ClassifierFreeGuidance(model, w, cond={"shift": torch.zeros(3, DIM)}, uncond={"shift": zero})
    with pytest.raises(ValueError, match="'shift' must have a leading batch dimension"):
        bad.score(x, 0.3, offset=offset)
