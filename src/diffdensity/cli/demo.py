"""``diffdensity demo``: the same latents through density guidance at several quantiles, the
PF-ODE, the reverse SDE and the high-density sampler; a labelled grid, a path plot, a table
and an HTML page showing them together."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .common import (
    NFE_HEADER,
    HelpFormatter,
    add_model_options,
    generator,
    latents,
    nfe_columns,
    nfe_dict,
    output_folder,
    positive_int,
    quantile,
    settings_of,
    require_images,
    setup,
    write_table,
)

HELP = "the main demonstration: guided samples, log-density paths, a table"
DESCRIPTION = """\
Draw samples from the same prior latents with density guidance at several quantiles q,
the PF-ODE, the reverse SDE and the high-density sampler, each with its tracked
log-density. Writes grid.png, logp_path.png, table.csv/json, samples.csv/json and
index.html (all of them on one page) into --out.
"""
EPILOG = "example:\n  diffdensity demo --out out/demo -n 8 --steps 32"
DEMO_PROBES = 2  # Hutchinson probes per step: enough for every tracked value to carry its standard error
TABLE_HEADER = ["sampler", "mean_logp_nats", "mean_logp_stderr_nats", "sd_logp_nats", "mean_bits_per_dim", *NFE_HEADER, "seconds"]
NOTES = (
    "log p is the log-density tracked along each sampler, an estimate: where the tracking reports a standard error "
    "(Monte-Carlo probes) it is shown after +- (the reverse SDE's tracking has no Monte-Carlo part: +-0); where none is "
    "reported the column is empty. Bits/dim = -log p / (D ln 2) + 7 on the 8-bit scale; "
    "values below zero mean a density above one per 8-bit bin, which very flat images reach.",
    "Rows start from the same prior latents; the reverse SDE adds fresh noise along the way, so its images differ in content. "
    "Density guidance at q = 0.5 is the PF-ODE from latents rescaled to the median norm of the prior, so its row and its path lie close to the PF-ODE's.",
    "nfe_forward, nfe_jvp, nfe_vjp: network passes per sample by kind (plain, Jacobian-vector, vector-Jacobian products).",
)


def register(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("demo", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_options(d)
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument("-n", "--n", type=positive_int, default=8, help="latents (columns of the grid)")
    d.add_argument("--steps", type=positive_int, default=32, help="solver steps per sampler")
    d.add_argument("--q", type=quantile, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="density-guidance quantiles")
    d.set_defaults(func=run)
    return d


@dataclass
class Run:
    """One sampler's result in the demo."""

    name: str
    res: object  # SampleResult
    bpd: object  # (B,) float64 bits/dim
    seconds: float

    @property
    def has_stderr(self) -> bool:
        return getattr(self.res, "logp_stderr", None) is not None

    def stderr(self):
        """Per-sample standard errors of ``log p`` (zeros where the tracking has no Monte-Carlo part)."""
        import torch

        se = getattr(self.res, "logp_stderr", None)
        return torch.zeros_like(self.res.logp) if se is None else se

    def row(self) -> list:
        """The table row; the standard error of the mean is empty where the tracking reports none."""
        lp, n = self.res.logp, len(self.res.logp)
        mean_se = round(float(self.stderr().square().sum().sqrt()) / n, 3) if self.has_stderr else ""
        sd = float(lp.std()) if n > 1 else 0.0
        return [self.name, round(float(lp.mean()), 3), mean_se, round(sd, 3), round(float(self.bpd.mean()), 4),
                *nfe_columns(self.res.nfe), round(self.seconds, 2)]


def cell_label(logp: float, stderr: float | None, bpd: float) -> str:
    """``"1618+-3"`` (or ``"1618"`` without a Monte-Carlo error) over ``"3.96 b/d"``."""
    err = "" if stderr is None else f"+-{stderr:.2g}"
    return f"{logp:.0f}{err}\n{bpd:.2f} b/d"


def samplers(qs) -> list[tuple[str, dict]]:
    """The demo's rows: density guidance at each quantile, then PF-ODE, reverse SDE and high density."""
    runs = [(f"DG q={q:g}", dict(method="density-guidance", q=q)) for q in qs]
    return runs + [("PF-ODE", dict(method="pf-ode")), ("reverse SDE", dict(method="sde")), ("high density", dict(method="hd"))]


