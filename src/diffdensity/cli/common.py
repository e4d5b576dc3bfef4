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
import os
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
    "add_preprocess_options",
    "preprocessing_of",
    "resolve_device",
    "flush_subnormals",
    "setup",
    "require_images",
    "latents",
    "warn",
    "output_folder",
    "output_file",
    "remove_stale",
    "settings_of",
    "nfe_columns",
    "nfe_dict",
    "write_table",
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


def count(s: str) -> int:
    """An integer >= 0 (0: none)."""
    value = _number(int, s, "0 or a positive integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {s!r}")
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


def add_preprocess_options(p: argparse.ArgumentParser) -> None:
    """``--resize``, ``--fit`` and ``--alpha``: how image files are brought to the model's shape
    (:mod:`diffdensity.preprocess`; the defaults change no pixel and refuse what does not fit)."""
    from ..preprocess import ALPHAS, FITS, RESIZE_FILTERS

    g = p.add_argument_group("preprocessing of image files (docs/own-images.md)")
    g.add_argument("--resize", choices=RESIZE_FILTERS, default=None,
                   help="rescale images of another size with this filter (default: refuse them)")
    g.add_argument("--fit", choices=FITS, default="crop", help="with --resize: keep the aspect and cut the centre (crop) or scale each side (stretch)")
    g.add_argument("--alpha", choices=ALPHAS, default="refuse",
                   help="transparent pixels: refuse, or composite onto white or black (opaque alpha is always dropped)")


def preprocessing_of(args: argparse.Namespace):
    """The :class:`~diffdensity.preprocess.Preprocessing` chosen by the flags of :func:`add_preprocess_options`."""
    from ..preprocess import Preprocessing

    return Preprocessing(resize=args.resize, fit=args.fit, alpha=args.alpha)


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


def flush_subnormals(device) -> None:
    """On the CPU, flush subnormal floats to zero (``torch.set_flush_denormal``).

    Subnormals (``|x| < 1.2e-38`` in float32) make CPU arithmetic 10-30x slower; the
    bundled U-Net produces them under density guidance at low q. Flushing them changes
    values by less than 1e-38, far below every printed digit.
    """
    import torch

    if torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)


def setup(args: argparse.Namespace):
    """Seed torch, resolve ``--device``, flush subnormal floats on the CPU and load ``--model``; returns ``(model, event_shape)``."""
    import torch

    from ..zoo import load_model

    args.device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    flush_subnormals(args.device)
    try:
        model = load_model(args.model, device=args.device)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        raise CliError(f"--model {args.model}: {_one_line(e)}", 2) from e
    shape = getattr(model, "event_shape", None)
    if shape is None:
        raise CliError(f"--model {args.model} does not declare its event shape; cannot draw latents", 2)
    return model, tuple(shape)


def require_images(args: argparse.Namespace, shape: tuple[int, ...]) -> None:
    """A usage error naming ``--model`` unless the model's samples are images ``(C, H, W)``, C = 1 or 3."""
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise CliError(f"--model {args.model} has event shape {shape}; {args.command} needs an image model (C, H, W) with C = 1 or 3, "
                       "e.g. --model builtin:patches16 or gmm:image16", 2)


def latents(model, shape: Sequence[int], n: int, seed: int, device):
    """``(n, *shape)`` prior latents in the model's dtype, on ``device``.

    Latent ``i`` is drawn on the CPU from its own generator, seeded by ``(seed, i)``:
    the same on any device, and independent of ``n`` (``-n 2`` gives the first two
    latents of ``-n 4``).
    """
    import torch

    from ..models import placement

    _, dtype = placement(model)
    rows = [model.schedule.prior_sample((1, *shape), generator=generator(latent_seed(seed, i)), dtype=dtype) for i in range(n)]
    return torch.cat(rows).to(device)


def latent_seed(seed: int, i: int) -> int:
    """The seed of latent ``i`` under ``--seed seed`` (a fixed mix of the two, in ``[0, 2^63)``)."""
    return (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) % (2**63)


def generator(seed: int):
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    import torch

    return torch.Generator().manual_seed(seed)


def warn(command: str, message: str) -> None:
    """One line ``diffdensity CMD: warning: MESSAGE`` on standard error."""
    print(f"diffdensity {command}: warning: {message}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -- output folder and result files -------------------------------------------------------------

NFE_HEADER = ["nfe_forward", "nfe_jvp", "nfe_vjp"]
"""Per-sample network passes by kind (plain evaluations, Jacobian-vector and vector-Jacobian products)."""


def nfe_columns(nfe) -> list[int]:
    """``[forward, jvp, vjp]`` of an :class:`~diffdensity.models.NFE` (the columns of :data:`NFE_HEADER`)."""
    return [int(nfe.forward), int(nfe.jvp), int(nfe.vjp)]


def nfe_dict(nfe) -> dict[str, int]:
    """The pass counts of an :class:`~diffdensity.models.NFE` as a JSON object."""
    return dict(zip(("forward", "jvp", "vjp"), nfe_columns(nfe)))


def output_folder(flag_value: str) -> Path:
    """``--out`` as a folder that exists and is writable; anything else is a usage error naming ``--out``."""
    out = Path(flag_value)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is an existing file; give a folder (it is created if missing)", 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--out {out}: cannot create the folder ({e.strerror or e}); choose a writable folder", 2) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CliError(f"--out {out} is not writable; choose a writable folder", 2)
    return out


def output_file(flag_value: str, suffix: str = ".csv") -> Path:
    """``--out`` as a file path whose folder exists (created if missing) and is writable; a usage error naming ``--out`` otherwise."""
    out = Path(flag_value)
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give a file path, e.g. --out {out / ('logp' + suffix)}", 2)
    if out.suffix.lower() != suffix:
        raise CliError(f"--out {out}: give a {suffix} file name (e.g. --out {out.with_suffix(suffix)}), so that no other file is replaced", 2)
    if str(out.parent) not in ("", "."):
        output_folder(str(out.parent))
    if out.exists() and not os.access(out, os.W_OK):
        raise CliError(f"--out {out} is not writable; choose another file", 2)
    return out


def remove_stale(out: Path, pattern: str, keep: set[str]) -> int:
    """Delete files in ``out`` matching ``pattern`` (a glob of this command's own outputs) not in ``keep``."""
    gone = 0
    for f in out.glob(pattern):
        if f.name not in keep and f.is_file():
            f.unlink()
            gone += 1
    return gone


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options of a command as JSON-ready values (what produced the results)."""
    return {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v)) for k, v in vars(args).items() if k not in ("func", "debug")}


def write_table(out: Path, stem: str, header: list[str], rows: list[list], summary: dict[str, Any]) -> tuple[Path, Path]:
    """``out/stem.csv`` (the rows) and, beside it, ``out/stem.json`` (the summary, with the CSV's name and columns)."""
    csv_path = write_csv(out / f"{stem}.csv", header, rows)
    summary = {"csv": csv_path.name, "columns": header, "rows": len(rows), **summary}
    return csv_path, write_summary(out / f"{stem}.json", summary)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """Write a CSV atomically (readers see the old file or the new one)."""
    from .._files import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, buf.getvalue())
    return path


def write_summary(path: Path, summary: dict[str, Any]) -> Path:
    """Write a JSON summary (sorted keys, indented) atomically; non-finite numbers become null."""
    from .._files import atomic_write

    atomic_write(path, json.dumps(_finite(summary), indent=2, sort_keys=True, default=str) + "\n")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
