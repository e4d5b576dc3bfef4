"""What every ``diffdensity`` subcommand shares: option parsers, the help formatter, the
model/seed/device options, model setup, latents, progress and result files.

Nothing here imports torch at module level, so that ``diffdensity --help`` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = [
    "CliError",
    "HelpFormatter",
    "positive_int",
    "seed",
    "quantile",
    "finite_float",
    "positive_float",
    "add_model_options",
    "resolve_device",
    "setup",
    "latents",
    "warn",
    "write_csv",
    "write_summary",
]

MODEL_HELP = "builtin:NAME (bundled), diffusers:PATH (local pipeline folder) or gmm:NAME (exact mixture: ring2d, mix64, image16, image32)"
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"


class CliError(Exception):
    """A failure to report as one line ``diffdensity CMD: error: MESSAGE`` with an exit status.

    ``code`` 2: the options are wrong (usage); 1: the inputs or the run failed.
    """

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help, and descriptions/epilogs kept as written."""


# -- option parsers (argparse ``type=``) -----------------------------------------------------


def _number(kind: Callable, s: str, what: str):
    try:
        value = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return value


def positive_int(s: str) -> int:
    """An integer >= 1."""
    value = _number(int, s, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return value


def seed(s: str) -> int:
    """An integer in ``[0, 2^63)`` (a ``torch.Generator`` seed)."""
    value = _number(int, s, "an integer")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2^63), got {s}")
    return value


def quantile(s: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(float, s, "a number in (0, 1)")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {s}")
    return value


def finite_float(s: str) -> float:
    """Any finite number."""
    return _number(float, s, "a number")


def positive_float(s: str) -> float:
    """A finite number > 0."""
    value = _number(float, s, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {s}")
    return value


# -- model, device, latents --------------------------------------------------------------------


def add_model_options(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """``--model``, ``--seed`` and ``--device`` (the same spelling and default in every subcommand)."""
    if model:
        p.add_argument("--model", default="builtin:patches16", help=MODEL_HELP)
    p.add_argument("--seed", type=seed, default=0, help="random seed (latents, noise, probes)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def resolve_device(spec: str):
    """``--device`` -> ``torch.device``; a wrong or unavailable device is a usage error naming the flag."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N", 2) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {spec}: CUDA is not available on this machine; use --device cpu (or auto)", 2)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..{torch.cuda.device_count() - 1}", 2)
    elif device.type != "cpu":
        raise CliError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N", 2)
    return device


def setup(args: argparse.Namespace):
    """Seed torch, resolve ``--device`` and load ``--model``; returns ``(model, event_shape)``."""
    import torch

    from ..zoo import load_model

    args.device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    try:
        model = load_model(args.model, device=args.device)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        raise CliError(f"--model {args.model}: {_one_line(e)}", 2) from e
    shape = getattr(model, "event_shape", None)
    if shape is None:
        raise CliError(f"--model {args.model} does not declare its event shape; cannot draw latents", 2)
    return model, tuple(shape)


def latents(model, shape: Sequence[int], n: int, seed: int, device):
    """``(n, *shape)`` prior latents from a generator seeded with ``seed`` (float64 for exact mixtures)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if hasattr(model, "log_prob") else torch.float32
    return model.schedule.prior_sample((n, *shape), generator=g, dtype=dtype).to(device)


def generator(seed: int):
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    import torch

    return torch.Generator().manual_seed(seed)


def warn(command: str, message: str) -> None:
    """One line ``diffdensity CMD: warning: MESSAGE`` on standard error."""
    print(f"diffdensity {command}: warning: {message}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -- result files ------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """Write a CSV atomically (a temporary file renamed over ``path``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    _atomic_write(path, buf.getvalue())
    return path


def write_summary(path: Path, summary: dict[str, Any]) -> Path:
    """Write a JSON summary (sorted keys, indented) atomically."""
    _atomic_write(path, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
