"""diffusers integration: schedules, score conversion against the schedulers' own steps,
likelihoods, latent diffusion with CFG, offline loading and autodiff -- on tiny random
networks built from configs (no hub access)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffdensity as dd  # noqa: E402
from diffdensity.divergence import Exact, Hutchinson, model_fn  # noqa: E402
from diffdensity.integrations import (  # noqa: E402
    DiffusersScoreModel,
    LatentDiffusion,
    from_diffusers,
    from_diffusers_pretrained,
    schedule_from_scheduler,
)
from diffdensity.schedules import DiscreteVP  # noqa: E402

pytestmark = [  # third-party deprecations raised inside diffusers and torch
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

F64 = torch.float64
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run fastest on one thread (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_unet(seed: int = 0, *, attention: bool = True, out_channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


def tiny_cond_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


def tiny_vae(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def x0_from_score(model, x, t, s):
    v = model.schedule(torch.as_tensor(t, dtype=F64)).view(-1, 1, 1, 1)
    a, sig = v.alpha.to(x.dtype), v.sigma.to(x.dtype)
    return (x + sig**2 * s) / a


def assert_close(a, b, tol=2e-4):
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


# ------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
        dict(beta_schedule="linear", rescale_betas_zero_snr=True),
    ],
    ids=["linear", "scaled_linear", "cosine", "zero_snr", "zero_snr_linear"],
)
def test_discrete_schedule_matches_alphas_cumprod(config):
    sched = diffusers.DDIMScheduler(**config)
    schedule = schedule_from_scheduler(sched)
    assert isinstance(schedule, DiscreteVP) and (schedule.t_min, schedule.t_max) == (0.0, 999.0)
    abar = sched.alphas_cumprod.to(F64)
    if config.get("rescale_betas_zero_snr"):  # a finite, still decreasing stand-in for abar = 0
        assert abar[-1] == 0
        abar[-1] = 2.0**-24 if abar[-2] > 2.0**-24 else abar[-2] ** 2 / abar[-3]
    k = torch.arange(1000, dtype=F64)
    v = schedule(k)
    torch.testing.assert_close(v.alpha**2, abar, rtol=1e-10, atol=0)
    torch.testing.assert_close(v.sigma**2, 1 - abar, rtol=1e-10, atol=1e-15)
    # the forward process is the scheduler's own add_noise at the training timesteps
    x0, eps = torch.randn(2, 3, 4, 4, generator=gen(0)), torch.randn(2, 3, 4, 4, generator=gen(1))
    ks = torch.tensor([17, 640])
    vk = schedule(ks.to(F64)).view(-1, 1, 1, 1)
    assert_close((vk.alpha * x0 + vk.sigma * eps).float(), sched.add_noise(x0, eps, ks), 1e-5)
    # log sigma_ve is linear between steps (k-diffusion's interpolation)
    log_sig = -0.5 * schedule.log_snr(k)
    mid = -0.5 * schedule.log_snr(k[:-1] + 0.5)
    torch.testing.assert_close(mid, 0.5 * (log_sig[:-1] + log_sig[1:]), rtol=1e-12, atol=1e-12)
    # t_from_log_snr inverts log_snr, at and between the steps
    t = torch.rand(200, generator=gen(2), dtype=F64) * 999
    t = torch.cat([t, k[::37], torch.tensor([0.0, 999.0], dtype=F64)])
    torch.testing.assert_close(schedule.t_from_log_snr(schedule.log_snr(t)), t, rtol=0, atol=1e-8)


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_discrete_schedule_derivatives_and_contract(interpolation):
    sched = diffusers.DDPMScheduler()
    schedule = schedule_from_scheduler(sched, interpolation=interpolation)
    k = torch.arange(1000, dtype=F64)
    torch.testing.assert_close(schedule(k).alpha ** 2, sched.alphas_cumprod.to(F64), rtol=1e-10, atol=0)
    u = torch.rand(999, generator=gen(0), dtype=F64)
    # linear: derivatives of the pieces, checked inside them; cubic: C^1, checked anywhere
    t = k[:-1] + (u.clamp(0.05, 0.95) if interpolation == "linear" else u)
    if interpolation == "cubic":
        t = torch.cat([t, k[1:-1]])
    h = 1e-4
    rtol = 1e-6 if interpolation == "linear" else 5e-5  # C^1, not C^2, at the knots: O(h) differences
    v, vp, vm = schedule(t), schedule(t + h), schedule(t - h)
    torch.testing.assert_close(v.d_alpha, (vp.alpha - vm.alpha) / (2 * h), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(v.d_sigma, (vp.sigma - vm.sigma) / (2 * h), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(v.alpha**2 + v.sigma**2, torch.ones_like(t))
    assert (v.g2 > 0).all() and (schedule.log_snr(t.sort().values).diff() < 0).all()
    assert abs(schedule.prior_std - math.sqrt(1 - float(schedule.alphas_cumprod[-1]))) < 1e-12
    t = torch.cat([t, torch.tensor([-3.0, 0.0, 999.0, 1002.5], dtype=F64)])  # and beyond the ends
    torch.testing.assert_close(schedule.t_from_log_snr(schedule.log_snr(t)), t, rtol=0, atol=1e-8)
    for spacing in ("uniform", "log_snr", "karras"):
        grid = schedule.time_grid(10, spacing=spacing)
        assert grid[0] == 999 and grid[-1] == 0 and (grid.diff() < 0).all()


def test_discrete_schedule_errors():
    with pytest.raises(ValueError, match="decreasing"):
        DiscreteVP(torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="inside"):
        DiscreteVP(torch.tensor([0.9, 0.5, 0.0]))
    with pytest.raises(ValueError, match="t_min"):
        DiscreteVP(torch.tensor([0.9, 0.5, 0.1]), t_max=5)
    with pytest.raises(ValueError, match="interpolation"):
        DiscreteVP(torch.tensor([0.9, 0.5, 0.1]), interpolation="spline")


def test_flow_schedule_is_diffusers_forward_process():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = from_diffusers(tiny_unet(), sched)
    assert isinstance(model.schedule, dd.RectifiedFlow) and model.parametrization == "velocity"
    sched.set_timesteps(10)
    x0, eps = torch.randn(1, 3, 8, 8, generator=gen(0)), torch.randn(1, 3, 8, 8, generator=gen(1))
    for ts, sigma in zip(sched.timesteps[1:], sched.sigmas[1:-1]):  # sigma = 1 (alpha = 0) left out
        t = model.t_from_timestep(ts)
        assert abs(float(t) - float(sigma)) < 1e-6
        v = model.schedule(t)
        # x = (1 - sigma) x0 + sigma eps: diffusers' clock runs data (sigma=0) -> noise, like ours
        x = sched.scale_noise(x0, ts[None], eps)
        assert_close((v.alpha * x0 + v.sigma * eps).float(), x, 1e-5)
        # the training target eps - x0 is the "velocity" of the conditional score at (x, t)
        s_cond = -(x.to(F64) - v.alpha * x0) / v.sigma**2
        pred = dd.models.score_to_prediction(s_cond, x.to(F64), v.view(1), "velocity")
        assert_close(pred, (eps - x0).to(F64), 1e-4)


# ------------------------------------------------------------------------------------
# score conversion against the schedulers' own denoising steps
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
@pytest.mark.parametrize("family", ["DDPMScheduler", "DDIMScheduler"])
def test_score_matches_ddpm_ddim_step(unet, family, ptype):
    config = dict(prediction_type=ptype, clip_sample=False)
    if family == "DDIMScheduler":
        config.update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False)
    sched = getattr(diffusers, family)(**config)
    sched.set_timesteps(10)
    model = from_diffusers(unet, sched)
    assert model.parametrization == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[ptype]
    x = torch.randn(2, 3, 8, 8, generator=gen(3))
    for k in sched.timesteps[2:8:2]:
        with torch.no_grad():
            out = unet(x, k).sample
            step = sched.step(out, k, x, generator=gen(4))
            s = model.score(x, float(k))
            torch.testing.assert_close(model.prediction(x, float(k)), out)
        x0 = x0_from_score(model, x, float(k), s)
        assert_close(x0, step.pred_original_sample)
        if family == "DDIMScheduler":  # deterministic DDIM step (eta = 0) rebuilt from the score
            prev = float(k) - 100
            vp, vk = model.schedule(prev), model.schedule(float(k))
            eps = -float(vk.sigma) * s
            assert_close(float(vp.alpha) * x0 + float(vp.sigma) * eps, step.prev_sample)


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
def test_score_matches_euler_step(unet, ptype):
    sched = diffusers.EulerDiscreteScheduler(prediction_type=ptype, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    _check_euler(unet, sched)


def test_score_matches_euler_continuous_timesteps(unet):
    sched = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    model = _check_euler(unet, sched)
    assert model.timestep_kind == "log_sigma"


def _check_euler(unet, sched):
    sched.set_timesteps(10)  # linspace(0, 999, 10): integer timesteps
    model = from_diffusers(unet, sched)
    x_ve = torch.randn(2, 3, 8, 8, generator=gen(5)) * sched.init_noise_sigma
    for i in (1, 4, 7):
        ts, sig, sig_next = sched.timesteps[i], float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        t = model.t_from_timestep(ts)
        v = model.schedule(t)
        assert abs(math.exp(-0.5 * float(v.log_snr)) / sig - 1) < 1e-5  # sigma_ve
        sched.set_timesteps(10)  # fresh step index, found from the timestep
        x = sched.scale_model_input(x_ve, ts)  # the VP input x_ve * alpha
        with torch.no_grad():
            out = unet(x, ts).sample
            step = sched.step(out, ts, x_ve)
            s = model.score(x, t)
        x0 = x0_from_score(model, x, t, s)
        assert_close(x0, step.pred_original_sample)
        d = (x_ve - x0) / sig  # Euler on x_ve = x / alpha in sigma_ve
        assert_close(x_ve + d * (sig_next - sig), step.prev_sample)
    return model


def test_flow_velocity_matches_flow_match_step(unet):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    model = from_diffusers(unet, sched)
    x = torch.randn(2, 3, 8, 8, generator=gen(6))
    for i in (1, 4, 9):  # i = 0 is sigma = 1, outside RectifiedFlow's [t_min, t_max]
        ts, sigma, sigma_next = sched.timesteps[i], float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        t = model.t_from_timestep(ts)
        sched.set_timesteps(10)  # fresh step index, found from the timestep
        with torch.no_grad():
            out = unet(x, ts).sample
            step = sched.step(out, ts, x)
            s = model.score(x, t)
        v = model.schedule(t)
        u_pf = float(v.f) * x - 0.5 * float(v.g2) * s  # probability-flow drift dx/dt
        assert_close(u_pf, out)  # the drift is the network's velocity: same sign, same clock
        assert_close(x + (sigma_next - sigma) * u_pf, step.prev_sample)


class GaussianVelocity(torch.nn.Module):
    """Exact flow-matching network E[eps - x0 | x] for data N(0, c^2 I), in diffusers' convention."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, sample, timestep, return_dict=True):
        sigma = (timestep / 1000).to(sample.dtype).reshape(-1, 1)
        a, var = 1 - sigma, (1 - sigma) ** 2 * self.c**2 + sigma**2
        return ((sigma - a * self.c**2) / var * sample,)


