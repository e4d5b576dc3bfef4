"""``diffdensity align``: score alignment of prior latents, measured with and without the score."""

from __future__ import annotations

import argparse
import time

from .common import HelpFormatter, add_model_options, generator, latents, nfe_dict, output_folder, positive_int, settings_of, setup, write_table

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


NOTE = """\
value = s_0(x_0) . J_F s_T(x_T): the rate of change of log p_0 of the sample [nats per unit of eps]
as the latent moves along its own score, x_T -> x_T + eps s_T(x_T). Its sign decides
alignment (> 0: aligned). The two measurements agree in sign as --steps grows; their
magnitudes can differ by orders of magnitude at few steps (with-score evaluates the score at
t_min, where it is large and least reliable; without-score integrates a one-probe Hutchinson
estimate), so compare signs, not values."""


def run(args: argparse.Namespace) -> int:
    from ..alignment import score_alignment

    model, shape = setup(args)
    out = output_folder(args.out)
    x_T = latents(model, shape, args.n, args.seed, args.device)
    methods = ["with-score", "without-score"] if args.method == "both" else [args.method]
    results, summary = {}, {"command": "align", "settings": settings_of(args), "note": " ".join(NOTE.split()), "methods": {}}
    for m in methods:
        t0 = time.perf_counter()
        r = score_alignment(model, x_T, steps=args.steps, method=m, generator=generator(args.seed + 1))
        results[m] = r
        seconds = time.perf_counter() - t0
        summary["methods"][m] = {"aligned_fraction": r.fraction, "nfe_per_sample": nfe_dict(r.nfe), "seconds": round(seconds, 3)}
        print(f"{m:<14} aligned (value > 0) on {r.fraction:.1%} of {args.n} latents  ({r.nfe} passes per sample, {seconds:.1f} s)")
    if len(results) == 2:
        summary["agreement"] = agreement(results["with-score"].values, results["without-score"].values)
    print(NOTE)
    header = ["latent", *(f"{m.replace('-', '_')}_dlogp_deps_nats" for m in methods), *(f"{m.replace('-', '_')}_aligned" for m in methods)]
    rows = [[i, *(f"{float(results[m].values[i]):.6g}" for m in methods), *(int(results[m].aligned[i]) for m in methods)] for i in range(args.n)]
    csv_path, json_path = write_table(out, "alignment", header, rows, summary)
    print(f"wrote {csv_path} and {json_path}")
    return 0


def agreement(a, b) -> dict:
    """Sign agreement of the two measurements (and their rank correlation from 3 latents on), printed and returned."""
    from .figures import correlations

    same = float((a.sign() == b.sign()).double().mean())
    _, spearman = correlations(a, b)
    if spearman != spearman:
        rank = "rank correlation: n/a (needs at least 3 latents with distinct values)"
    else:
        rank = f"rank correlation {spearman:+.2f}"
    print(f"agreement of the two measurements: same sign on {same:.1%} of {len(a)} latents; {rank}")
    return {"same_sign_fraction": same, "spearman": None if spearman != spearman else spearman}