def run(args: argparse.Namespace) -> int:
    """Samples from the same latents across density-guidance quantiles, plus PF-ODE, SDE and HD."""
    from ..guidance import rescale_latent
    from ..likelihood import logp_to_bpd
    from ..sampling import sample
    from .progress import run_with_progress

    model, shape = setup(args)
    require_images(args, shape)
    out = output_folder(args.out)
    dim = math.prod(shape)
    # every row starts from the latents at the prior's median norm (density guidance's own
    # default), so q = 0.5 and the PF-ODE integrate the same ODE from the same points
    x_T = rescale_latent(latents(model, shape, args.n, args.seed, args.device), 0.5, model.schedule)
    runs = []
    print(f"{'sampler':<16} {'mean log p [nats]':>22} {'mean bits/dim':>14} {'passes per sample':>30} {'time [s]':>9}")
    for k, (name, opts) in enumerate(samplers(args.q)):
        t0 = time.perf_counter()
        res = run_with_progress(sample, name, args.steps, model=model, x_T=x_T.clone(), generator=generator(args.seed + 1000 + k),
                                probes=DEMO_PROBES, **opts)
        r = Run(name, res, logp_to_bpd(res.logp, dim), time.perf_counter() - t0)
        runs.append(r)
        row = r.row()
        err = f"+- {row[2]:<5.2g}" if r.has_stderr else " " * 8
        print(f"{name:<16} {row[1]:>13.1f} {err} {row[4]:>14.3f} {str(res.nfe):>30} {r.seconds:>9.1f}", flush=True)
    written = write_outputs(out, args, runs, model.schedule, dim)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def write_outputs(out: Path, args: argparse.Namespace, runs: list[Run], schedule, dim: int) -> list[Path]:
    """grid.png, logp_path.png, table.csv/json, samples.csv/json and index.html."""
    from .figures import plot_paths, save_grid
    from .page import write_page

    cells = [[cell_label(lp, se if r.has_stderr else None, b) for lp, se, b in zip(r.res.logp.tolist(), r.stderr().tolist(), r.bpd.tolist())] for r in runs]
    title = ("rows: samplers from the same prior latents (the reverse SDE adds fresh noise, so its content differs)\n"
             "labels: tracked log p estimate +- standard error (where Monte-Carlo) [nats]; bits/dim (b/d; below 0: density above 1 per 8-bit bin)")
    grid = save_grid(out / "grid.png", [r.res.x for r in runs], row_labels=[r.name for r in runs], cell_labels=cells, title=title)
    paths = [(r.name, r.res.ts, r.res.logp_path) for r in runs if r.res.logp_path is not None]
    plot = plot_paths(out / "logp_path.png", paths, schedule, dim)
    table = [r.row() for r in runs]
    summary = {"command": "demo", "settings": settings_of(args), "samplers": {r.name: {"nfe_per_sample": nfe_dict(r.res.nfe), "steps": r.res.steps} for r in runs},
               "units": {"logp": "nats", "bits_per_dim": "bits per dimension of 8-bit data", "seconds": "wall-clock seconds"}}
    t_csv, t_json = write_table(out, "table", TABLE_HEADER, table, summary)
    per_sample = [[r.name, j, f"{lp:.6f}", f"{se:.6g}", f"{b:.6f}"]
                  for r in runs for j, (lp, se, b) in enumerate(zip(r.res.logp.tolist(), r.stderr().tolist(), r.bpd.tolist()))]
    s_csv, s_json = write_table(out, "samples", ["sampler", "latent", "logp_nats", "logp_stderr_nats", "bits_per_dim"], per_sample,
                                {"command": "demo", "settings": settings_of(args)})
    page = write_page(out / "index.html", "diffdensity demo", [(grid.name, "samples and their tracked log-densities"),
                      (plot.name, "log-density along the sampling trajectory (bits/dim; band: 10-90 % of samples)")], TABLE_HEADER, table, NOTES)
    return [page, grid, plot, t_csv, t_json, s_csv, s_json]
