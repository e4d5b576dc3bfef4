"""PF-ODE log-likelihoods side by side with the peers, on exact mixtures in D = 3072 and the bundled U-Net.

Peers, installed for this benchmark only (never runtime dependencies):

    .venv/bin/pip install --no-deps k-diffusion==0.1.1.post1 flow_matching==1.0.10 \\
        torchdiffeq==0.2.5 torchsde==0.2.6 trampoline einops

(also in benchmarks/requirements-peers.txt). Only ``k_diffusion.sampling`` is loaded,
without running the package ``__init__`` (it pulls in a training stack); its one helper
from ``k_diffusion.utils`` (``append_dims``) is provided here.

Problems (VP schedule, logSNR in [-10, 10], Haar-rotated so every Jacobian is dense;
each estimator against the exact log-density it estimates):

* ``component``: 10 isotropic components, scales log-spaced over 0.05..1;
* ``hard``: 6 components, scales log-spaced over 0.03..0.7, with per-dimension jitter
  (a factor log-uniform in [0.8, 1.25]);
* ``anisotropic``: 10 components with their own diagonal stds, log-uniform over 0.05..1
  per dimension (the hard case for Hutchinson's estimator).

Rows: k-diffusion's ``log_likelihood`` (dopri5, rtol = atol = 1e-4, one Rademacher probe
fixed over the solve), flow_matching's ``ODESolver.compute_likelihood`` (dopri5, same
tolerances, one fixed probe), ``dd.log_likelihood(model, x)`` with no options, and the
default at forced forward / reverse AD mode. Printed: network passes per sample, MAE,
bias, the mean reported standard error, wall time and the ratios (wall, process CPU,
MAE) to k-diffusion.

``--unet``: the bundled U-Net on held-out patches, seconds per image and the spread over
probe seeds of our default and of a k-diffusion-style dopri5 with one fixed probe, a
reference from RK4 with 48 steps and 32 probes per stage on a few patches, and the time
of both AD modes with the mode ``"auto"`` chose.

    python benchmarks/likelihood.py                       # peers on component and hard, 16 points
    python benchmarks/likelihood.py --problems anisotropic
    python benchmarks/likelihood.py --choices             # the settings behind the defaults (oracle rows: exact Laplacian)
    python benchmarks/likelihood.py --unet                # the bundled U-Net (patches16)
    python benchmarks/likelihood.py --memory              # peak memory of one exact divergence in D = 3072
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import subprocess
import sys
import time
import types

import torch

import diffdensity as dd
from diffdensity.divergence import DivergenceEstimator

DIM = 3 * 32 * 32
_CACHE: dict[str, dd.GaussianMixture] = {}


def mixture(kind: str, seed: int = 0) -> dd.GaussianMixture:
    """The benchmark's mixtures, built once per process (the Haar rotation takes seconds)."""
    if kind in _CACHE:
        return _CACHE[kind]
    g = torch.Generator().manual_seed(seed)
    rotation = dd.random_rotation(DIM, generator=g)
    k = 6 if kind == "hard" else 10
    means = torch.randn(k, DIM, generator=g, dtype=torch.float64)
    if kind == "component":
        stds = torch.exp(torch.linspace(math.log(0.05), 0.0, k, dtype=torch.float64))
    elif kind == "hard":
        base = torch.exp(torch.linspace(math.log(0.03), math.log(0.7), k, dtype=torch.float64))
        jitter = torch.empty(k, DIM, dtype=torch.float64).uniform_(math.log(0.8), math.log(1.25), generator=g)
        stds = base[:, None] * jitter.exp()
    else:
        stds = torch.exp(torch.empty(k, DIM, dtype=torch.float64).uniform_(math.log(0.05), 0.0, generator=g))
    _CACHE[kind] = dd.GaussianMixture(means, stds, schedule=dd.VP(), rotation=rotation)
    return _CACHE[kind]


