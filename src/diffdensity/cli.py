"""The ``diffdensity`` command line: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def cmd_demo(args: argparse.Namespace) -> int:
    from .demos import gmm_likelihood_demo

    gmm_likelihood_demo(Path(args.out), seed=args.seed, dim=args.dim, n=args.n)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffdensity",
        description="Measure and steer the log-density of samples in diffusion and flow models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example:\n  diffdensity demo --out out/demo",
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="end-to-end demonstration (writes a table and a plot)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--dim", type=_positive_int, default=64, help="data dimension of the mixture")
    d.add_argument("--n", type=_positive_int, default=64, help="number of data points")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
