"""Log-density tracking while sampling: accuracy, cost, and the high-density sampler.

Side by side in one run:

1. **Tracking error** on a rotated 10-component Gaussian mixture in D = 3072 (means
   N(0, 1), per-axis stds log-uniform in e^-3..1, VP schedule with logSNR in [-10, 10]):
   for every method of ``dd.sample`` the mean and worst |tracked - exact log p_0| of the
   final samples, the mean signed error (bias), network passes per sample and wall
   time. The exact ``log p_{t_max}`` starts the tracking, so only the integrator (and
   Hutchinson's noise) is measured. Euler-Maruyama is the reference for the stochastic
   samplers; ``tweedie`` is the Bayes-rule scheme of ``diffdensity.sde``.
2. **Wall-time ratios**, interleaved repeats, best of each: ``sde`` with / without
   tracking and ``pf-ode`` with (1 Hutchinson probe, forward- or reverse-mode) /
   without, on a small convolutional eps-network for 3x32x32 images; ``sde`` also on
   the mixture.
4. **Consistency on the bundled model** (``patches16``, D = 768, a learned v-prediction
   U-Net): for every method at 32 steps and at most 64 network passes per sample,
   tracked log p against re-encoding the very same samples with ``log_likelihood``
   (128 Heun steps, 4 probes): median and max |tracked - re-encoded| per method, the
   integrators of this release (exponential Heun for ODE phases, ``tweedie-jvp`` for the
   reverse SDE) beside the previous ones (Heun, ``tweedie``).
5. **Where the gap comes from**: the same comparison at every step of the sampler,
   re-encoding each intermediate state ``x_{t_i}`` from ``t_i`` up to ``t_max``
   (one stacked PF-ODE on a grid twice as fine as the sampler's), drawn along logSNR
   in ``docs/figures/tracking_gap_steps.png``.
3. **High-density sampler** on a 32x32 "cartoon" mixture (smooth shapes as means, a
   1/f texture spectrum in the DCT basis as covariance, D = 1024): exact mean log p_0
   and per-sample variance across pixels as the logSNR threshold goes 8 -> 2, and the
   figure ``docs/figures/hd_threshold.png``.
6. **Target mode on the bundled model**: density guidance shooting for log p_0 targets
   500 .. 4500 nats, steered by the tracked value and by re-encoding each pass
   (``target_measure="reencoded"``), each against the reference re-encoding.

    python benchmarks/tracking.py              # everything
    python benchmarks/tracking.py --quick      # 256-step rows only, shorter timings
    python benchmarks/tracking.py --only hd    # one section: errors | timing | hd | model | steps | target
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import diffdensity as dd
from diffdensity.divergence import Hutchinson
from diffdensity.sampling import sample

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def reference_mixture(dim: int = 3072, k: int = 10, seed: int = 0) -> dd.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    rotation = dd.random_rotation(dim, generator=g)
    means = torch.randn(k, dim, generator=g, dtype=F64)
    stds = torch.exp(torch.empty(k, dim, dtype=F64).uniform_(-3.0, 0.0, generator=g))
    return dd.GaussianMixture(means, stds, schedule=dd.VP(), rotation=rotation)


def scaled_drift(schedule, k: float):
    """``u = f x - k g^2 s / 2``."""

    def drift(x, t, s):
        sv = schedule(t)
        view = (-1,) + (1,) * (x.ndim - 1)
        return sv.f.to(x.dtype).reshape(view) * x - 0.5 * k * sv.g2.to(x.dtype).reshape(view) * s

    return drift


def gamma_diffusion(schedule, gamma: float):
    return lambda x, t: gamma * schedule(t).g2.sqrt()


# -- 1. tracking error -------------------------------------------------------------------


def error_rows(gmm: dd.GaussianMixture, quick: bool) -> list[tuple[str, dict]]:
    sched = gmm.schedule
    rows = []
    for steps in (256,) if quick else (256, 1024):
        rows.append((f"sde  euler-maruyama  {steps}", dict(method="sde", solver="euler-maruyama", steps=steps)))
        if steps == 256:
            rows.append((f"sde  ancestral       {steps}", dict(method="sde", solver="ancestral", steps=steps)))
        rows.append((f"sde  tweedie         {steps}", dict(method="sde", solver="tweedie", steps=steps)))
    rows += [(f"sde  tweedie         {s}", dict(method="sde", solver="tweedie", steps=s)) for s in (64, 128)]
    rows += [(f"sde  tweedie-jvp     {s}", dict(method="sde", solver="tweedie-jvp", steps=s)) for s in (32, 64, 256)]
    rows += [
        ("pf-ode  heun 64, 1 probe", dict(method="pf-ode", solver="heun", steps=64)),
        ("pf-ode  exp-heun 64, 1 probe", dict(method="pf-ode", solver="exp-heun", steps=64)),
        ("pf-ode  exp-heun 32, 1 probe", dict(method="pf-ode", solver="exp-heun", steps=32)),
        ("pf-ode  exp-heun 64, tapered", dict(method="pf-ode", solver="exp-heun", steps=64, grid="tapered")),
        ("pf-ode  exp-heun 32, tapered", dict(method="pf-ode", solver="exp-heun", steps=32, grid="tapered")),
        ("pf-ode  exp-2m 63, 1 probe", dict(method="pf-ode", solver="exp-2m", steps=63)),
        ("sde  tweedie-jvp 32, tapered", dict(method="sde", solver="tweedie-jvp", steps=32, grid="tapered")),
        ("hd (thr 2)  heun 64, 1 probe", dict(method="hd", log_snr_threshold=2.0, steps=64)),
        ("hd (thr 2, sde start)  64/tweedie", dict(method="hd", log_snr_threshold=2.0, start="sde", steps=64)),
        ("custom ODE (k=1.5)  heun 64", dict(method="custom", drift=scaled_drift(sched, 1.5), steps=64)),
        ("custom SDE (gamma=.5)  EM 128", dict(method="custom", drift=scaled_drift(sched, 1.25), diffusion=gamma_diffusion(sched, 0.5), steps=128)),
    ]
    if quick:
        rows = [r for r in rows if "sde start" not in r[0]]
    return rows


def section_errors(n: int, quick: bool) -> None:
    t0 = time.perf_counter()
    gmm = reference_mixture()
    sched = gmm.schedule
    print(f"1. Tracking error, {gmm!r}, {n} samples (built in {time.perf_counter() - t0:.0f} s)")
    print(f"   {'method':<36} {'mean |err|':>10} {'max |err|':>10} {'bias':>9} {'NFE per sample':>26} {'time s':>7}")
    prior = lambda z: gmm.log_prob(z, sched.t_max)  # noqa: E731
    results = {}
    for name, opts in error_rows(gmm, quick):
        t0 = time.perf_counter()
        r = sample(gmm, n, generator=torch.Generator().manual_seed(1), dtype=F64, prior_logp=prior, **opts)
        dt = time.perf_counter() - t0
        err = r.logp - gmm.log_prob(r.x, sched.t_min)
        results[name] = float(err.abs().mean())
        print(f"   {name:<36} {float(err.abs().mean()):>10.2f} {float(err.abs().max()):>10.2f} {float(err.mean()):>+9.2f} {str(r.nfe):>26} {dt:>7.1f}", flush=True)
    for steps in (256,) if quick else (256, 1024):
        em, tw = results[f"sde  euler-maruyama  {steps}"], results[f"sde  tweedie         {steps}"]
        print(f"   {steps} steps, equal network passes: Euler-Maruyama / tweedie = {em / tw:.1f}x", end="")
        print(f", Euler-Maruyama / ancestral = {em / results['sde  ancestral       256']:.1f}x" if steps == 256 else "")
    print()


# -- 2. wall-time ratios ------------------------------------------------------------------


class SmallUNetish(torch.nn.Module):
    """A few convolutions at 32x32 and 16x16 with a time embedding (eps-prediction)."""

    def __init__(self, ch: int = 64):
        super().__init__()
        self.inp = torch.nn.Conv2d(3, ch, 3, padding=1)
        self.emb = torch.nn.Linear(16, ch)
        self.down = torch.nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.mid = torch.nn.Conv2d(ch, ch, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)
        self.out = torch.nn.Conv2d(2 * ch, 3, 3, padding=1)

    def forward(self, x, t):
        freqs = torch.exp(torch.linspace(0, 4, 8, device=x.device, dtype=x.dtype))
        e = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
        h = torch.nn.functional.silu(self.inp(x) + self.emb(e)[:, :, None, None])
        d = torch.nn.functional.silu(self.down(h))
        d = torch.nn.functional.silu(self.mid(d))
        u = self.up(d)
        return self.out(torch.cat([h, u], 1))


def interleaved(fns: dict, repeats: int) -> dict:
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def section_timing(quick: bool) -> None:
    print("2. Wall-time ratios (best of interleaved repeats)")
    torch.manual_seed(0)
    net = SmallUNetish().eval()
    model = dd.ScoreModel(net, dd.VP(), "eps", event_shape=(3, 32, 32))
    repeats = 2 if quick else 3
    steps = 32 if quick else 64
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    common = dict(steps=steps, dtype=torch.float32)
    reverse = Hutchinson(1, mode="reverse")
    t = interleaved(
        {
            "sde": lambda: sample(model, 16, method="sde", generator=g(), track_logp=False, **common),
            "sde+logp": lambda: sample(model, 16, method="sde", generator=g(), **common),
            "pf": lambda: sample(model, 16, generator=g(), track_logp=False, **common),
            "pf+logp": lambda: sample(model, 16, generator=g(), **common),
            "pf+logp (vjp)": lambda: sample(model, 16, generator=g(), divergence=reverse, **common),
        },
        repeats,
    )
    print(f"   conv net 3x32x32, n=16, {steps} steps:")
    print(f"     sde {t['sde']:.2f} s, with tracking {t['sde+logp']:.2f} s -> ratio {t['sde+logp'] / t['sde']:.3f}")
    print(f"     pf-ode {t['pf']:.2f} s, with tracking (1 probe, forward-mode JVP) {t['pf+logp']:.2f} s -> ratio {t['pf+logp'] / t['pf']:.2f}; "
          f"(reverse-mode VJP) {t['pf+logp (vjp)']:.2f} s -> ratio {t['pf+logp (vjp)'] / t['pf']:.2f}", flush=True)  # fmt: skip
    gmm = reference_mixture()
    t = interleaved(
        {
            "sde": lambda: sample(gmm, 8, method="sde", generator=g(), track_logp=False, steps=steps, dtype=F64),
            "sde+logp": lambda: sample(gmm, 8, method="sde", generator=g(), steps=steps, dtype=F64),
        },
        repeats,
    )
    print(f"   mixture D=3072, n=8, {steps} steps: sde {t['sde']:.2f} s, with tracking {t['sde+logp']:.2f} s -> ratio {t['sde+logp'] / t['sde']:.3f}\n", flush=True)


# -- 3. high-density sampling ---------------------------------------------------------------


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix, rows are frequencies."""
    k = torch.arange(n, dtype=F64)[:, None]
    i = torch.arange(n, dtype=F64)[None, :]
    c = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c


