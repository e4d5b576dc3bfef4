"""``diffdensity detail``: log-density versus image detail (PNG size), on model samples or images."""

from __future__ import annotations

import argparse
import math
import sys

from .common import (
    CliError,
    HelpFormatter,
    add_model_options,
    add_preprocess_options,
    generator,
    latents,
    output_folder,
    positive_int,
    preprocessing_of,
    settings_of,
    require_images,
    setup,
    warn,
    write_table,
)

HELP = "log-density versus image detail (PNG size): correlations and a scatter plot"
DESCRIPTION = """\
Relate log-density to the amount of detail in an image, measured as the size of its
maximally compressed PNG: on model samples drawn with density guidance across quantiles,
or on your own images (--images). Prints Pearson and Spearman correlations and writes
detail.csv and detail.png.
"""
EPILOG = """\
examples:
  diffdensity detail -n 64                  # model samples across quantiles
  diffdensity detail --images held_out/     # an image folder
"""
QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_N = 64


def check_ignored(args: argparse.Namespace) -> None:
    """Warn about flags that this combination does not use."""
    if args.images and args.n is not None:
        warn("detail", f"-n {args.n} is ignored with --images (the images are scored instead of model samples)")
    if not args.images and (args.resize is not None or args.fit != "crop" or args.alpha != "refuse"):
        warn("detail", "--resize, --fit and --alpha apply to --images only; they are ignored for model samples")
    elif args.resize is None and args.fit != "crop":
        warn("detail", f"--fit {args.fit} is ignored without --resize (images must already have the model's size)")


def register(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("detail", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_options(t)
    t.add_argument("--images", nargs="*", default=None, help="image files or folders (default: sample from the model)")
    t.add_argument("-n", "--n", type=positive_int, default=None, help="model samples when no images are given, split evenly over 5 quantiles (none given: 64)")
    t.add_argument("--steps", type=positive_int, default=32, help="solver steps")
    t.add_argument("--out", default="out/detail", help="output folder (detail.csv, detail.png)")
    add_preprocess_options(t)
    t.set_defaults(func=run)
    return t


def _score_images(args, model, shape):
    import torch

    from ..likelihood import bits_per_dim
    from ..scoring.inputs import list_images

    prep = preprocessing_of(args)
    names, arrays, notes = [], [], []
    try:
        files = list_images(args.images)
    except FileNotFoundError as e:
        raise CliError(f"--images: {e}") from None
    for f in files:
        try:
            with open(f, "rb") as fh:
                arr, status, msg = prep.decode(fh.read(), shape)
        except OSError as e:
            arr, status, msg = None, "unreadable", f"{type(e).__name__}: {e.strerror or e}"
        if arr is None:
            print(f"skipping {f} ({status}): {msg}", file=sys.stderr)
            continue
        notes.append(msg)
        names.append(f)
        arrays.append(torch.from_numpy(arr))
    changed = sum(map(bool, notes))
    if changed:
        print(f"{changed} of {len(names)} images preprocessed (resize {args.resize}, fit {args.fit}, alpha {args.alpha}); see detail.csv")
    if not arrays:
        raise CliError(f"--images: no readable {shape} images in {' '.join(args.images)}")
    u8 = torch.stack(arrays)
    res = bits_per_dim(model, u8, steps=args.steps, generator=generator(args.seed))  # the API's dequantisation draws
    return names, u8, res.bpd, notes


def _sample_quantiles(args, model, shape):
    import torch

    from ..likelihood import logp_to_bpd
    from ..sampling import sample
    from .figures import to_uint8
    from .progress import run_with_progress

    per = max(1, (args.n or DEFAULT_N) // len(QUANTILES))
    xs, lps, names = [], [], []
    for k, q in enumerate(QUANTILES):
        x_T = latents(model, shape, per, args.seed + k, args.device)
        r = run_with_progress(sample, f"q={q:g}", args.steps, model=model, x_T=x_T, method="density-guidance", q=q,
                              generator=generator(args.seed + 100 + k))
        xs.append(r.x)
        lps.append(r.logp)
        names += [f"q{q:g}_{i}" for i in range(per)]
    return names, to_uint8(torch.cat(xs)), logp_to_bpd(torch.cat(lps), math.prod(shape)), [""] * len(names)


def run(args: argparse.Namespace) -> int:
    """Log-density versus PNG size, on model samples across quantiles or on an image folder."""
    from .figures import correlations, plot_detail, png_size

    check_ignored(args)
    model, shape = setup(args)
    require_images(args, shape)
    out = output_folder(args.out)
    names, u8, bpd, notes = (_score_images if args.images else _sample_quantiles)(args, model, shape)
    size = png_size(u8)
    pearson, spearman = correlations(bpd, size)
    if pearson != pearson:
        print(f"{len(size)} image(s): correlations need at least 3 images with distinct values; none reported")
    else:
        print(f"{len(size)} images: log-density vs PNG size: Pearson {-pearson:+.3f}, Spearman {-spearman:+.3f} "
              "(negative: more likely images carry less detail)")
    header = ["image", "bits_per_dim", "png_bytes", "preprocessing"]
    rows = [[n, f"{float(b):.6f}", int(s), note] for n, b, s, note in zip(names, bpd, size, notes)]
    finite = pearson == pearson
    summary = {"command": "detail", "settings": settings_of(args), "images": len(rows),
               "logp_vs_png_bytes": {"pearson": -pearson if finite else None, "spearman": -spearman if finite else None}}
    csv_path, json_path = write_table(out, "detail", header, rows, summary)
    plot_detail(out / "detail.png", bpd, size, spearman)
    print(f"wrote {csv_path}, {json_path} and {out / 'detail.png'}")
    return 0
