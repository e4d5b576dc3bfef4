"""``diffdensity align``: score alignment of prior latents, measured with and without the score."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import HelpFormatter, add_model_options, generator, latents, positive_int, setup, write_csv

HELP = "score-alignment report for prior latents"
DESCRIPTION = """\
Score alignment: for each prior latent, whether the PF-ODE maps it along the score
direction (the sign of the alignment value decides). Measured with the score (the
network's score at both ends) and without it (a Jacobian-vector product along the
trajectory); both give the same sign in the limit of many steps. Writes alignment.csv.
"""
EPILOG = "example:\n  diffdensity align -n 32 --method with-score"


def register(sub) -> argparse.ArgumentParser:
    a = sub.add_parser("align", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_options(a)
    a.add_argument("-n", "--n", type=positive_int, default=32, help="number of latents")
    a.add_argument("--steps", type=positive_int, default=32, help="PF-ODE steps")
    a.add_argument("--method", choices=["with-score", "without-score", "both"], default="both", help="how to measure")
    a.add_argument("--out", default="out/align", help="output folder (alignment.csv)")
    a.set_defaults(func=run)
    return a


def run(args: argparse.Namespace) -> int:
    import torch

    from ..alignment import score_alignment

    model, shape = setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_T = latents(model, shape, args.n, args.seed, args.device)
    methods = ["with-score", "without-score"] if args.method == "both" else [args.method]
    results = {}
    for m in methods:
        t0 = time.perf_counter()
        r = score_alignment(model, x_T, steps=args.steps, method=m, generator=generator(args.seed + 1))
        results[m] = r
        print(f"{m:<14} aligned on {r.fraction:.1%} of {args.n} latents  ({r.nfe}, {time.perf_counter() - t0:.1f} s)")
    if len(results) == 2:
        a, b = results["with-score"].values, results["without-score"].values
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        print(f"agreement: correlation {corr:.4f}, same sign on {float((a.sign() == b.sign()).double().mean()):.1%}")
    write_csv(out / "alignment.csv", ["latent", *methods], [[i, *(f"{float(results[m].values[i]):.6g}" for m in methods)] for i in range(args.n)])
    print(f"wrote {out / 'alignment.csv'}")
    return 0