def cartoon_mixture(size: int = 32, k: int = 6, seed: int = 0) -> dd.GaussianMixture:
    """Smooth shapes (discs and bars) as means, 1/f textures in the 2-D DCT basis as covariance."""
    g = torch.Generator().manual_seed(seed)
    c = dct_matrix(size)
    basis = torch.kron(c, c).T  # columns: 2-D DCT basis images (orthogonal)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, dtype=F64), torch.linspace(-1, 1, size, dtype=F64), indexing="ij")
    means = []
    for j in range(k):
        cx, cy = (torch.rand(2, generator=g, dtype=F64) * 1.0 - 0.5).tolist()
        r = 0.25 + 0.3 * float(torch.rand((), generator=g, dtype=F64))
        if j % 2 == 0:
            shape = torch.sigmoid((r - ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()) * 25)
        else:
            shape = torch.sigmoid((r - torch.maximum((xx - cx).abs() * 0.5, (yy - cy).abs() * 1.6)) * 25)
        background = 0.3 * torch.sin(2.0 * xx + 6 * float(torch.rand((), generator=g)))
        means.append((1.2 * shape - 0.6 + background).flatten())
    fu = torch.arange(size, dtype=F64)
    radius = (fu[:, None] ** 2 + fu[None, :] ** 2).sqrt().flatten()  # frequency of each basis image
    spectrum = 2.0 / (1 + radius)  # 1/f: fine detail has small variance
    stds = torch.stack([spectrum * (0.7 + 0.6 * float(torch.rand((), generator=g))) for _ in range(k)])
    return dd.GaussianMixture(torch.stack(means).reshape(k, 1, size, size), stds.reshape(k, 1, size, size), schedule=dd.VP(), rotation=basis)