def test_flow_likelihood_exact_for_gaussian_data():
    """Sign and clock of diffusers' velocity: the PF-ODE likelihood recovers the true density."""
    c, dim = 0.5, 6
    model = from_diffusers(GaussianVelocity(c).double(), diffusers.FlowMatchEulerDiscreteScheduler())
    x = torch.randn(4, dim, generator=gen(7), dtype=F64) * c
    res = dd.log_likelihood(model, x, steps=32, solver="rk4", divergence="exact")
    v = model.schedule(model.schedule.t_min)
    var = float(v.alpha**2 * c**2 + v.sigma**2)
    expected = -0.5 * (x.square().sum(1) / var + dim * math.log(2 * math.pi * var))
    torch.testing.assert_close(res.logp, expected, rtol=0, atol=1e-4)


def test_learned_variance_channels_are_dropped():
    net = tiny_unet(out_channels=6)
    model = from_diffusers(net, diffusers.DDPMScheduler(variance_type="learned_range"))
    x = torch.randn(1, 3, 8, 8, generator=gen(8))
    with torch.no_grad():
        torch.testing.assert_close(model.prediction(x, 50.0), net(x, 50.0).sample[:, :3])


# ------------------------------------------------------------------------------------
# likelihoods and autodiff
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheduler",
    [
        diffusers.DDPMScheduler(),
        diffusers.DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True),
        diffusers.EulerDiscreteScheduler(prediction_type="sample"),
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    ],
    ids=["ddpm-eps", "ddim-v-zero_snr", "euler-x0", "flow"],
)
def test_log_likelihood_end_to_end(unet, scheduler):
    model = from_diffusers(unet, scheduler)
    x = torch.rand(2, 3, 8, 8, generator=gen(9)) * 2 - 1
    res = dd.log_likelihood(model, x, steps=3, generator=gen(10))
    assert res.logp.shape == (2,) and torch.isfinite(res.logp).all()
    assert res.nfe.total > 0
    bpd = dd.bits_per_dim(model, torch.randint(0, 256, (1, 3, 8, 8), generator=gen(11)), draws=1, steps=2, generator=gen(12))
    assert torch.isfinite(bpd.bpd).all()


