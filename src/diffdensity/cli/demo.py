"""``diffdensity demo``: the same latents through density guidance at several quantiles, the
PF-ODE, the reverse SDE and the high-density sampler; a labelled grid, a path plot and a table."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from .common import HelpFormatter, add_model_options, generator, latents, positive_int, quantile, setup, write_csv

HELP = "the main demonstration: guided samples, log-density paths, a table"
DESCRIPTION = """\
Draw samples from the same prior latents with density guidance at several quantiles q,
the PF-ODE, the reverse SDE and the high-density sampler, each with its tracked
log-density. Writes grid.png, logp_path.png, table.csv and samples.csv into --out.
"""
EPILOG = "example:\n  diffdensity demo --out out/demo -n 8 --steps 32"


def register(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("demo", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_options(d)
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument("-n", "--n", type=positive_int, default=8, help="latents (columns of the grid)")
    d.add_argument("--steps", type=positive_int, default=32, help="solver steps per sampler")
    d.add_argument("--q", type=quantile, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="density-guidance quantiles")
    d.set_defaults(func=run)
    return d


def run(args: argparse.Namespace) -> int:
    """Samples from the same latents across density-guidance quantiles, plus PF-ODE, SDE and HD."""
    from ..likelihood import logp_to_bpd
    from ..sampling import sample
    from .figures import plot_paths, save_grid
    from .progress import run_with_progress

    model, shape = setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dim = math.prod(shape)
    x_T = latents(model, shape, args.n, args.seed, args.device)
    runs = [(f"DG q={q:g}", dict(method="density-guidance", q=q)) for q in args.q]
    runs += [("PF-ODE", dict(method="pf-ode")), ("reverse SDE", dict(method="sde")), ("high density", dict(method="hd", log_snr_threshold=2.0))]
    rows, labels, cells, table, paths, per_sample = [], [], [], [], [], []
    print(f"{'sampler':<16} {'mean log p [nats]':>18} {'mean bits/dim':>14} {'NFE':>28} {'time [s]':>9}")
    for k, (name, opts) in enumerate(runs):
        t0 = time.perf_counter()
        res = run_with_progress(sample, name, args.steps, model=model, x_T=x_T.clone(), generator=generator(args.seed + 1000 + k), **opts)
        dt = time.perf_counter() - t0
        bpd = logp_to_bpd(res.logp, dim)
        rows.append(res.x)
        labels.append(name)
        cells.append([f"{lp:.0f} / {b:.2f}" for lp, b in zip(res.logp.tolist(), bpd.tolist())])
        table.append([name, float(res.logp.mean()), float(bpd.mean()), str(res.nfe), round(dt, 2)])
        per_sample += [[name, j, f"{lp:.6f}", f"{b:.6f}"] for j, (lp, b) in enumerate(zip(res.logp.tolist(), bpd.tolist()))]
        if res.logp_path is not None:
            paths.append((name, res.ts, res.logp_path))
        print(f"{name:<16} {table[-1][1]:>18.1f} {table[-1][2]:>14.3f} {table[-1][3]:>28} {dt:>9.1f}", flush=True)
    grid = save_grid(out / "grid.png", rows, row_labels=labels, cell_labels=cells, title="same latents; labels: log p [nats] / bits per dim")
    write_csv(out / "table.csv", ["sampler", "mean_logp_nats", "mean_bits_per_dim", "nfe", "seconds"], table)
    write_csv(out / "samples.csv", ["sampler", "latent", "logp_nats", "bits_per_dim"], per_sample)
    plot = plot_paths(out / "logp_path.png", paths, model.schedule)
    print(f"wrote {grid}, {plot}, {out / 'table.csv'} and {out / 'samples.csv'}")
    return 0