def section_hd(n: int, figure: Path | None) -> None:
    gmm = cartoon_mixture()
    sched = gmm.schedule
    steps = 64
    print(f"3. High-density sampler on a 32x32 cartoon mixture (D = 1024), {n} latents, heun {steps} steps")
    x_T = sched.prior_sample((n, *gmm.event_shape), generator=torch.Generator().manual_seed(3), dtype=F64)
    prior = lambda z: gmm.log_prob(z, sched.t_max)  # noqa: E731
    runs = [("PF-ODE", dict(method="pf-ode"))] + [(f"HD thr {thr:g}", dict(method="hd", log_snr_threshold=float(thr))) for thr in (8, 6, 4, 2)]
    print(f"   {'sampler':<12} {'exact mean log p0':>18} {'tracked - exact':>16} {'pixel variance':>15} {'NFE':>22}")
    out = []
    for name, opts in runs:
        r = sample(gmm, x_T=x_T, steps=steps, generator=torch.Generator().manual_seed(1), prior_logp=prior, **opts)
        ex = gmm.log_prob(r.x, sched.t_min)
        var = r.x.flatten(1).var(dim=1)
        out.append((name, r.x, ex, var))
        print(f"   {name:<12} {float(ex.mean()):>18.1f} {float((r.logp - ex).abs().mean()):>16.2f} {float(var.mean()):>15.4f} {str(r.nfe):>22}", flush=True)
    lps = [float(o[2].mean()) for o in out]
    vs = [float(o[3].mean()) for o in out]
    print(f"   mean log p0 strictly increasing as the threshold goes down: {all(b > a for a, b in zip(lps, lps[1:]))}; "
          f"pixel variance strictly decreasing: {all(b < a for a, b in zip(vs, vs[1:]))}")  # fmt: skip
    if figure is not None:
        plot_hd(figure, out, rows=min(4, n))
        print(f"   wrote {figure}")
    print()


