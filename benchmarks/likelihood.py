"""Accuracy and cost of PF-ODE log-likelihoods on exact mixtures in D = 3072 (3x32x32).

Two rotated 10-component mixtures, 64 points drawn from p_0, VP schedule (logSNR in
[-10, 10]); the exact p_T is used as the prior so that only the ODE and divergence
errors remain:

* ``component``: isotropic components whose scales are log-spaced over 0.05..1;
* ``anisotropic``: every component has its own diagonal stds, log-uniform over
  0.05..1 per dimension, so the score's Jacobian is dense and strongly anisotropic
  (the hard case for Hutchinson: its variance is 2 sum_{i != j} J_ij^2).

For each solver / step / probe setting it prints the mean absolute error against the
exact value (nats and bits/dim), the mean bias, the score evaluations (forward and
JVP/VJP passes separately, per sample) and the wall time. An ``oracle`` row replaces
the estimator by the closed-form Laplacian to isolate the discretisation error.

    python benchmarks/likelihood.py               # both problems, all settings
    python benchmarks/likelihood.py --quick       # fewer points and settings
    python benchmarks/likelihood.py --memory      # peak memory of one exact divergence in D = 3072
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time

import torch

import diffdensity as dd
from diffdensity.divergence import DivergenceEstimator

DIM, K = 3 * 32 * 32, 10


def mixture(kind: str, seed: int = 0) -> dd.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    rotation = dd.random_rotation(DIM, generator=g)
    means = torch.randn(K, DIM, generator=g, dtype=torch.float64)
    if kind == "component":
        stds = torch.exp(torch.linspace(math.log(0.05), 0.0, K, dtype=torch.float64))
    else:
        stds = torch.exp(torch.empty(K, DIM, dtype=torch.float64).uniform_(math.log(0.05), 0.0, generator=g))
    return dd.GaussianMixture(means, stds, schedule=dd.VP(), rotation=rotation)


class Oracle(DivergenceEstimator):
    """The mixture's closed-form Laplacian (diagnostic: isolates the solver's error)."""

    def __init__(self, gmm: dd.GaussianMixture):
        super().__init__("reverse")
        self.gmm = gmm

    def __call__(self, fn, x, nfe=None):
        if nfe is not None:
            nfe.forward += 1
        return fn(x), self.gmm.laplacian(x, fn.t)


SETTINGS = [
    # label, solver, steps (first step for adaptive), rtol, divergence, probes, resample
    ("oracle divergence, dopri5", "dopri5", 16, 1e-5, "oracle", 0, ""),
    ("oracle divergence, heun 128", "heun", 128, 0, "oracle", 0, ""),
    ("baseline: dopri5, 1 fixed probe", "dopri5", 16, 1e-5, "hutchinson", 1, "solve"),
    ("euler 1024, 1 probe/step", "euler", 1024, 0, "hutchinson", 1, "step"),
    ("heun 128, 1 probe/step", "heun", 128, 0, "hutchinson", 1, "step"),
    ("dopri5 rtol 1e-4, 4 fixed probes", "dopri5", 16, 1e-4, "hutchinson", 4, "solve"),
    ("heun 128, 16 probes/step", "heun", 128, 0, "hutchinson", 16, "step"),
]
QUICK = {"oracle divergence, dopri5", "baseline: dopri5, 1 fixed probe", "heun 128, 1 probe/step", "dopri5 rtol 1e-4, 4 fixed probes"}


def run(kind: str, n: int, quick: bool) -> None:
    gmm = mixture(kind)
    g = torch.Generator().manual_seed(1)
    x = gmm.sample(n, generator=g)
    exact = gmm.log_prob(x, gmm.schedule.t_min)
    prior = lambda z: gmm.log_prob(z, gmm.schedule.t_max)  # noqa: E731
    print(f"\n== {kind} mixture, D={DIM}, K={K}, {n} points; exact mean log p_0 = {exact.mean():.1f} nats")
    head = f"{'setting':<34} {'MAE nats':>9} {'MAE bpd':>9} {'bias':>8} {'std':>7} {'forward':>8} {'jvp':>7} {'steps':>6} {'time s':>7}"
    print(head)
    for label, solver, steps, rtol, div, probes, resample in SETTINGS:
        if quick and label not in QUICK:
            continue
        est = Oracle(gmm) if div == "oracle" else dd.Hutchinson(probes, resample=resample)
        t0 = time.perf_counter()
        r = dd.log_likelihood(
            gmm, x, steps=steps, solver=solver, divergence=est, prior_logp=prior, rtol=rtol or 1e-5, atol=rtol or 1e-5,
            generator=torch.Generator().manual_seed(2),
        )
        dt = time.perf_counter() - t0
        err = r.logp - exact
        mae = float(err.abs().mean())
        print(
            f"{label:<34} {mae:>9.3f} {mae / (DIM * math.log(2)):>9.2e} {float(err.mean()):>8.3f} {float(err.std()):>7.3f} "
            f"{r.nfe.forward + (r.nfe.jvp + r.nfe.vjp) // max(probes, 1):>8d} {r.nfe.jvp + r.nfe.vjp:>7d} {r.steps:>6d} {dt:>7.1f}",
            flush=True,
        )


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
    p.add_argument("--n", type=int, default=64, help="points per problem")
    p.add_argument("--quick", action="store_true", help="fewer settings")
    p.add_argument("--problems", nargs="+", default=["component", "anisotropic"], choices=["component", "anisotropic"])
    p.add_argument("--memory", action="store_true", help="only the exact-divergence memory probe")
    p.add_argument("--_memory_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._memory_child:
        memory_probe()
        return
    if a.memory:
        subprocess.run([sys.executable, __file__, "--_memory_child"], check=True)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for kind in a.problems:
        run(kind, a.n, a.quick)
    subprocess.run([sys.executable, __file__, "--_memory_child"], check=True)


if __name__ == "__main__":
    main()