@pytest.mark.parametrize(
    "scheduler, method",
    [
        (diffusers.DDIMScheduler(prediction_type="v_prediction"), "pf-ode"),
        (diffusers.DDPMScheduler(), "sde"),
        (diffusers.FlowMatchEulerDiscreteScheduler(), "pf-ode"),
    ],
    ids=["ddim-v-pf_ode", "ddpm-eps-sde", "flow-pf_ode"],
)
def test_sample_with_tracking_end_to_end(unet, scheduler, method):
    sampling = pytest.importorskip("diffdensity.sampling")
    model = from_diffusers(unet, scheduler)
    res = sampling.sample(model, 2, method=method, steps=3, track_logp=True, generator=gen(32))
    assert res.x.shape == (2, 3, 8, 8) and torch.isfinite(res.x).all()
    assert res.logp.shape == (2,) and torch.isfinite(res.logp).all()
    again = sampling.sample(model, 2, method=method, steps=3, track_logp=False, generator=gen(32))
    torch.testing.assert_close(again.x, res.x)  # tracking does not change the samples


def test_sample_latents_then_decode(latent_parts):
    sampling = pytest.importorskip("diffdensity.sampling")
    unet, sched, vae = latent_parts
    emb, neg = torch.randn(1, 5, 12, generator=gen(33)), torch.zeros(1, 5, 12)
    ld = from_diffusers(unet, sched, vae=vae, guidance_scale=3.0, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg})
    res = sampling.sample(ld, 2, steps=2, track_logp=True, generator=gen(34))
    assert res.x.shape == (2, *ld.event_shape) and torch.isfinite(res.logp).all()
    with torch.no_grad():
        assert ld.decode(res.x).shape == (2, 3, 16, 16)


