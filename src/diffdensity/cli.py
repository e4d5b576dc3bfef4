"""The ``diffdensity`` command line: a thin layer over the library's functions.

Each subcommand parses typed, range-checked options and calls one function of the
library (``commands.py`` holds the ones that orchestrate several).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]

MODEL_HELP = "builtin:NAME (bundled), diffusers:PATH (local folder) or gmm:NAME (exact mixture: ring2d, mix64, image16, image32)"


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def quantile(s: str) -> float:
    v = float(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {s}")
    return v


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_common(p: argparse.ArgumentParser, *, model_default: str = "builtin:patches16") -> None:
    p.add_argument("--model", default=model_default, help=MODEL_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (latents, noise, probes)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    p = argparse.ArgumentParser(
        prog="diffdensity",
        description="Measure and steer the log-density of samples in diffusion and flow models.",
        formatter_class=_Formatter,
        epilog="examples:\n  diffdensity demo --out out/demo\n  diffdensity sample --method density-guidance --q 0.9 -n 16\n"
        "  diffdensity logp images/ --out logp.csv\n  diffdensity detail --n 64\n  diffdensity train --preset patches16",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the main demonstration: guided samples, log-density paths, a table", formatter_class=_Formatter,
                       epilog="example:\n  diffdensity demo --out out/demo --n 8 --steps 32")
    add_common(d)
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument("--n", type=positive_int, default=8, help="latents (columns of the grid)")
    d.add_argument("--steps", type=positive_int, default=32, help="solver steps per sampler")
    d.add_argument("--q", type=quantile, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="density-guidance quantiles")
    d.set_defaults(func=commands.demo)

    s = sub.add_parser("sample", help="draw samples with any method, with their log-densities", formatter_class=_Formatter,
                       epilog="examples:\n  diffdensity sample -n 16 --method pf-ode\n  diffdensity sample -n 16 --method density-guidance --q 0.8\n"
                       "  diffdensity sample -n 16 --method hd --log-snr-threshold 2")
    add_common(s)
    s.add_argument("-n", type=positive_int, default=16, help="number of samples")
    s.add_argument("--method", default="pf-ode", help="pf-ode, sde, hd, density-guidance, stochastic-density-guidance, prior-guidance")
    s.add_argument("--steps", type=positive_int, default=64, help="solver steps")
    s.add_argument("--solver", default=None, help="ODE solver (euler, heun, rk4, ...); default: the method's")
    s.add_argument("--q", type=quantile, default=None, help="quantile for density / prior guidance")
    s.add_argument("--log-snr-threshold", type=float, default=None, help="switch point of the high-density sampler")
    s.add_argument("--target-logp", type=float, default=None, help="density guidance: wanted log p_0 in nats (instead of --q)")
    s.add_argument("--noise", choices=["early", "late"], default=None, help="noise window of stochastic density guidance")
    s.add_argument("--no-track", action="store_true", help="do not track the log-density")
    s.add_argument("--probes", type=positive_int, default=1, help="Hutchinson probes per step for tracking")
    s.add_argument("--out", default="out/samples", help="output folder (PNG files, grid.png and samples.csv)")
    s.set_defaults(func=commands.sample)

    a = sub.add_parser("align", help="score-alignment report for prior latents", formatter_class=_Formatter,
                       epilog="example:\n  diffdensity align -n 32 --method with-score")
    add_common(a)
    a.add_argument("-n", type=positive_int, default=32, help="number of latents")
    a.add_argument("--steps", type=positive_int, default=32, help="PF-ODE steps")
    a.add_argument("--method", choices=["with-score", "without-score", "both"], default="both", help="how to measure")
    a.add_argument("--out", default="out/align", help="output folder (alignment.csv)")
    a.set_defaults(func=commands.align)

    t = sub.add_parser("detail", help="log-density versus image detail (PNG size): correlations and a scatter plot", formatter_class=_Formatter,
                       epilog="examples:\n  diffdensity detail --n 64                 # model samples across quantiles\n"
                       "  diffdensity detail --images held_out/      # an image folder")
    add_common(t)
    t.add_argument("--images", nargs="*", default=None, help="image files or folders (default: sample from the model)")
    t.add_argument("--n", type=positive_int, default=64, help="model samples when no images are given")
    t.add_argument("--steps", type=positive_int, default=32, help="solver steps")
    t.add_argument("--out", default="out/detail", help="output folder (detail.csv, detail.png)")
    t.set_defaults(func=commands.detail)

    r = sub.add_parser("train", help="train a bundled-model preset (resumable)", formatter_class=_Formatter,
                       epilog="examples:\n  diffdensity train --preset patches16 --out checkpoints/patches16\n"
                       "  diffdensity train --preset patches16 --max-minutes 30   # resume later with the same command")
    r.add_argument("--preset", default="patches16", help="training preset (patches16, tiny)")
    r.add_argument("--out", default="checkpoints/patches16", help="output folder (weights, checkpoint, log)")
    r.add_argument("--steps", type=positive_int, default=None, help="override the preset's step count")
    r.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes (resumable)")
    r.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    r.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    r.set_defaults(func=commands.train)

    from .evaluate import register as register_logp

    register_logp(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"diffdensity {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