def k_diffusion_sampling():
    """``k_diffusion.sampling`` without the package ``__init__`` (and its training stack)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise SystemExit("k-diffusion is not installed: see benchmarks/requirements-peers.txt")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules.setdefault("k_diffusion", pkg)
    sys.modules.setdefault("k_diffusion.utils", utils)
    return importlib.import_module("k_diffusion.sampling")


class Denoiser:
    """A VP score model as k-diffusion's denoiser ``D(y, sigma)`` in the VE frame ``y = x / alpha``."""

    def __init__(self, model):
        self.model, self.sched = model, model.schedule
        self.calls = 0

    def __call__(self, y, sigma):
        self.calls += 1
        lam = -2 * torch.log(sigma.to(torch.float64))
        # torchdiffeq's initial step-size probe may step past sigma_max: clamp to the schedule
        t = self.sched.t_from_log_snr(lam).clamp(self.sched.t_min, self.sched.t_max)
        alpha = torch.sigmoid(lam).sqrt().to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
        return y + (sigma.reshape(alpha.shape) ** 2) * alpha * self.model.score(alpha * y, t)


def run_k_diffusion(model, x):
    """k-diffusion's estimate of log p_{t_min}(x) in the VP frame, and its score evaluations."""
    ks = k_diffusion_sampling()
    sched = model.schedule
    lam = sched.log_snr(torch.tensor([sched.t_min, sched.t_max], dtype=torch.float64))
    s_min, s_max = float(torch.exp(-lam[0] / 2)), float(torch.exp(-lam[1] / 2))
    a_min = float(torch.sigmoid(lam[0]).sqrt())
    den = Denoiser(model)
    ll, info = ks.log_likelihood(den, x / a_min, s_min, s_max, atol=1e-4, rtol=1e-4)
    dim = math.prod(x.shape[1:])
    return ll.to(torch.float64) - dim * math.log(a_min), info["fevals"]


def run_flow_matching(model, x, prior):
    """flow_matching's ``compute_likelihood`` on the PF-ODE in its time s = 1 - t (s = 1: data)."""
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    sched = model.schedule
    calls = [0]

    class Velocity(ModelWrapper):
        def forward(self, x, t, **extras):
            calls[0] += 1
            tt = (1 - t.to(torch.float64)).clamp(sched.t_min, sched.t_max).reshape(()).expand(x.shape[0])
            sv = sched(tt[:1])
            return -(sv.f.to(x.dtype) * x - 0.5 * sv.g2.to(x.dtype) * model.score(x, tt))

    solver = ODESolver(velocity_model=Velocity(torch.nn.Identity()))
    grid = torch.tensor([1.0, 0.0], dtype=x.dtype)
    torch.manual_seed(3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)  # its probe is built in the default dtype
    try:
        _, logp = solver.compute_likelihood(x, prior, step_size=None, method="dopri5", atol=1e-4, rtol=1e-4, time_grid=grid)
    finally:
        torch.set_default_dtype(default)
    return logp.to(torch.float64), calls[0]