def test_divergence_through_unet_matches_jacobian_trace(unet):
    model = from_diffusers(unet, diffusers.DDPMScheduler())
    x = torch.randn(1, 3, 8, 8, generator=gen(13))
    t = torch.tensor([200.0], dtype=F64)
    fn = model_fn(model, t)
    est = Exact()
    with torch.no_grad():
        s, div = est(fn, x)
    jac = torch.autograd.functional.jacobian(lambda y: fn(y.reshape(1, 3, 8, 8)).reshape(-1), x.reshape(-1))
    torch.testing.assert_close(div, torch.diagonal(jac).sum().to(F64).reshape(1), rtol=1e-4, atol=1e-3)
    assert est.resolved_mode in ("forward", "reverse")
    # the automatic choice agrees with reverse mode, probe for probe
    auto, rev = Hutchinson(3), Hutchinson(3, mode="reverse")
    auto.reset(gen(14))
    rev.reset(gen(14))
    with torch.no_grad():
        torch.testing.assert_close(auto(fn, x)[1], rev(fn, x)[1], rtol=1e-4, atol=1e-3)
    # UNet2DModel's group norm on non-contiguous activations has no forward-mode AD in torch:
    # the estimators then fall back to reverse mode
    assert auto.resolved_mode in ("forward", "reverse")


