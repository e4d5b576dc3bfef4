"""``diffdensity demo``: the same latents through density guidance at several quantiles, the
PF-ODE, the reverse SDE (to the data, and with noise down to logSNR 3 only) and the
high-density sampler; a labelled grid, a path plot, a table
and an HTML page showing them together. The first ``--check`` samples of every row are
re-encoded (:func:`diffdensity.check_consistency`), so that every tracked number shows how
far it can be trusted."""

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
    count,
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
    warn,
    write_table,
)

HELP = "the main demonstration: guided samples, log-density paths, a table"
DESCRIPTION = """\
Draw samples from the same prior latents with density guidance at several quantiles q,
the PF-ODE, the reverse SDE (also with noise only down to logSNR 3, then the PF-ODE) and
the high-density sampler, each with its tracked log-density. The first --check samples of every row are re-encoded with the PF-ODE
(diffdensity.check_consistency) and compared with their tracked value; a row whose
median gap exceeds 3 standard errors is marked in the grid. Writes grid.png,
logp_path.png, table.csv/json, samples.csv/json and index.html (all of them on one page)
into --out.
"""
EPILOG = "examples:\n  diffdensity demo --out out/demo -n 8 --steps 32\n  diffdensity demo --check 0    # no re-encoding (faster)"
DEMO_PROBES = 2  # Hutchinson probes per network evaluation (one pass serves both): halves the variance of one
DEMO_CHECK = 2  # samples re-encoded per row
REENCODING: dict = {}  # options of check_consistency for the re-encoding (none: its defaults)
BIAS_K = 3.0  # a row is marked when its median |gap| exceeds this many (median) standard errors
CHECK_HEADER = ["checked_samples", "median_abs_gap_nats", "max_abs_gap_nats", "median_gap_stderr_nats", "tracking_biased"]
TABLE_HEADER = ["sampler", "mean_logp_nats", "mean_logp_stderr_nats", "sd_logp_nats", "mean_bits_per_dim", *NFE_HEADER, "seconds", *CHECK_HEADER]
SAMPLES_HEADER = ["sampler", "latent", "logp_nats", "logp_stderr_nats", "bits_per_dim", "reencoded_logp_nats", "reencoded_stderr_nats", "gap_nats", "gap_stderr_nats"]
NOTES = (
    "log p is the log-density tracked along each sampler, an estimate: where the tracking reports a standard error "
    "(Monte-Carlo probes) it is shown after +- (a tracking without a Monte-Carlo part, such as the reverse SDE's scheme for exact "
    "scores, shows +-0); where none is reported the column is empty. It covers the Monte-Carlo noise only, not a bias of the "
    "tracking: the last columns compare it with re-encoding. Bits/dim = -log p / (D ln 2) + 7 on the 8-bit scale; "
    "values below zero mean a density above one per 8-bit bin, which very flat images reach.",
    "Rows start from the same prior latents; the reverse SDE adds fresh noise along the way, so its images differ in content. "
    "Density guidance at q = 0.5 is the PF-ODE from latents rescaled to the median norm of the prior, so its row and its path lie close to the PF-ODE's.",
    "nfe_forward, nfe_jvp, nfe_vjp: network passes per sample by kind (plain, Jacobian-vector, vector-Jacobian products).",
    "checked_samples: how many samples of the row (the first) were re-encoded with the PF-ODE (diffdensity.check_consistency); "
    "median_abs_gap_nats, max_abs_gap_nats: median and largest |tracked - re-encoded| over them; median_gap_stderr_nats: the median "
    "of their combined standard errors; tracking_biased: the median |gap| exceeds 3 of those, so the row's tracked values are off "
    "by about that much, whatever their +- says. samples.csv holds each re-encoded value.",
)