def plot_hd(path: Path, out, rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(out)
    fig = plt.figure(figsize=(1.9 * cols + 2.8, 1.9 * rows + 0.4))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1] * cols + [1.6], wspace=0.08, hspace=0.25)
    for j, (name, x, ex, _) in enumerate(out):
        for i in range(rows):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(x[i, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"log p {float(ex[i]):.0f}", fontsize=7, labelpad=1)
            if i == 0:
                ax.set_title(name, fontsize=9)
    ax = fig.add_subplot(grid[:, cols])
    names = [o[0] for o in out]
    ax.plot(range(len(out)), [float(o[2].mean()) for o in out], "o-")
    ax.set_xticks(range(len(out)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("exact mean log p_0 [nats]", fontsize=8)
    ax.yaxis.set_label_position("right")
    ax.yaxis.tick_right()
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle("same latents: PF-ODE, then HD-ODE below a lower and lower logSNR threshold", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# -- 4. consistency on the bundled model ------------------------------------------------------

REENCODE = dict(steps=128, solver="heun", grid="log_snr", probes=4)  # pinned re-encoding settings
#: ``--reference fine``: a converged reference (within ~1.4 nats of 96 RK4 steps on patches16)
FINE_REENCODE = dict(steps=48, solver="rk4", grid="log_snr", probes=4)


def model_rows(schedule) -> list[tuple[str, dict]]:
    custom = dict(method="custom", drift=scaled_drift(schedule, 1.5))
    custom_sde = dict(method="custom", drift=scaled_drift(schedule, 1.25), diffusion=gamma_diffusion(schedule, 0.5))
    return [
        ("pf-ode", dict(method="pf-ode", solver="exp-heun")),
        ("pf-ode, uniform logSNR grid", dict(method="pf-ode", solver="exp-heun", grid="log_snr")),
        ("pf-ode, exp-2m 63 steps (64 passes)", dict(method="pf-ode", solver="exp-2m", steps=63)),
        ("pf-ode, uniform logSNR, pixel probes (before)", dict(method="pf-ode", solver="exp-heun", grid="log_snr", divergence=dd.Hutchinson(1, basis="pixel"))),
        ("sde", dict(method="sde")),
        ("sde 64 steps", dict(method="sde", steps=64)),
        ("sde 128 steps (over the budget)", dict(method="sde", steps=128)),
        ("sde, noise until logSNR 5, then pf-ode", dict(method="sde", noise_until=5.0)),
        ("sde, noise until logSNR 3, then pf-ode", dict(method="sde", noise_until=3.0)),
        ("sde, noise until logSNR 0, then pf-ode", dict(method="sde", noise_until=0.0)),
        ("density-guidance q=0.5", dict(method="density-guidance", q=0.5, solver="exp-heun")),
        ("density-guidance q=0.5, uniform logSNR grid", dict(method="density-guidance", q=0.5, solver="exp-heun", grid="log_snr")),
        ("density-guidance q=0.5, exp-2m 63 steps", dict(method="density-guidance", q=0.5, solver="exp-2m", steps=63)),
        ("density-guidance q=0.8", dict(method="density-guidance", q=0.8, solver="exp-heun")),
        ("hd (threshold 2)", dict(method="hd", log_snr_threshold=2.0, solver="exp-heun")),
        ("prior-guidance q=0.5", dict(method="prior-guidance", q=0.5, solver="exp-heun")),
        ("custom ODE (k=1.5)", dict(custom, solver="exp-heun")),
        ("stochastic-density-guidance", dict(method="stochastic-density-guidance", q=0.5, solver="split-heun")),
        ("stochastic-density-guidance split-exp-heun", dict(method="stochastic-density-guidance", q=0.5, solver="split-exp-heun")),
        ("stochastic-density-guidance split-exp-heun 24 steps", dict(method="stochastic-density-guidance", q=0.5, solver="split-exp-heun", steps=24)),
        ("stochastic-density-guidance 24 steps", dict(method="stochastic-density-guidance", q=0.5, solver="split-heun", steps=24)),
        ("stochastic-density-guidance (EM, before)", dict(method="stochastic-density-guidance", q=0.5, solver="euler-maruyama")),
        ("custom SDE (gamma=.5)", dict(custom_sde, solver="euler-maruyama")),
        ("pf-ode (heun, before)", dict(method="pf-ode", solver="heun")),
        ("sde (tweedie, before)", dict(method="sde", solver="tweedie")),
        ("density-guidance q=0.5 (heun, before)", dict(method="density-guidance", q=0.5, solver="heun")),
    ]


def section_model(n: int, only: str, seeds: int = 1, reencode: dict = REENCODE) -> None:
    """``only``: comma-separated parts of row names (empty: every row); ``seeds``: every latent this many times, each with its own probes and noise."""
    model = dd.load_pretrained("patches16")
    sched = model.schedule
    steps = 32
    print(f"4. Tracked vs re-encoded log p on the bundled model patches16 (D = 768), {n} latents x {seeds} seeds, {steps} steps; "
          f"re-encoding {reencode}")  # fmt: skip
    x_T = sched.prior_sample((n, *model.event_shape), generator=torch.Generator().manual_seed(5)).repeat(seeds, 1, 1, 1)
    n *= seeds
    runs = []
    for name, opts in model_rows(sched):
        if only and not any(part in name for part in only.split(",")):
            continue
        t0 = time.perf_counter()
        opts = {"steps": steps, **opts}
        r = sample(model, x_T=x_T, generator=torch.Generator().manual_seed(1), **opts)
        runs.append((name, r, time.perf_counter() - t0))
    t0 = time.perf_counter()
    xs = torch.cat([r.x for _, r, _ in runs])
    lik = dd.log_likelihood(model, xs, generator=torch.Generator().manual_seed(0), **reencode)
    ref_se = getattr(lik, "stderr", None)
    print(f"   re-encoded {xs.shape[0]} samples in {time.perf_counter() - t0:.0f} s")
    print(f"   {'method':<40} {'median |gap|':>12} {'max |gap|':>10} {'mean gap':>9} {'stderr':>7} {'|gap|/se':>8} {'passes/sample':>28}")
    for k, (name, r, dt) in enumerate(runs):
        sl = slice(k * n, (k + 1) * n)
        gap = r.logp - lik.logp[sl]
        se = torch.zeros(n, dtype=F64)
        for part in (getattr(r, "logp_stderr", None), None if ref_se is None else ref_se[sl]):
            if part is not None:
                se = se + part.to(F64).square()
        se = se.sqrt()
        print(f"   {name:<40} {float(gap.abs().median()):>12.1f} {float(gap.abs().max()):>10.1f} {float(gap.mean()):>+9.1f} "
              f"{float(se.median()):>7.1f} {float((gap.abs() / se).median()):>8.1f} {str(r.nfe):>28}", flush=True)  # fmt: skip
        if seeds > 1:
            print(f"   {'':<40} mean gap per latent {[round(v, 1) for v in gap.reshape(seeds, -1).mean(0).tolist()]}")
    print()


# -- 6. target mode on the bundled model -------------------------------------------------------


def section_target(n: int = 4) -> None:
    """Density guidance's target mode steered by the tracked log p_0 and by re-encoding, against the reference re-encoding."""
    model = dd.load_pretrained("patches16")
    x_T = model.schedule.prior_sample((n, *model.event_shape), generator=torch.Generator().manual_seed(5))
    targets = torch.linspace(500.0, 4500.0, n, dtype=F64)
    print(f"6. Target mode on patches16, {n} latents, 32 steps, at most 8 passes, tolerance 5 nats; reference: re-encoding {REENCODE}")
    print(f"   targets {[round(v) for v in targets.tolist()]}")
    for measure in ("tracked", "reencoded"):
        t0 = time.perf_counter()
        r = sample(model, x_T=x_T, method="density-guidance", target_logp=targets, target_measure=measure, steps=32, target_tol=5.0,
                   target_passes=8, generator=torch.Generator().manual_seed(1))  # fmt: skip
        seconds = time.perf_counter() - t0
        ref = dd.log_likelihood(model, r.x, generator=torch.Generator().manual_seed(3), **REENCODE).logp
        print(f"   steered by {measure:<9}: reported {[round(v) for v in r.logp.tolist()]}, reference {[round(v) for v in ref.tolist()]}, "
              f"|reference - target| max {float((ref - targets).abs().max()):.0f} nats; {r.settings['passes']} passes, {r.nfe}, {seconds:.0f} s", flush=True)  # fmt: skip
    print()


# -- 5. where the gap comes from ---------------------------------------------------------------


def reference_path(model, xs: list, ts: torch.Tensor, *, fine: int = 2, probes: int = 2, seed: int = 0) -> torch.Tensor:
    """``log p_{t_i}(x_i)`` ``(N + 1, B)`` for the states ``xs[i]`` at the decreasing times ``ts[i]`` (``ts[0] = t_max``).

    One PF-ODE (Heun, Hutchinson) from the data end to ``t_max`` on the sampler's grid
    refined ``fine`` times in logSNR; state ``i`` joins the batch at its own time.
    """
    from diffdensity.divergence import Hutchinson
    from diffdensity.dynamics import PFODE

    sched, n, b = model.schedule, len(ts) - 1, xs[0].shape[0]
    lam = sched.log_snr(ts.to(F64))
    pieces, join = [ts[n:]], {0: n}
    for i in range(n - 1, -1, -1):
        seg = sched.t_from_log_snr(lam[i + 1] + (lam[i] - lam[i + 1]) * torch.linspace(0, 1, fine + 1, dtype=F64)[1:])
        seg[-1] = ts[i]
        pieces.append(seg)
        join[sum(len(p) for p in pieces) - 1] = i
    grid = torch.cat(pieces)
    dyn = PFODE(model, divergence=Hutchinson(probes))
    dyn.reset(torch.Generator().manual_seed(seed))
    x, lp, members = None, None, []
    with torch.no_grad():
        for j in range(len(grid)):
            if j in join:
                members.append(join[j])
                xi, zero = xs[join[j]], torch.zeros(b, dtype=F64)
                x, lp = (xi, zero) if x is None else (torch.cat([x, xi]), torch.cat([lp, zero]))
            if j == len(grid) - 1:
                break
            h = float(grid[j + 1] - grid[j])
            dyn.begin_step()
            u1, r1 = dyn(grid[j], x)
            u2, r2 = dyn(grid[j + 1], x + h * u1)
            x, lp = x + 0.5 * h * (u1 + u2), lp + 0.5 * h * (r1 + r2)
        ref = (sched.prior_log_prob(x) - lp).reshape(len(members), b)
    out = torch.empty(n + 1, b, dtype=F64)
    out[torch.tensor(members)] = ref
    return out


def section_steps(n: int, figure: Path | None) -> None:
    model = dd.load_pretrained("patches16")
    sched = model.schedule
    x_T = sched.prior_sample((n, *model.event_shape), generator=torch.Generator().manual_seed(5))
    runs = [("pf-ode, heun", dict(method="pf-ode", solver="heun", grid="log_snr")), ("pf-ode, exp-heun", dict(method="pf-ode", solver="exp-heun", grid="log_snr")),
            ("sde, tweedie", dict(method="sde", solver="tweedie")), ("sde, tweedie-jvp", dict(method="sde", solver="tweedie-jvp"))]  # fmt: skip
    print(f"5. Gap tracked - re-encoded along the trajectory, bundled model, {n} samples, 32 steps (re-encoding: Heun, 2x finer grid, 2 probes)")
    out = []
    for name, opts in runs:
        xs: list = []
        r = sample(model, x_T=x_T, steps=32, generator=torch.Generator().manual_seed(1), callback=lambda info: xs.append(info.x.clone()), **opts)
        gap = r.logp_path - reference_path(model, xs, r.ts)
        lam = sched.log_snr(r.ts)
        out.append((name, lam, gap))
        share = [float((gap[-1] - gap[(lam < thr).sum() - 1]).mean() / gap[-1].mean()) for thr in (5.0, 8.0)]
        print(f"   {name:<18} final gap {', '.join(f'{float(g):+.1f}' for g in gap[-1])}; "
              f"accumulated above logSNR 5: {100 * share[0]:.0f}%, above 8: {100 * share[1]:.0f}% of the mean", flush=True)  # fmt: skip
    if figure is not None:
        plot_steps(figure, out)
        print(f"   wrote {figure}")
    print()


def plot_steps(path: Path, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for (name, lam, gap), color in zip(out, ("C0", "C0", "C3", "C3")):
        style = "--" if ("heun" in name and "exp" not in name) or name.endswith("tweedie") else "-"
        for j in range(gap.shape[1]):
            ax.plot(lam.numpy(), gap[:, j].numpy(), style, color=color, alpha=0.8, lw=1.2, label=name if j == 0 else None)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("logSNR of the sampler's state (noise -> data)")
    ax.set_ylabel("tracked - re-encoded log p_t(x_t) [nats]")
    ax.set_title("patches16, 32 steps: where the gap accumulates", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="samples per row of the error table")
    p.add_argument("--quick", action="store_true", help="256-step rows only, shorter timings")
    p.add_argument("--only", choices=("errors", "timing", "hd", "model", "steps", "target"), help="run one section")
    p.add_argument("--model-n", type=int, default=6, help="samples per method on the bundled model (sections model, steps: 2)")
    p.add_argument("--rows", default="", help="section model: only the methods whose name contains one of these comma-separated parts")
    p.add_argument("--seeds", type=int, default=1, help="section model: runs of every latent, each with its own probes and noise")
    p.add_argument("--reference", choices=("pinned", "fine"), default="pinned",
                   help="section model: re-encode with the pinned 128 Heun steps or the finer 48 RK4 steps")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "hd_threshold.png"), help="HD figure path ('' to skip)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    t0 = time.perf_counter()
    if a.only in (None, "errors"):
        section_errors(a.n, a.quick)
    if a.only in (None, "timing"):
        section_timing(a.quick)
    if a.only in (None, "hd"):
        section_hd(16, Path(a.figure) if a.figure else None)
    if a.only in (None, "model"):
        section_model(a.model_n, a.rows, a.seeds, FINE_REENCODE if a.reference == "fine" else REENCODE)
    if a.only in (None, "target"):
        section_target()
    if a.only in (None, "steps"):
        section_steps(2, ROOT / "docs" / "figures" / "tracking_gap_steps.png" if a.figure else None)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
