"""``diffdensity sample``: draw samples with any registered method, with their log-densities."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import (
    NFE_HEADER,
    CliError,
    HelpFormatter,
    add_model_options,
    finite_float,
    generator,
    latents,
    nfe_columns,
    nfe_dict,
    output_folder,
    positive_int,
    quantile,
    remove_stale,
    settings_of,
    setup,
    warn,
    write_table,
)

HELP = "draw samples with any method, with their log-densities"
DESCRIPTION = """\
Draw samples from the model with one sampling method and track each sample's log-density
log p_0(x) along its trajectory. Writes sample_NNNN.png (image models), grid.png and
samples.csv into --out.

Method options: --q (density-guidance, stochastic-density-guidance, prior-guidance),
--target-logp and --target-measure (density-guidance), --log-snr-threshold (hd; default
as in the API), --noise (stochastic-density-guidance), --noise-until (sde). A flag that
does not apply to the chosen method is an error. Options that take a function (density
guidance's rate, the custom method) exist only in the Python API (diffdensity.sample).
"""
EPILOG = """\
examples:
  diffdensity sample -n 16 --method pf-ode
  diffdensity sample -n 16 --method density-guidance --q 0.8
  diffdensity sample -n 16 --method hd --log-snr-threshold 2
  diffdensity sample -n 4 --method density-guidance --target-logp 3000 --target-measure reencoded
"""
FLAGS = {"q": "--q", "log_snr_threshold": "--log-snr-threshold", "target_logp": "--target-logp", "target_measure": "--target-measure", "noise": "--noise",
         "noise_until": "--noise-until"}


def method_names() -> list[str]:
    """The registered sampling methods the command line can run (all but ``custom``, which needs a function)."""
    from ..sampling import METHODS  # every registered method, guidance included

    return [m for m in METHODS if m != "custom"]


def hd_default() -> float:
    """The API's default ``log_snr_threshold`` of ``"hd"``."""
    from ..sampling import METHODS  # every registered method, guidance included

    return METHODS["hd"].options["log_snr_threshold"].default


DEFAULT_PROBES = 2


def solver_names() -> list[str]:
    """ODE solvers and stochastic schemes accepted by ``--solver``."""
    from ..expint import ODE_SOLVERS
    from ..sde import SCHEMES

    return [*ODE_SOLVERS, *SCHEMES]


def register(sub) -> argparse.ArgumentParser:
    from ..bases import BASES
    from ..schedules import GRIDS

    s = sub.add_parser("sample", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_options(s)
    s.add_argument("-n", "--n", type=positive_int, default=16, help="number of samples")
    s.add_argument("--method", choices=method_names(), default="pf-ode", help="sampling method")
    s.add_argument("--steps", type=positive_int, default=None, help="solver steps (default: the method's, as in the Python API)")
    s.add_argument("--solver", choices=solver_names(), default=None, help="ODE solver or stochastic scheme (default: the method's)")
    s.add_argument("--grid", choices=GRIDS, default=None,
                   help="time grid of the steps (default: the model's, as in the API: 'tapered', logSNR steps shrinking towards the data end, for learned networks; 'log_snr' for exact scores)")
    s.add_argument("--q", type=quantile, default=None, help="quantile for density / prior guidance")
    s.add_argument("--log-snr-threshold", type=finite_float, default=None, help=f"logSNR switch point of the high-density sampler (default for hd: {hd_default()}, as in the API)")
    s.add_argument("--target-logp", type=finite_float, default=None, help="density guidance: wanted log p_0 in nats (instead of --q)")
    s.add_argument("--target-measure", choices=["tracked", "reencoded"], default=None,
                   help="with --target-logp: steer by the tracked log p_0 or by re-encoding each pass's samples (the density of the sample produced; default: tracked)")
    s.add_argument("--noise-until", type=finite_float, default=None, metavar="LOGSNR",
                   help="sde: the reverse SDE up to this logSNR, then the PF-ODE (noise only at higher noise levels, as EDM's S_tmin)")
    s.add_argument("--noise", choices=["early", "late"], default=None, help="noise window of stochastic density guidance")
    s.add_argument("--no-track", action="store_true", help="do not track the log-density")
    s.add_argument("--probes", type=positive_int, default=DEFAULT_PROBES,
                   help="Hutchinson probes per network evaluation for tracking, fresh at each (one network pass serves them all)")
    s.add_argument("--probe-basis", choices=BASES, default="auto",
                   help="basis of the Rademacher probes: 'auto' (the image DCT with opponent colours for images, where a denoiser's Jacobian is nearly diagonal), 'pixel' or 'dct'")
    s.add_argument("--check", type=positive_int, default=None, metavar="N",
                   help="re-encode the first N samples with the PF-ODE and report the gap to their tracked log-density")
    s.add_argument("--out", default="out/samples", help="output folder (PNG files, grid.png and samples.csv)")
    s.set_defaults(func=run)
    return s


def method_options(args: argparse.Namespace) -> dict:
    """The method's options from the flags; a flag the method does not take is a usage error."""
    from ..methods import REQUIRED
    from ..sampling import METHODS

    spec = METHODS[args.method]
    opts = {}
    for name, flag in FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name not in spec.options:
            takers = [m for m in method_names() if name in METHODS[m].options]
            raise CliError(f"{flag} does not apply to --method {args.method}; it applies to {', '.join(takers)}", 2)
        opts[name] = value
    for name, option in spec.options.items():
        if option.default is REQUIRED and name not in opts:
            raise CliError(f"--method {args.method} needs {FLAGS.get(name, name)}", 2)
    return opts


def resolve_steps(args: argparse.Namespace) -> int:
    """``--steps`` or the method's default; a warning where an adaptive solver only takes its first step from it."""
    from ..sampling import METHODS  # every registered method, guidance included
    from ..solvers import is_adaptive

    if is_adaptive(args.solver) and args.steps is not None:
        warn("sample", f"--steps {args.steps} only sets the first step size of the adaptive --solver {args.solver}, which chooses its own steps")
    return METHODS[args.method].default_steps if args.steps is None else args.steps


def check_ignored(args: argparse.Namespace) -> None:
    """Refuse flags that contradict each other; warn about options that this combination does not use."""
    if args.check is not None and args.no_track:
        raise CliError("--check compares tracked log-densities: drop --no-track", 2)
    if args.check is not None and args.check > args.n:
        raise CliError(f"--check {args.check} exceeds -n {args.n}; re-encode at most -n samples", 2)
    for flag, value, default in (("--probes", args.probes, DEFAULT_PROBES), ("--probe-basis", args.probe_basis, "auto")):
        if value != default and args.no_track:
            warn("sample", f"{flag} {value} is ignored with --no-track (nothing is tracked)")
        elif value != default and args.method == "sde" and args.noise_until is None:  # its PF-ODE tail does use them
            warn("sample", f"{flag} {value} is ignored by --method sde (its log-density needs no divergence estimate)")


def run(args: argparse.Namespace) -> int:
    import time

    from ..divergence import make_divergence
    from ..sampling import sample
    from ..solvers import is_adaptive
    from .progress import run_with_progress

    opts = method_options(args)
    steps = resolve_steps(args)
    check_ignored(args)
    if args.solver is not None:
        opts["solver"] = args.solver
    model, shape = setup(args)
    out = output_folder(args.out)
    x_T = latents(model, shape, args.n, args.seed, args.device)
    t0 = time.perf_counter()
    res = run_with_progress(sample, args.method, steps, adaptive=is_adaptive(args.solver), model=model, x_T=x_T, method=args.method, track_logp=not args.no_track,
                            divergence=make_divergence("hutchinson", args.probes, solver=args.solver, basis=args.probe_basis), grid=args.grid, generator=generator(args.seed + 1), **opts)
    seconds = time.perf_counter() - t0
    names = write_images(out, res.x, shape)
    report = None
    if args.check is not None:
        from ..consistency import check_consistency

        report = check_consistency(model, res, n=args.check, generator=generator(args.seed + 2))
        print("\n".join(report.lines()))
    summary = write_samples(out, args, res, names, seconds, report)
    mean = "" if res.logp is None else f", mean log p {summary['mean_logp_nats']:.1f} nats ({summary['mean_bits_per_dim']:.3f} bits/dim)"
    print(f"{args.n} samples with {args.method} ({res.nfe} passes per sample){mean}; wrote {out}/samples.csv, samples.json")
    if res.logp is not None and report is None and untrusted(model, res):
        print(f"note: {args.method} tracks log p through the network's score off the probability-flow ODE; on a learned network "
              "that can be biased beyond its +- (docs/sampling.md). --check N re-encodes N samples to measure it.")  # fmt: skip
    return 0


def untrusted(model, res) -> bool:
    """Tracked values of a learned network that are not its PF-ODE density by construction (nor re-encoded)."""
    from ..models import is_learned

    return (is_learned(model) and not res.settings.get("logp_exact_for_flow", False)
            and "logp_source" not in res.settings)  # fmt: skip


def write_images(out: Path, x, shape) -> list[str]:
    """``sample_NNNN.png`` per sample and ``grid.png`` for image models; older ``sample_*.png`` are removed."""
    from .figures import save_grid, save_png, to_uint8

    names = [f"sample_{i:04d}" for i in range(x.shape[0])]
    is_image = len(shape) == 3 and shape[0] in (1, 3)
    remove_stale(out, "sample_*.png", {f"{n}.png" for n in names} if is_image else set())
    if is_image:
        for name, img in zip(names, to_uint8(x)):
            save_png(out / f"{name}.png", img)
        save_grid(out / "grid.png", [x[i : i + 8] for i in range(0, len(x), 8)])
    return names


def write_samples(out: Path, args: argparse.Namespace, res, names: list[str], seconds: float, report=None) -> dict:
    """``samples.csv`` (one row per sample, units in the header) and ``samples.json`` (settings, means, passes);
    with a consistency ``report``, the re-encoded log-density and the gap of the samples it covers."""
    from ..likelihood import logp_to_bpd

    dim = math.prod(res.x.shape[1:])
    lp = res.logp
    bpd = None if lp is None else logp_to_bpd(lp, dim)
    se = getattr(res, "logp_stderr", None)
    rows = []
    for i, name in enumerate(names):
        cells = ["", "", ""] if lp is None else [f"{float(lp[i]):.6f}", "" if se is None else f"{float(se[i]):.6g}", f"{float(bpd[i]):.6f}"]
        rows.append([name, *cells, *nfe_columns(res.nfe)])
    header = ["sample", "logp_nats", "logp_stderr_nats", "bits_per_dim", *NFE_HEADER]
    if report is not None:
        header += ["reencoded_logp_nats", "gap_nats", "gap_stderr_nats"]
        checked = {int(i): (float(r), float(g), float(e)) for i, r, g, e in zip(report.index, report.reencoded, report.gap, report.gap_stderr)}
        rows = [row + ([f"{v:.6f}" for v in checked[i]] if i in checked else ["", "", ""]) for i, row in enumerate(rows)]
    summary = {"command": "sample", "settings": settings_of(args), "steps": res.steps, "nfe_per_sample": nfe_dict(res.nfe), "seconds": round(seconds, 3),
               "mean_logp_nats": None if lp is None else float(lp.mean()), "mean_bits_per_dim": None if bpd is None else float(bpd.mean()),
               "logp_stderr_note": "standard error of each logp from the Hutchinson probes; empty where the tracking has no Monte-Carlo part",
               "logp_source": res.settings.get("logp_source", "tracked along the sampler")}
    if "tracked_logp" in res.settings:
        summary["tracked_logp_nats"] = res.settings["tracked_logp"]
    if report is not None:
        summary["consistency"] = {"samples": len(report.index), "median_abs_gap_nats": report.median_abs_gap, "max_abs_gap_nats": report.max_abs_gap,
                                  "within_3_stderr": float(report.within(3.0).double().mean()), "reencoding": report.settings}
    write_table(out, "samples", header, rows, summary)
    return summary