def register(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("demo", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_options(d)
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument("-n", "--n", type=positive_int, default=8, help="latents (columns of the grid)")
    d.add_argument("--steps", type=positive_int, default=32, help="solver steps per sampler")
    d.add_argument("--q", type=quantile, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="density-guidance quantiles")
    d.add_argument("--check", type=count, default=DEMO_CHECK, metavar="N",
                   help="re-encode the first N samples of every row with the PF-ODE and report the gap to their tracked log-density (0: none)")
    d.set_defaults(func=run)
    return d


@dataclass
class Run:
    """One sampler's result in the demo, with the consistency report of its first samples (``check``)."""

    name: str
    res: object  # SampleResult
    bpd: object  # (B,) float64 bits/dim
    seconds: float
    check: object = None  # ConsistencyReport of the first --check samples, or None

    @property
    def has_stderr(self) -> bool:
        return getattr(self.res, "logp_stderr", None) is not None

    def stderr(self):
        """Per-sample standard errors of ``log p`` (zeros where the tracking has no Monte-Carlo part)."""
        import torch

        se = getattr(self.res, "logp_stderr", None)
        return torch.zeros_like(self.res.logp) if se is None else se

    @property
    def median_gap_stderr(self) -> float:
        return float(self.check.gap_stderr.median())

    @property
    def offset(self) -> float:
        """The signed gap of the checked sample whose ``|gap|`` is the median (``report.median_abs_gap``)."""
        return float(self.check.gap[self.check.gap.abs().median(0).indices])

    @property
    def biased(self) -> bool:
        """Whether the median ``|gap|`` exceeds ``BIAS_K`` median standard errors (False without a check)."""
        return self.check is not None and self.check.median_abs_gap > BIAS_K * self.median_gap_stderr

    def check_columns(self) -> list:
        """The columns of ``CHECK_HEADER``: empty without a check."""
        c = self.check
        if c is None:
            return ["", "", "", "", ""]
        return [len(c.index), round(c.median_abs_gap, 3), round(c.max_abs_gap, 3), round(self.median_gap_stderr, 3), "yes" if self.biased else "no"]

    def row(self) -> list:
        """The table row; the standard error of the mean is empty where the tracking reports none."""
        lp, n = self.res.logp, len(self.res.logp)
        mean_se = round(float(self.stderr().square().sum().sqrt()) / n, 3) if self.has_stderr else ""
        sd = float(lp.std()) if n > 1 else 0.0
        return [self.name, round(float(lp.mean()), 3), mean_se, round(sd, 3), round(float(self.bpd.mean()), 4),
                *nfe_columns(self.res.nfe), round(self.seconds, 2), *self.check_columns()]

    def verdict(self) -> str:
        """``"tracked off by ~+76 nats"`` or ``"consistent"`` (within ``BIAS_K`` standard errors)."""
        return f"tracked off by ~{self.offset:+.0f} nats" if self.biased else f"consistent (within {BIAS_K:g} stderr)"

    def row_label(self) -> str:
        """The grid's row label: the name, and for a biased row how far its tracked values are off."""
        return f"{self.name}\ntracked off by\n~{self.offset:+.0f} nats\n(re-encoded)" if self.biased else self.name

    def cell_labels(self) -> list[str]:
        """The grid's cell labels: tracked value, and for the checked samples their re-encoded value."""
        se = self.stderr().tolist() if self.has_stderr else [None] * len(self.res.logp)
        c = self.check
        n = 0 if c is None else len(c.index)
        rse = [None] * n if c is None or c.reencoded_stderr is None else c.reencoded_stderr.tolist()
        re = [] if c is None else c.reencoded.tolist()
        return [cell_label(lp, s, b, reencoded=re[j] if j < n else None, reencoded_stderr=rse[j] if j < n else None)
                for j, (lp, s, b) in enumerate(zip(self.res.logp.tolist(), se, self.bpd.tolist()))]

    def sample_rows(self) -> list[list]:
        """``samples.csv`` rows: tracked values and, for the checked samples, re-encoded value and gap."""
        c, out = self.check, []
        for j, (lp, se, b) in enumerate(zip(self.res.logp.tolist(), self.stderr().tolist(), self.bpd.tolist())):
            row = [self.name, j, f"{lp:.6f}", f"{se:.6g}", f"{b:.6f}"]
            if c is not None and j < len(c.index):
                rse = "" if c.reencoded_stderr is None else f"{float(c.reencoded_stderr[j]):.6g}"
                row += [f"{float(c.reencoded[j]):.6f}", rse, f"{float(c.gap[j]):.6f}", f"{float(c.gap_stderr[j]):.6g}"]
            else:
                row += ["", "", "", ""]
            out.append(row)
        return out

    def check_summary(self) -> dict | None:
        """The row's consistency in ``table.json`` (``None`` without a check)."""
        c = self.check
        if c is None:
            return None
        as_list = lambda t: None if t is None else [float(v) for v in t]  # noqa: E731
        return {"samples": len(c.index), "reencoded_logp_nats": as_list(c.reencoded), "reencoded_stderr_nats": as_list(c.reencoded_stderr),
                "gap_nats": as_list(c.gap), "gap_stderr_nats": as_list(c.gap_stderr), "median_abs_gap_nats": c.median_abs_gap,
                "max_abs_gap_nats": c.max_abs_gap, "median_gap_stderr_nats": self.median_gap_stderr, "tracking_biased": self.biased,
                "offset_nats": self.offset}


def cell_label(logp: float, stderr: float | None, bpd: float, *, reencoded: float | None = None, reencoded_stderr: float | None = None) -> str:
    """``"1618+-3"`` (or ``"1618"`` without a Monte-Carlo error) over ``"3.96 b/d"``; for a checked
    sample ``"tracked 1618+-3"`` and ``"re-enc 1630+-2"`` over it."""
    err = "" if stderr is None else f"+-{stderr:.2g}"
    if reencoded is None:
        return f"{logp:.0f}{err}\n{bpd:.2f} b/d"
    re_err = "" if reencoded_stderr is None else f"+-{reencoded_stderr:.2g}"
    return f"tracked {logp:.0f}{err}\nre-enc {reencoded:.0f}{re_err}\n{bpd:.2f} b/d"


DEMO_NOISE_UNTIL = 3.0  # logSNR of the SDE row (measured: docs/sampling.md) that stops its noise there and finishes with the PF-ODE


def samplers(qs, schedule) -> list[tuple[str, dict]]:
    """The demo's rows: density guidance at each quantile, then PF-ODE, reverse SDE (and, where the
    schedule reaches logSNR 3, the SDE with noise only up to it), and high density."""
    runs = [(f"DG q={q:g}", dict(method="density-guidance", q=q)) for q in qs]
    runs += [("PF-ODE", dict(method="pf-ode")), ("reverse SDE", dict(method="sde"))]
    if schedule.log_snr_min < DEMO_NOISE_UNTIL < schedule.log_snr_max:
        runs.append((f"SDE to logSNR {DEMO_NOISE_UNTIL:g}", dict(method="sde", noise_until=DEMO_NOISE_UNTIL)))
    return runs + [("high density", dict(method="hd"))]


def run(args: argparse.Namespace) -> int:
    """Samples from the same latents across density-guidance quantiles, plus PF-ODE, SDE and HD;
    then the first ``--check`` samples of every row re-encoded."""
    from ..guidance import rescale_latent
    from ..likelihood import logp_to_bpd
    from ..sampling import sample
    from .progress import run_with_progress

    if args.check > args.n:
        warn("demo", f"--check {args.check} exceeds -n {args.n}; re-encoding all {args.n} samples of every row")
        args.check = args.n
    model, shape = setup(args)
    require_images(args, shape)
    out = output_folder(args.out)
    dim = math.prod(shape)
    # every row starts from the latents at the prior's median norm (density guidance's own
    # default), so q = 0.5 and the PF-ODE integrate the same ODE from the same points
    x_T = rescale_latent(latents(model, shape, args.n, args.seed, args.device), 0.5, model.schedule)
    runs = []
    print(f"{'sampler':<16} {'mean log p [nats]':>22} {'mean bits/dim':>14} {'passes per sample':>30} {'time [s]':>9}")
    for k, (name, opts) in enumerate(samplers(args.q, model.schedule)):
        t0 = time.perf_counter()
        res = run_with_progress(sample, name, args.steps, model=model, x_T=x_T.clone(), generator=generator(args.seed + 1000 + k),
                                probes=DEMO_PROBES, **opts)
        r = Run(name, res, logp_to_bpd(res.logp, dim), time.perf_counter() - t0)
        runs.append(r)
        row = r.row()
        err = f"+- {row[2]:<5.2g}" if r.has_stderr else " " * 8
        print(f"{name:<16} {row[1]:>13.1f} {err} {row[4]:>14.3f} {str(res.nfe):>30} {r.seconds:>9.1f}", flush=True)
    settings = reencode(model, runs, args.check, args.seed + 2) if args.check else None
    written = write_outputs(out, args, runs, model.schedule, dim, settings)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def reencode(model, runs: list[Run], n: int, seed: int) -> dict:
    """Re-encode the first ``n`` samples of every run with :func:`~diffdensity.check_consistency`
    (its default settings unless ``REENCODING`` says otherwise) and attach each run's part as ``run.check``; one line per run.

    All rows go through one call, as one batch: several times faster than a call per row.
    Returns the re-encoding's settings.
    """
    from types import SimpleNamespace

    import torch

    from ..consistency import ConsistencyReport, check_consistency

    t0 = time.perf_counter()
    batch = SimpleNamespace(x=torch.cat([r.res.x[:n] for r in runs]), logp=torch.cat([r.res.logp[:n] for r in runs]),
                            logp_stderr=torch.cat([r.stderr()[:n] for r in runs]))  # zeros where a row has none: the same combined error
    rep = check_consistency(model, batch, generator=generator(seed), **REENCODING)
    for k, r in enumerate(runs):
        part = slice(k * n, (k + 1) * n)
        se_r = None if rep.reencoded_stderr is None else rep.reencoded_stderr[part]
        r.check = ConsistencyReport(torch.arange(n), rep.tracked[part], rep.reencoded[part], rep.gap[part], rep.gap_stderr[part],
                                    rep.tracked_stderr[part] if r.has_stderr else None, se_r, rep.settings)
    s = rep.settings
    first = "the first sample" if n == 1 else f"the first {n} samples"
    print(f"\nre-encoded {first} of each row with the PF-ODE ({s['solver']}, {s['steps']} steps, {s['probes']} probes) "
          f"in {time.perf_counter() - t0:.1f} s; gap = tracked - re-encoded")
    print(f"{'sampler':<16} {'median |gap| [nats]':>20} {'max |gap| [nats]':>17} {'stderr [nats]':>14}  tracked log p")
    for r in runs:
        print(f"{r.name:<16} {r.check.median_abs_gap:>20.1f} {r.check.max_abs_gap:>17.1f} {r.median_gap_stderr:>14.2g}  {r.verdict()}", flush=True)
    return s


def write_outputs(out: Path, args: argparse.Namespace, runs: list[Run], schedule, dim: int, reencoding: dict | None = None) -> list[Path]:
    """grid.png, logp_path.png, table.csv/json, samples.csv/json and index.html."""
    from .figures import plot_paths, save_grid
    from .page import write_page

    title = ("rows: samplers from the same prior latents (the reverse SDE adds fresh noise, so its content differs)\n"
             "labels: tracked log p estimate +- standard error (where Monte-Carlo) [nats]; bits/dim (b/d; below 0: density above 1 per 8-bit bin)")
    if reencoding is not None:
        title += (f"\nre-enc: the same sample re-encoded with the PF-ODE ({reencoding['steps']} steps), first {args.check} of each row; "
                  f"'tracked off by' marks rows whose median gap exceeds {BIAS_K:g} standard errors")
    grid = save_grid(out / "grid.png", [r.res.x for r in runs], row_labels=[r.row_label() for r in runs], cell_labels=[r.cell_labels() for r in runs], title=title)
    paths = [(r.name, r.res.ts, r.res.logp_path) for r in runs if r.res.logp_path is not None]
    plot = plot_paths(out / "logp_path.png", paths, schedule, dim)
    table = [r.row() for r in runs]
    summary = {"command": "demo", "settings": settings_of(args), "reencoding": reencoding,
               "samplers": {r.name: {"nfe_per_sample": nfe_dict(r.res.nfe), "steps": r.res.steps, "consistency": r.check_summary()} for r in runs},
               "units": {"logp": "nats", "gap": "nats, tracked - re-encoded", "bits_per_dim": "bits per dimension of 8-bit data", "seconds": "wall-clock seconds"}}
    t_csv, t_json = write_table(out, "table", TABLE_HEADER, table, summary)
    per_sample = [row for r in runs for row in r.sample_rows()]
    s_csv, s_json = write_table(out, "samples", SAMPLES_HEADER, per_sample, {"command": "demo", "settings": settings_of(args), "reencoding": reencoding})
    page = write_page(out / "index.html", "diffdensity demo", [(grid.name, "samples, their tracked and (first of each row) re-encoded log-densities"),
                      (plot.name, "log-density along the sampling trajectory (bits/dim; band: 10-90 % of samples)")], TABLE_HEADER, table, NOTES)
    return [page, grid, plot, t_csv, t_json, s_csv, s_json]
