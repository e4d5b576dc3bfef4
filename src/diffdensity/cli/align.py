"""``diffdensity align``: score alignment of prior latents, measured with and without the score."""

from __future__ import annotations

import argparse
import time

from .common import HelpFormatter, add_model_options, generator, latents, nfe_dict, output_folder, positive_int, settings_of, setup, write_table

HELP = "score-alignment report for prior latents"
DESCRIPTION = """\
Score alignment: for each prior latent, the rate of change of log p_0 of its sample as the
latent moves along its own score; aligned where it is > 0. Measured with the score (the
network's score at the data end times the flow's tangent) and without it (the model's own
density, by nested Jacobian-vector products along the trajectory), each with its error
(Hutchinson standard error; discretisation error from a second solve at half the steps).
Writes alignment.csv and alignment.json.
"""
EPILOG = "example:\n  diffdensity align -n 32 --method both --probes 2"


def register(sub) -> argparse.ArgumentParser:
    a = sub.add_parser("align", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_options(a)
    a.add_argument("-n", "--n", type=positive_int, default=32, help="number of latents")
    a.add_argument("--steps", type=positive_int, default=32, help="PF-ODE steps (the error estimate solves again with half of them)")
    a.add_argument("--method", choices=["with-score", "without-score", "both"], default="both", help="how to measure")
    a.add_argument("--probes", type=positive_int, default=2, help="Hutchinson probes per evaluation of without-score (>= 2: a standard error)")
    a.add_argument("--no-error", action="store_true", help="skip the half-steps solve (no discretisation error; 2/3 of the time)")
    a.add_argument("--out", default="out/align", help="output folder (alignment.csv)")
    a.set_defaults(func=run)
    return a


NOTE = """\
value = d/d eps log p_0(F(x_T + eps s_T)) [nats per unit of eps], the rate of change of log p_0
of the sample as the latent moves along its own score; > 0: aligned. with-score uses the
network's score at t_min, without-score the gradient of the model's own density (the two are
equal for an exact score). A difference beyond their errors means the network's score is not
the gradient of the density its PF-ODE defines."""


def run(args: argparse.Namespace) -> int:
    from ..alignment import score_alignment
    from .progress import Progress

    model, shape = setup(args)
    out = output_folder(args.out)
    x_T = latents(model, shape, args.n, args.seed, args.device)
    halving = not args.no_error and args.steps >= 2
    t0 = time.perf_counter()
    bar = Progress(args.steps + (args.steps // 2 if halving else 0), f"score alignment ({args.method})")
    try:
        r = score_alignment(model, x_T, steps=args.steps, method=args.method, probes=args.probes, generator=generator(args.seed + 1),
                            step_halving=halving, callback=bar)  # fmt: skip
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    parts = {"with-score": (r.with_score, r.error("with-score"))}
    if r.without_score is not None:
        parts["without-score"] = (r.without_score, r.error("without-score"))
    if args.method != "both":
        parts = {args.method: parts[args.method]}
    summary = {"command": "align", "settings": settings_of(args), "solver": r.settings["solver"], "note": " ".join(NOTE.split()),
               "nfe_per_sample": nfe_dict(r.nfe), "seconds": round(seconds, 3), "methods": {}}  # fmt: skip
    for m, (val, err) in parts.items():
        frac = float((val > 0).double().mean())
        summary["methods"][m] = {"aligned_fraction": frac, "median_error_nats": None if err is None else float(err.median())}
        shown = "" if err is None else f", median error +- {float(err.median()):.3g}"
        print(f"{m:<14} aligned (value > 0) on {frac:.1%} of {args.n} latents{shown}")
    print(f"{r.nfe} passes per sample, {r.settings['solver']} {args.steps} steps, {seconds:.1f} s")
    if len(parts) == 2:
        summary["agreement"] = agreement(r)
    print(NOTE)
    header = ["latent"]
    for m, (_, err) in parts.items():
        key = m.replace("-", "_")
        header += [f"{key}_dlogp_deps_nats", *([f"{key}_error_nats"] if err is not None else []), f"{key}_aligned"]
    rows = []
    for i in range(args.n):
        row = [i]
        for val, err in parts.values():
            row += [f"{float(val[i]):.6g}", *([f"{float(err[i]):.3g}"] if err is not None else []), int(val[i] > 0)]
        rows.append(row)
    csv_path, json_path = write_table(out, "alignment", header, rows, summary)
    print(f"wrote {csv_path} and {json_path}")
    return 0


def agreement(r) -> dict:
    """Sign agreement, agreement within 2 combined errors and rank correlation of the two measurements, printed and returned."""
    from .figures import correlations

    a, b = r.with_score, r.without_score
    same = float((a.sign() == b.sign()).double().mean())
    within = float(r.agree(2.0).double().mean()) if (r.combined_error() > 0).any() else None
    _, spearman = correlations(a, b)
    if spearman != spearman:
        rank = "rank correlation: n/a (needs at least 3 latents with distinct values)"
    else:
        rank = f"rank correlation {spearman:+.2f}"
    close = "n/a (no error estimate)" if within is None else f"{within:.1%}"
    print(f"agreement of the two measurements: same sign on {same:.1%} of {len(a)} latents; within 2 combined errors on {close}; {rank}")
    return {"same_sign_fraction": same, "within_2_errors_fraction": within, "spearman": None if spearman != spearman else spearman}