@pytest.mark.parametrize("attention", ["math", "keep"])
def test_attention_backends_and_higher_order_autodiff(attention):
    net = tiny_cond_unet()
    model = from_diffusers(net, diffusers.DDIMScheduler(), attention=attention)
    z = torch.randn(2, 4, 8, 8, generator=gen(15))
    emb = torch.randn(2, 5, 12, generator=gen(16))
    t = torch.tensor([100.0, 700.0], dtype=F64)
    fn = model_fn(model, t, {"encoder_hidden_states": emb})
    e = torch.randn_like(z)
    with torch.enable_grad():
        y = z.clone().requires_grad_(True)
        (vjp,) = torch.autograd.grad(fn(y), y, e)
    if attention == "keep":  # fused kernels: reverse mode works (that is all the estimators need)
        return
    # math attention: forward-mode AD and double backward work too
    _, jvp = torch.func.jvp(fn, (z,), (e,))
    torch.testing.assert_close((e * jvp).sum(), (e * vjp).sum(), rtol=1e-4, atol=1e-4)
    with torch.enable_grad():
        y = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(y), y, e, create_graph=True)
        (gg,) = torch.autograd.grad((g * e).sum(), y)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0
    est = Hutchinson(1, mode="forward")  # the estimators' forward mode runs through the math kernel
    est.reset(gen(17))
    with torch.no_grad():
        _, div = est(fn, z)
    assert est.resolved_mode == "forward" and torch.isfinite(div).all()


# ------------------------------------------------------------------------------------
# latent diffusion with classifier-free guidance
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_parts():
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    return tiny_cond_unet(1), sched, tiny_vae(2)


def test_latent_diffusion_cfg_and_decode(latent_parts):
    unet, sched, vae = latent_parts
    emb = torch.randn(2, 5, 12, generator=gen(18))
    neg = torch.randn(1, 5, 12, generator=gen(19))
    ld = from_diffusers(
        unet, sched, vae=vae, guidance_scale=4.0, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg}
    )
    assert isinstance(ld, LatentDiffusion) and isinstance(ld.base, DiffusersScoreModel)
    assert ld.event_shape == (4, 8, 8) and ld.scaling_factor == vae.config.scaling_factor
    z = torch.randn(2, 4, 8, 8, generator=gen(20))
    t = torch.tensor([300.0, 600.0], dtype=F64)
    with torch.no_grad():
        s = ld.score(z, t)
        s_c = ld.base.score(z, t, encoder_hidden_states=emb)
        s_u = ld.base.score(z, t, encoder_hidden_states=neg.expand(2, -1, -1))
    assert_close(s, s_u + 4.0 * (s_c - s_u), 1e-4)
    # density machinery runs in latent space (probes folded into the batch with CFG)
    res = dd.log_likelihood(ld, z, steps=2, probes=2, generator=gen(21))
    assert torch.isfinite(res.logp).all()
    with torch.no_grad():
        images = ld.decode(z)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
        latents = ld.encode(images)
        assert latents.shape == (2, 4, 8, 8)
        torch.testing.assert_close(ld.decode(latents / 1.0), vae.decode(latents / ld.scaling_factor).sample)
        draw = ld.encode(images, sample=True, generator=gen(22))
        assert draw.shape == latents.shape and not torch.equal(draw, latents)
    plain = ld.guided(1.0, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg})
    with torch.no_grad():
        assert_close(plain.score(z, t), s_c, 1e-5)


