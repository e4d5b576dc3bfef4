"""Score alignment measured with and without the score, with their errors, side by side.

For every latent, ``diffdensity.score_alignment(method="both", step_halving=True)`` gives

* with-score ``s_0(x_0) . v_0`` (the network's score at the data end) +- its Richardson
  error (the same solve at half the steps),
* without-score ``omega_0 = grad log p_0 . v_0`` (the model's own PF-ODE density, by nested
  Hutchinson JVPs) +- its standard error and Richardson error,

and counts the latents on which they agree within 2 combined errors. Rows:

1. an exact rotated Gaussian mixture (D = 768, the score is the gradient of its density):
   they must agree;
2. the bundled model ``patches16`` (D = 768, a learned U-Net), where the network's score
   need not be the gradient of the model's density: the difference is then a property of
   the network, located along logSNR by the paths ``s_t . v_t`` and ``omega_t`` (figure
   ``docs/figures/alignment_paths.png``).

    python benchmarks/alignment.py              # 16 latents, 32 steps, 2 probes
    python benchmarks/alignment.py --n 4 --figure ''
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import diffdensity as dd

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def mixture(dim: int = 768, k: int = 6, seed: int = 0) -> dd.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=F64) * 0.5
    stds = torch.exp(torch.empty(k, dim, dtype=F64).uniform_(-3.0, 0.0, generator=g))
    return dd.GaussianMixture(means, stds, schedule=dd.VP(), rotation=dd.random_rotation(dim, generator=g))


def run(name: str, model, n: int, steps: int, probes: int):
    x_T = model.schedule.prior_sample((n, *model.event_shape), generator=torch.Generator().manual_seed(5), dtype=getattr(model, "dtype", None) or F64)
    t0 = time.perf_counter()
    r = dd.score_alignment(model, x_T, steps=steps, method="both", probes=probes, step_halving=True, generator=torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - t0
    err = r.combined_error()
    agree = r.agree(2.0)
    ratio = r.without_score / r.with_score
    print(f"{name}: {n} latents, {steps} steps, solver {r.settings['solver']}, {probes} probes; {r.nfe} passes in all, {seconds:.0f} s")
    print(f"   {'latent':>6} {'with-score':>12} {'+-':>8} {'without-score':>14} {'+-':>8} {'difference / error':>19}")
    with_err, without_err = r.error("with-score"), r.error("without-score")
    for i in range(n):
        z = float((r.with_score[i] - r.without_score[i]).abs() / err[i])
        print(f"   {i:>6} {float(r.with_score[i]):>12.1f} {float(with_err[i]):>8.1f} {float(r.without_score[i]):>14.1f} {float(without_err[i]):>8.1f} {z:>19.1f}")
    print(f"   agree within 2 combined errors: {float(agree.double().mean()):.0%} of latents; same sign: "
          f"{float((r.with_score.sign() == r.without_score.sign()).double().mean()):.0%}; without / with: median {float(ratio.median()):.2f}")  # fmt: skip
    lam = model.schedule.log_snr(r.ts.to(F64))
    rel = (r.path_without - r.path_with).abs() / r.path_with.abs()
    for thr in (0.01, 0.1):
        apart = (rel.median(1).values > thr).nonzero()
        where = f"logSNR {float(lam[int(apart[0])]):+.1f}" if len(apart) else "never"
        print(f"   paths part by more than {thr:.0%} (median over latents) from {where} on")
    print()
    return name, lam, r


def plot(path: Path, runs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.0 * len(runs), 4.0), squeeze=False)
    for ax, (name, lam, r) in zip(axes[0], runs):
        for j in range(min(4, r.with_score.shape[0])):
            color = f"C{j}"
            ax.plot(lam.numpy(), r.path_with[:, j].numpy(), "-", color=color, lw=1.3, label="with score: s_t . v_t" if j == 0 else None)
            ax.plot(lam.numpy(), r.path_without[:, j].numpy(), "--", color=color, lw=1.3, label="without: omega_t" if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("logSNR (noise -> data)")
        ax.set_ylabel("d log p_t / d eps along the latent's score [nats]")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="latents per row")
    p.add_argument("--steps", type=int, default=32, help="PF-ODE steps (and half of them for the Richardson error)")
    p.add_argument("--probes", type=int, default=2, help="Hutchinson probes per evaluation of without-score")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "alignment_paths.png"), help="figure path ('' to skip)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    runs = [run("exact mixture (D = 768)", mixture(), a.n, a.steps, a.probes), run("bundled patches16 (D = 768)", dd.load_pretrained("patches16"), a.n, a.steps, a.probes)]
    if a.figure:
        plot(Path(a.figure), runs)
        print(f"wrote {a.figure}")


if __name__ == "__main__":
    main()