def timed(fn):
    """``(fn(), wall seconds)``; the CPU seconds of this process go to ``timed.cpu``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    timed.cpu = time.process_time() - c0
    return out, time.perf_counter() - t0


def problem(kind: str, n: int):
    """The mixture, ``n`` data points (seed 1), their exact log p_0 and the exact prior log p_T."""
    gmm = mixture(kind)
    x = gmm.sample(n, generator=torch.Generator().manual_seed(1))
    return gmm, x, gmm.log_prob(x, gmm.schedule.t_min), lambda z: gmm.log_prob(z, gmm.schedule.t_max)


def peers(kind: str, n: int) -> None:
    gmm, x, exact, prior = problem(kind, n)
    print(f"\n== {kind} mixture, D={DIM}, {n} points; exact mean log p_0 = {exact.mean():.1f} nats")
    print(f"{'estimator':<44} {'passes/sample':>22} {'MAE':>7} {'bias':>7} {'mean se':>8} {'wall s':>7} {'wall/kd':>8} {'cpu/kd':>7} {'MAE/kd':>7}")
    rows = []
    torch.manual_seed(2)
    (kd, fevals), dt = timed(lambda: run_k_diffusion(gmm, x))
    rows.append(("k-diffusion log_likelihood (dopri5 1e-4)", f"{fevals} score + VJP", kd, None, dt, timed.cpu))
    (fm, calls), dt = timed(lambda: run_flow_matching(gmm, x, prior))
    rows.append(("flow_matching compute_likelihood (dopri5)", f"{calls} score + VJP", fm, None, dt, timed.cpu))
    for label, div in (("dd.log_likelihood(model, x) [default]", "hutchinson"),
                       ("  same, mode='forward'", dd.Hutchinson(2, resample="call", mode="forward")),
                       ("  same, mode='reverse'", dd.Hutchinson(2, resample="call", mode="reverse"))):
        r, dt = timed(lambda: dd.log_likelihood(gmm, x, divergence=div, prior_logp=prior, generator=torch.Generator().manual_seed(4)))
        passes = f"{r.settings['primal_passes']} fwd + {r.nfe.jvp + r.nfe.vjp} {r.settings['ad_mode'][:3]}"
        rows.append((label, passes, r.logp, r.stderr, dt, timed.cpu))
    kd_mae, kd_dt, kd_cpu = float((kd - exact).abs().mean()), rows[0][4], rows[0][5]
    for label, passes, est, se, dt, cpu in rows:
        err = est - exact
        mae = float(err.abs().mean())
        se_s = "-" if se is None else f"{float(se.mean()):.2f}"
        print(f"{label:<44} {passes:>22} {mae:>7.2f} {float(err.mean()):>7.2f} {se_s:>8} {dt:>7.1f} {dt / kd_dt:>8.2f} {cpu / kd_cpu:>7.2f} {mae / kd_mae:>7.2f}", flush=True)


class Oracle(DivergenceEstimator):
    """The mixture's closed-form Laplacian (diagnostic: isolates the solver's error)."""

    def __init__(self, gmm: dd.GaussianMixture):
        super().__init__("reverse")
        self.gmm = gmm

    def __call__(self, fn, x, nfe=None):
        if nfe is not None:
            nfe.forward += 1
        return fn(x), self.gmm.laplacian(x, fn.t)


CHOICES = [
    # label, options of dd.log_likelihood (divergence "oracle": the closed form)
    ("oracle, heun 64 (the former default's grid)", dict(solver="heun", steps=64, divergence="oracle")),
    ("oracle, rk4 16", dict(solver="rk4", steps=16, divergence="oracle")),
    ("oracle, rk4 24", dict(solver="rk4", steps=24, divergence="oracle")),
    ("oracle, bosh3 rtol 1e-3, control on x", dict(solver="bosh3", rtol=1e-3, atol=1e-3, divergence="oracle")),
    ("former default: heun 64, 1 probe per step", dict(solver="heun", steps=64, divergence=lambda: dd.Hutchinson(1, resample="step"))),
    ("rk4 24, 1 probe per stage", dict(probes=1)),
    ("rk4 24, 2 probes per stage [default]", dict()),
    ("rk4 24, 2 probes per step (stages share)", dict(divergence=lambda: dd.Hutchinson(2, resample="step"))),
]


def choices(kind: str, n: int) -> None:
    """The evidence for the defaults: discretisation alone (oracle) and with Hutchinson's noise."""
    gmm, x, exact, prior = problem(kind, n)
    print(f"\n== settings on the {kind} mixture, D={DIM}, {n} points")
    print(f"{'setting':<46} {'evaluations':>11} {'MAE':>7} {'bias':>7} {'std':>7} {'mean se':>8} {'wall s':>7}")
    for label, opts in CHOICES:
        opts = dict(opts)
        div = opts.pop("divergence", "hutchinson")
        div = Oracle(gmm) if div == "oracle" else (div() if callable(div) else div)
        r, dt = timed(lambda: dd.log_likelihood(gmm, x, divergence=div, prior_logp=prior, generator=torch.Generator().manual_seed(4), **opts))
        err = r.logp - exact
        se = "-" if r.stderr is None else f"{float(r.stderr.mean()):.2f}"
        evals = r.nfe.forward + r.settings["primal_passes"]  # network evaluations (primal passes)
        print(f"{label:<46} {evals:>11d} {float(err.abs().mean()):>7.2f} {float(err.mean()):>7.2f} {float(err.std()):>7.2f} {se:>8} {dt:>7.1f}", flush=True)


