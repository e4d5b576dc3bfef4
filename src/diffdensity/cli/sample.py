"""``diffdensity sample``: draw samples with any registered method, with their log-densities."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import CliError, HelpFormatter, add_model_options, finite_float, generator, latents, positive_int, quantile, setup, warn, write_csv

HELP = "draw samples with any method, with their log-densities"
DESCRIPTION = """\
Draw samples from the model with one sampling method and track each sample's log-density
log p_0(x) along its trajectory. Writes sample_NNNN.png (image models), grid.png and
samples.csv into --out.

Method options: --q (density-guidance, stochastic-density-guidance, prior-guidance),
--target-logp (density-guidance), --log-snr-threshold (hd; default 2), --noise
(stochastic-density-guidance). A flag that does not apply to the chosen method is an
error. Options that take a function (density guidance's rate, the custom method) exist
only in the Python API (diffdensity.sample).
"""
EPILOG = """\
examples:
  diffdensity sample -n 16 --method pf-ode
  diffdensity sample -n 16 --method density-guidance --q 0.8
  diffdensity sample -n 16 --method hd --log-snr-threshold 2
"""
HD_THRESHOLD = 2.0  # the default logSNR switch point of "hd" in the command line (and the demo)
FLAGS = {"q": "--q", "log_snr_threshold": "--log-snr-threshold", "target_logp": "--target-logp", "noise": "--noise"}


def method_names() -> list[str]:
    """The registered sampling methods the command line can run (all but ``custom``, which needs a function)."""
    from ..sampling import METHODS

    return [m for m in METHODS if m != "custom"]


def solver_names() -> list[str]:
    """ODE solvers and stochastic schemes accepted by ``--solver``."""
    from ..sde import SCHEMES
    from ..solvers import TABLEAUX

    return [*TABLEAUX, *SCHEMES]


def register(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("sample", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_options(s)
    s.add_argument("-n", "--n", type=positive_int, default=16, help="number of samples")
    s.add_argument("--method", choices=method_names(), default="pf-ode", help="sampling method")
    s.add_argument("--steps", type=positive_int, default=None, help="solver steps (default: the method's, as in the Python API)")
    s.add_argument("--solver", choices=solver_names(), default=None, help="ODE solver or stochastic scheme (default: the method's)")
    s.add_argument("--q", type=quantile, default=None, help="quantile for density / prior guidance")
    s.add_argument("--log-snr-threshold", type=finite_float, default=None, help=f"switch point of the high-density sampler (default for hd: {HD_THRESHOLD:g})")
    s.add_argument("--target-logp", type=finite_float, default=None, help="density guidance: wanted log p_0 in nats (instead of --q)")
    s.add_argument("--noise", choices=["early", "late"], default=None, help="noise window of stochastic density guidance")
    s.add_argument("--no-track", action="store_true", help="do not track the log-density")
    s.add_argument("--probes", type=positive_int, default=1, help="Hutchinson probes per step for tracking")
    s.add_argument("--out", default="out/samples", help="output folder (PNG files, grid.png and samples.csv)")
    s.set_defaults(func=run)
    return s


def method_options(args: argparse.Namespace) -> dict:
    """The method's options from the flags; a flag the method does not take is a usage error."""
    from ..sampling import METHODS

    try:
        from ..methods import REQUIRED
    except ImportError:  # the registry still inside sampling
        from ..sampling import REQUIRED

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
    if args.method == "hd" and "log_snr_threshold" not in opts:
        opts["log_snr_threshold"] = HD_THRESHOLD
    for name, option in spec.options.items():
        if option.default is REQUIRED and name not in opts:
            raise CliError(f"--method {args.method} needs {FLAGS.get(name, name)}", 2)
    return opts


def resolve_steps(args: argparse.Namespace) -> int:
    """``--steps`` or the method's default; a warning where an adaptive solver only takes its first step from it."""
    from ..sampling import METHODS
    from ..solvers import TABLEAUX

    if args.solver in TABLEAUX and TABLEAUX[args.solver].adaptive and args.steps is not None:
        warn("sample", f"--steps {args.steps} only sets the first step size of the adaptive --solver {args.solver}, which chooses its own steps")
    return METHODS[args.method].default_steps if args.steps is None else args.steps


def run(args: argparse.Namespace) -> int:
    from ..likelihood import logp_to_bpd
    from ..sampling import sample
    from .figures import save_grid, save_png, to_uint8
    from .progress import run_with_progress

    opts = method_options(args)
    steps = resolve_steps(args)
    if args.solver is not None:
        opts["solver"] = args.solver
    model, shape = setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_T = latents(model, shape, args.n, args.seed, args.device)
    res = run_with_progress(sample, args.method, steps, model=model, x_T=x_T, method=args.method, track_logp=not args.no_track,
                            probes=args.probes, generator=generator(args.seed + 1), **opts)
    dim = math.prod(shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        for i, img in enumerate(to_uint8(res.x)):
            save_png(out / f"sample_{i:04d}.png", img)
        save_grid(out / "grid.png", [res.x[i : i + 8] for i in range(0, len(res.x), 8)])
    rows = []
    for i in range(args.n):
        lp = None if res.logp is None else float(res.logp[i])
        rows.append([f"sample_{i:04d}", "" if lp is None else f"{lp:.6f}", "" if lp is None else f"{float(logp_to_bpd(res.logp[i], dim)):.6f}"])
    write_csv(out / "samples.csv", ["sample", "logp_nats", "bits_per_dim"], rows)
    mean = "" if res.logp is None else f", mean log p {float(res.logp.mean()):.1f} nats"
    print(f"{args.n} samples with {args.method} ({res.nfe}){mean}; wrote {out}")
    return 0