def test_density_guided_sampling_in_latent_space(latent_parts):
    """DG-ODE on latents with log-density tracking, decoded to images at the end."""
    from diffdensity.guidance import DensityGuidedODE
    from diffdensity.solvers import odeint

    unet, sched, vae = latent_parts
    emb, neg = torch.randn(1, 5, 12, generator=gen(29)), torch.zeros(1, 5, 12)
    ld = from_diffusers(unet, sched, vae=vae, guidance_scale=2.0, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg})
    schedule = ld.schedule
    z_T = schedule.prior_sample((2, *ld.event_shape), generator=gen(30))
    dyn = DensityGuidedODE(ld, q=torch.tensor([0.2, 0.8]), divergence=Hutchinson(1))
    dyn.reset(gen(31))
    with torch.no_grad():
        sol = odeint(dyn, z_T, schedule.time_grid(3), logp=schedule.prior_log_prob(z_T), begin_step=dyn.begin_step, fsal=False)
        images = ld.decode(sol.x)
    assert torch.isfinite(sol.logp).all() and sol.logp_path.shape == (4, 2)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_added_cond_kwargs_and_unknown_conditioning(latent_parts):
    unet, sched, _ = latent_parts
    model = from_diffusers(unet, sched)
    z = torch.randn(1, 4, 8, 8, generator=gen(23))
    with pytest.raises(TypeError, match="no conditioning 'prompt'"):
        model.score(z, 10.0, encoder_hidden_states=torch.zeros(1, 5, 12), prompt="a cat")
    # per-call conditioning with a leading dimension of 1 is shared by the batch
    z2, emb = torch.randn(2, 4, 8, 8, generator=gen(27)), torch.randn(1, 5, 12, generator=gen(28))
    with torch.no_grad():
        torch.testing.assert_close(
            model.score(z2, 10.0, encoder_hidden_states=emb), model.score(z2, 10.0, encoder_hidden_states=emb.expand(2, -1, -1))
        )
    res = dd.log_likelihood(model, z2, steps=1, probes=2, model_kwargs={"encoder_hidden_states": emb})
    assert torch.isfinite(res.logp).all()
    assert model._network_kwargs({"time_ids": 1, "encoder_hidden_states": 2}) == {
        "encoder_hidden_states": 2,
        "added_cond_kwargs": {"time_ids": 1},
    }


# ------------------------------------------------------------------------------------
# offline loading
# ------------------------------------------------------------------------------------
def test_pipeline_directory_roundtrip(unet, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    original = from_diffusers(unet, sched)
    x = torch.randn(2, 3, 8, 8, generator=gen(24))
    t = torch.tensor([3.5, 420.0], dtype=F64)
    for loaded in (from_diffusers_pretrained(tmp_path), from_diffusers(str(tmp_path))):
        assert isinstance(loaded, DiffusersScoreModel) and loaded.parametrization == "v"
        assert not any(p.requires_grad for p in loaded.network.parameters())
        torch.testing.assert_close(loaded.schedule.alphas_cumprod, original.schedule.alphas_cumprod, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(loaded.score(x, t), original.score(x, t), rtol=0, atol=0)
    # the same from a pipeline object and from a bare model folder with its scheduler beside it
    same = from_diffusers(diffusers.DDPMPipeline(unet=unet, scheduler=sched))
    assert same.network is unet
    unet.save_pretrained(tmp_path / "bare")
    sched.save_pretrained(tmp_path / "bare")
    assert isinstance(from_diffusers_pretrained(tmp_path / "bare"), DiffusersScoreModel)
    with pytest.raises(FileNotFoundError):
        from_diffusers_pretrained(tmp_path / "missing")


def test_latent_directory_roundtrip(latent_parts, tmp_path):
    unet, sched, vae = latent_parts
    for name, part in (("unet", unet), ("scheduler", sched), ("vae", vae)):
        part.save_pretrained(tmp_path / name)
    emb, neg = torch.randn(1, 5, 12, generator=gen(25)), torch.zeros(1, 5, 12)
    guidance = dict(guidance_scale=2.0, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg})
    loaded = from_diffusers_pretrained(tmp_path, **guidance)
    original = from_diffusers(unet, sched, vae=vae, **guidance)
    assert isinstance(loaded, LatentDiffusion)
    z = torch.randn(1, 4, 8, 8, generator=gen(26))
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(z, 250.0), original.score(z, 250.0), rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(z), original.decode(z), rtol=0, atol=0)
    assert isinstance(from_diffusers_pretrained(tmp_path, load_vae=False), DiffusersScoreModel)