def unet(n: int, seeds: int, ref_n: int) -> None:
    """The bundled U-Net on held-out-like patches: seconds per image and per-sample spread over probe seeds."""
    model = dd.load_pretrained("patches16")
    x = _patches(model, n)
    print(f"\n== bundled U-Net patches16, D={math.prod(model.event_shape)}, {n} patches, {seeds} probe seeds")
    modes = {}
    for mode in ("forward", "reverse"):
        est = dd.Hutchinson(2, resample="call", mode=mode)
        _, dt = timed(lambda: dd.log_likelihood(model, x, divergence=est, steps=4, generator=torch.Generator().manual_seed(1)))
        modes[mode] = dt
    auto = dd.log_likelihood(model, x, steps=4, generator=torch.Generator().manual_seed(1))
    print(f"AD modes, default estimator, 4 RK4 steps: forward {modes['forward']:.1f} s, reverse {modes['reverse']:.1f} s; "
          f"auto resolved to {auto.settings['ad_mode']} (measured per product: {auto.settings['ad_timings']})")
    settings = (("default dd.log_likelihood(model, x)", {}),
                ("default with pixel probes (before)", dict(divergence=dd.Hutchinson(2, basis="pixel"))),
                ("k-diffusion style: dopri5 1e-4, 1 fixed probe", dict(solver="dopri5", rtol=1e-4, atol=1e-4, divergence=dd.Hutchinson(1, resample="solve", basis="pixel"))))
    results = {}
    for label, opts in settings:
        runs, total = [], 0.0
        for s in range(seeds):
            r, dt = timed(lambda: dd.log_likelihood(model, x, generator=torch.Generator().manual_seed(10 + s), **opts))
            runs.append(r)
            total += dt
        logp = torch.stack([r.logp for r in runs])
        results[label] = logp.mean(0)
        se = runs[0].stderr
        print(f"{label:<48} {total / (seeds * n):6.2f} s/image, spread over seeds {float(logp.std(0).mean()):6.2f} nats"
              + ("" if se is None else f", reported se {float(se.mean()):.2f}")
              + f", passes/sample {runs[0].nfe.total}", flush=True)
    if ref_n:
        # one exact divergence of this U-Net costs ~13 s per patch on a 2-core CPU: the
        # reference uses 32 fresh probes per stage instead, and reports its own stderr
        ref_est = dd.Hutchinson(32, resample="call", mode="reverse")
        ref, dt = timed(lambda: dd.log_likelihood(model, x[:ref_n], steps=48, divergence=ref_est, generator=torch.Generator().manual_seed(99)))
        print(f"reference: rk4 48 steps, 32 probes per stage, {ref_n} patches, {dt:.0f} s, stderr {float(ref.stderr.mean()):.2f} nats")
        for label, mean in results.items():
            print(f"  {label}: mean over seeds vs reference, mean |difference| {float((mean[:ref_n] - ref.logp).abs().mean()):.2f} nats")


def _patches(model, n: int) -> torch.Tensor:
    """``n`` held-out patches of the bundled model's data (seeded choice), dequantised to [-1, 1]."""
    from diffdensity.bundled import data

    u8 = data.patches("heldout")
    pick = torch.randperm(u8.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    return dd.likelihood.dequantize(u8[pick].to(torch.float64)).to(torch.float32)


def memory_probe() -> None:
    """Run in a fresh process: one exact divergence in D = 3072 and its peak memory."""
    gmm = mixture("anisotropic")
    x = gmm.sample(1, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.5], dtype=torch.float64)
    from diffdensity.divergence import model_fn

    before = _vm_hwm()
    t0 = time.perf_counter()
    _, div = dd.Exact()(model_fn(gmm, t), x)
    dt = time.perf_counter() - t0
    peak = _vm_hwm()
    ref = gmm.laplacian(x, t)
    rel = float((div - ref).abs() / ref.abs())
    print(f"exact divergence, D={DIM}, B=1: {float(div):.6f} vs closed form {float(ref):.6f} (relative error {rel:.1e}); "
          f"{dt:.1f} s; peak resident memory {peak / 2**20:.0f} MiB ({(peak - before) / 2**20:.0f} MiB above start)")


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="points per problem / patches")
    p.add_argument("--problems", nargs="+", default=["component", "hard"], choices=["component", "hard", "anisotropic"])
    p.add_argument("--unet", action="store_true", help="only the bundled U-Net section")
    p.add_argument("--choices", action="store_true", help="only the solver / probe settings behind the defaults")
    p.add_argument("--seeds", type=int, default=4, help="probe seeds per setting on the U-Net")
    p.add_argument("--ref", type=int, default=4, help="patches with a many-step, many-probe reference on the U-Net (0: none)")
    p.add_argument("--memory", action="store_true", help="only the exact-divergence memory probe")
    p.add_argument("--_memory_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a._memory_child:
        memory_probe()
        return
    if a.memory:
        subprocess.run([sys.executable, __file__, "--_memory_child"], check=True)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    if a.unet:
        unet(a.n, a.seeds, a.ref)
        return
    if a.choices:
        for kind in a.problems:
            choices(kind, a.n)
        return
    for kind in a.problems:
        peers(kind, a.n)


if __name__ == "__main__":
    main()
