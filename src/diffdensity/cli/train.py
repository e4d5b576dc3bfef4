"""``diffdensity train``: train a bundled-model preset (resumable)."""

from __future__ import annotations

import argparse

from .common import HelpFormatter, positive_float, positive_int

HELP = "train a bundled-model preset (resumable)"
DESCRIPTION = """\
Train the network of a bundled-model preset. The checkpoint in --out is resumed unless
--restart is given, so an interrupted run continues with the same command.
"""
EPILOG = """\
examples:
  diffdensity train --preset patches16 --out checkpoints/patches16
  diffdensity train --preset patches16 --max-minutes 30   # resume later with the same command
"""


def register(sub) -> argparse.ArgumentParser:
    from ..bundled.training import PRESETS

    r = sub.add_parser("train", help=HELP, description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    r.add_argument("--preset", choices=list(PRESETS), default="patches16", help="training preset")
    r.add_argument("--out", default="checkpoints/patches16", help="output folder (weights, checkpoint, log)")
    r.add_argument("--steps", type=positive_int, default=None, help="override the preset's step count")
    r.add_argument("--max-minutes", type=positive_float, default=None, help="stop after this many minutes (resumable)")
    r.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    r.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    r.set_defaults(func=run)
    return r


def run(args: argparse.Namespace) -> int:
    from ..bundled.training import train

    res = train(args.preset, args.out, resume=not args.restart, max_minutes=args.max_minutes, steps=args.steps, threads=args.threads)
    print(f"step {res.step}/{res.steps}, last loss {res.last_loss:.4f}, {res.total_minutes:.1f} min in total; weights: {res.weights}")
    return 0