# ------------------------------------------------------------------------------------
# errors and laziness
# ------------------------------------------------------------------------------------
def test_argument_errors(unet):
    with pytest.raises(TypeError, match="unsupported scheduler"):
        from_diffusers(unet, diffusers.ScoreSdeVeScheduler())
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(unet, diffusers.DDPMScheduler(), prediction_type="noise")
    with pytest.raises(TypeError, match="needs the scheduler"):
        from_diffusers(unet)
    with pytest.raises(ValueError, match="together"):
        from_diffusers(unet, diffusers.DDPMScheduler(), guidance_scale=3.0)
    with pytest.raises(ValueError, match="attention"):
        from_diffusers(unet, diffusers.DDPMScheduler(), attention="flash")
    with pytest.raises(ValueError, match="flow-matching"):
        from_diffusers(unet, diffusers.DDPMScheduler(), timestep_scale=1.0)
    # a config dict works as well as a scheduler instance
    model = from_diffusers(unet, dict(diffusers.DDIMScheduler(prediction_type="sample").config))
    assert model.parametrization == "x0" and isinstance(model.schedule, DiscreteVP)


def test_importing_diffdensity_does_not_import_diffusers():
    code = "import sys, diffdensity, diffdensity.integrations; assert 'diffusers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------
# safe loading, device and dtype
# ------------------------------------------------------------------------------------
def test_folders_without_safetensors_are_refused_without_unpickling(unet, tmp_path, monkeypatch):
    sched = diffusers.DDPMScheduler()
    unet.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    sched.save_pretrained(tmp_path / "pickled")
    assert list((tmp_path / "pickled").glob("*.bin")) and not list((tmp_path / "pickled").glob("*.safetensors"))

    def forbidden(*args, **kwargs):
        raise AssertionError("pickled weights must never be loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    for load in (from_diffusers_pretrained, from_diffusers):
        with pytest.raises(ValueError, match=r"no \.safetensors weights.*diffusion_pytorch_model\.bin"):
            load(str(tmp_path / "pickled"))


@pytest.mark.parametrize("where, name", [("config.json", "DDPMPipeline"), ("config.json", "ControlNetModel"),
                                         ("scheduler_config.json", "CMStochasticIterativeScheduler")])  # fmt: skip
def test_only_allow_listed_classes_are_built_from_a_folder(unet, tmp_path, where, name):
    import json

    unet.save_pretrained(tmp_path / "m")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / where).read_text())
    cfg["_class_name"] = name
    (tmp_path / "m" / where).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not allowed"):
        from_diffusers_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="not allowed"):  # a config dict naming a class is held to the same list
        from_diffusers(unet, {"_class_name": "os.system", "beta_schedule": "linear"})


def test_loading_from_a_path_does_not_go_through_from_diffusers_pretrained(unet, tmp_path, monkeypatch):
    from diffdensity.integrations.diffusers import wrap

    unet.save_pretrained(tmp_path / "m")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "m")
    direct = from_diffusers(str(tmp_path / "m"))
    monkeypatch.setattr(wrap, "from_diffusers_pretrained", None)  # a call would fail
    again = from_diffusers(str(tmp_path / "m"))
    x = torch.randn(1, 3, 8, 8, generator=gen(30))
    with torch.no_grad():
        torch.testing.assert_close(again.score(x, 10.0), direct.score(x, 10.0), rtol=0, atol=0)


def test_model_declares_its_networks_device_and_dtype():
    net = tiny_unet(attention=False).to(F64)
    model = from_diffusers(net, diffusers.DDPMScheduler())
    assert model.dtype == F64 and model.device == torch.device("cpu")
    x = dd.sample(model, 2, steps=2, generator=gen(31)).x
    assert x.dtype == F64
