"""Density guidance on an exact mixture in D = 3072: control, tracking accuracy and cost.

Side by side in one run, on a rotated 3x32x32 mixture (VP schedule; by default the
``anisotropic`` mixture of ``benchmarks/likelihood.py``; ``--mixture component`` for its
isotropic-component one, ``--mixture image32`` for ``gmm:image32``):

1. DG-ODE for q in {0.1, 0.3, 0.5, 0.7, 0.9}: exact mean log p_0 of the samples (must
   increase with q), tracked-vs-exact mean absolute error, NFE, wall time; q = 0.5
   against the PF-ODE (identical samples).
2. Target mode: requested vs achieved exact log p_0.
3. DG-SDE with the "early" and "late" noise windows: spread of log p_0 over noise seeds
   for fixed latents, against the DG-ODE value. Early noise moves samples between
   components, so this part uses the same mixture with stds shared by all components
   (every mode at the same density level); otherwise a component switch alone changes
   log p_0 by the difference of the components' levels.
4. Wall-time ratios measured back to back: DG-ODE / PF-ODE (no tracking, equal steps),
   DG-SDE / DG-ODE (tracking), score alignment without / with the score.

    python benchmarks/guidance.py --n 6 --probes 4       # anisotropic mixture, heun 128 steps
    python benchmarks/guidance.py --mixture component    # isotropic components: little Hutchinson noise
    python benchmarks/guidance.py --only dgsde           # section 3 alone (both DG-SDE integrators)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import diffdensity as dd
from diffdensity.alignment import score_alignment
from diffdensity.zoo import gmm_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runs from the repository root too
from likelihood import mixture  # noqa: E402


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--probes", type=int, default=1)
    p.add_argument("--mixture", default="anisotropic", choices=["component", "anisotropic", "image32"])
    p.add_argument("--only", choices=["dgsde"], help="run section 3 alone")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    gmm = gmm_preset("image32") if a.mixture == "image32" else mixture(a.mixture)
    gmm = dd.GaussianMixture(gmm.means.reshape(-1, 3, 32, 32), gmm.stds.reshape(-1, 3, 32, 32), gmm.log_weights.exp(), schedule=gmm.schedule, rotation=gmm.rotation)
    sched = gmm.schedule
    x_T = sched.prior_sample((a.n, *gmm.event_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = lambda x: gmm.log_prob(x, sched.t_min)  # noqa: E731
    prior = lambda z: gmm.log_prob(z, sched.t_max)  # noqa: E731
    common = dict(steps=a.steps, probes=a.probes, prior_logp=prior)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {gmm!r}; n={a.n}, steps={a.steps} (heun), {a.probes} probes/step\n")

    if a.only != "dgsde":
        print("1. DG-ODE across quantiles (latents rescaled to the median norm)")
        print(f"{'q':>5} {'exact log p0':>13} {'tracked':>10} {'MAE':>7} {'NFE':>26} {'time s':>7}")
        results = {}
        for q in (0.1, 0.3, 0.5, 0.7, 0.9):
            r, dt = timed(lambda: dd.sample(gmm, x_T=x_T, method="density-guidance", q=q, generator=torch.Generator().manual_seed(1), **common))
            ex = exact(r.x)
            results[q] = (r, ex)
            print(f"{q:>5} {float(ex.mean()):>13.1f} {float(r.logp.mean()):>10.1f} {float((r.logp - ex).abs().mean()):>7.2f} {str(r.nfe):>26} {dt:>7.1f}", flush=True)
        means = [float(results[q][1].mean()) for q in sorted(results)]
        print(f"   strictly increasing in q: {all(b > a for a, b in zip(means, means[1:]))}")
        pf = dd.sample(gmm, x_T=dd.guidance.rescale_latent(x_T, 0.5, sched), method="pf-ode", track_logp=False, steps=a.steps)
        print(f"   q=0.5 vs PF-ODE from the same latents: max |x difference| = {float((pf.x - results[0.5][0].x).abs().max()):.1e}\n")

        print("2. Target mode: achieved exact log p0 for requested targets")
        lo, hi = means[0], means[-1]
        targets = torch.linspace(lo - 0.25 * (hi - lo), hi + 0.25 * (hi - lo), a.n, dtype=torch.float64)
        r, dt = timed(lambda: dd.sample(gmm, x_T=x_T, method="density-guidance", target_logp=targets, generator=torch.Generator().manual_seed(2), **common))
        ex = exact(r.x)
        print(f"   targets {float(targets[0]):.0f}..{float(targets[-1]):.0f} nats: MAE |exact - target| = {float((ex - targets).abs().mean()):.2f} nats, "
              f"max {float((ex - targets).abs().max()):.2f}; tracked vs exact MAE {float((r.logp - ex).abs().mean()):.2f}; {r.nfe}; {dt:.1f} s\n")

    print("3. DG-SDE (q=0.7): log p0 over 4 noise seeds for the first 4 latents, against DG-ODE (stds shared by the components)")
    k = gmm.means.shape[0]
    gmm = dd.GaussianMixture(gmm.means.reshape(k, *gmm.event_shape), gmm.stds[:1].expand(k, -1).reshape(k, *gmm.event_shape),
                             gmm.log_weights.exp(), schedule=sched, rotation=gmm.rotation)
    ode = dd.sample(gmm, x_T=x_T[:4], method="density-guidance", q=0.7, track_logp=False, steps=a.steps)
    ode_lp = exact(ode.x)
    for window in ("early", "late"):
        for solver in ("euler-maruyama", "split-heun"):
            lps = []
            for seed in range(4):
                r = dd.sample(gmm, x_T=x_T[:4], method="stochastic-density-guidance", q=0.7, noise=window, solver=solver,
                              generator=torch.Generator().manual_seed(10 + seed), **common)  # fmt: skip
                lps.append(exact(r.x))
            lps = torch.stack(lps)
            print(f"   {window:>5} {solver:<15}: mean |log p0(SDE) - log p0(ODE)| = {float((lps - ode_lp).abs().mean()):.2f} nats, "
                  f"spread over seeds (std) = {float(lps.std(0).mean()):.2f} nats, tracked-vs-exact MAE (last seed) "
                  f"{float((r.logp - lps[-1]).abs().mean()):.2f}; {r.nfe}", flush=True)  # fmt: skip
    print()

    if a.only == "dgsde":
        return
    print("4. Wall-time ratios (same machine, back to back, best of 2)")
    plain = dict(steps=a.steps, track_logp=False)
    _, t_pf = timed(lambda: dd.sample(gmm, x_T=x_T, method="pf-ode", **plain), 2)
    _, t_dg = timed(lambda: dd.sample(gmm, x_T=x_T, method="density-guidance", q=0.9, **plain), 2)
    _, t_dgt = timed(lambda: dd.sample(gmm, x_T=x_T, method="density-guidance", q=0.9, generator=torch.Generator().manual_seed(3), **common), 2)
    _, t_sdg = timed(lambda: dd.sample(gmm, x_T=x_T, method="stochastic-density-guidance", q=0.9, noise="late", generator=torch.Generator().manual_seed(3), **common), 2)
    small = gmm_preset("mix64")
    z = small.schedule.prior_sample((a.n, 64), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, t_with = timed(lambda: score_alignment(small, z, steps=32, method="with-score"), 2)
    _, t_without = timed(lambda: score_alignment(small, z, steps=32, method="without-score", generator=torch.Generator().manual_seed(5)), 2)
    print(f"   DG-ODE / PF-ODE (no tracking)        {t_dg / t_pf:.3f}   ({t_dg:.2f} s / {t_pf:.2f} s)")
    print(f"   DG-SDE / DG-ODE (tracking)           {t_sdg / t_dgt:.3f}   ({t_sdg:.2f} s / {t_dgt:.2f} s)")
    print(f"   alignment without / with score       {t_without / t_with:.3f}   ({t_without:.2f} s / {t_with:.2f} s, D=64)")


if __name__ == "__main__":
    main()
