"""The ``diffdensity`` command line: a thin layer over the library's functions.

One module per subcommand (``demo``, ``sample``, ``logp``, ``align``, ``detail``,
``train``), each with ``register(subparsers)`` and ``run(args)``; :mod:`.common` holds
the option parsers, the help formatter, the model/seed/device options and the result
files they share, :mod:`.figures` the plots. Only the subcommand being run is fully
built and nothing heavy is imported before it runs, so ``diffdensity --help`` and
``--version`` return fast.

Errors are one line ``diffdensity CMD: error: ...`` naming the flag and the fix; the
exit status is 2 for wrong options and 1 for inputs or runs that failed (``--debug``
shows the traceback instead).
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .common import CliError, HelpFormatter

__all__ = ["main", "build_parser"]

VERSION = "0.1.0"

# name -> (module, one-line help); the help is repeated here so that the top-level
# ``--help`` needs no subcommand's imports.
COMMANDS = {
    "demo": ("demo", "the main demonstration: guided samples, log-density paths, a table"),
    "sample": ("sample", "draw samples with any method, with their log-densities"),
    "logp": ("logp", "log-density and bits/dim of image files (CSV; resumable; runs under torchrun)"),
    "align": ("align", "score-alignment report for prior latents"),
    "detail": ("detail", "log-density versus image detail (PNG size): correlations and a scatter plot"),
    "train": ("train", "train a bundled-model preset (resumable)"),
}

EPILOG = """\
examples:
  diffdensity demo --out out/demo
  diffdensity sample --method density-guidance --q 0.9 -n 16
  diffdensity logp images/ --out logp.csv
  diffdensity detail -n 64
  diffdensity train --preset patches16

diffdensity COMMAND --help shows each command's options, defaults and examples.
"""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _register(sub, name: str) -> argparse.ArgumentParser:
    module, _ = COMMANDS[name]
    return import_module(f".{module}", __name__).register(sub)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that subcommand is fully built (the others list their help;
    ``only=""`` builds none, which is all the top-level ``--help`` and ``--version`` need)."""
    p = Parser(
        prog="diffdensity",
        description="Measure and steer the log-density of samples in diffusion and flow models.",
        formatter_class=HelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--version", action=_Version, nargs=0, help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help) in COMMANDS.items():
        if only is None or name == only:
            c = _register(sub, name)
            c.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        else:
            sub.add_parser(name, help=help)
    return p


class _Version(argparse.Action):
    """``--version``, looking the version up only when asked (package metadata is slow to scan)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"diffdensity {_version()}")
        parser.exit(0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffdensity")
    except PackageNotFoundError:
        return VERSION


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``diffdensity ARGS``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(only=_command_of(argv) or "").parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        if args.debug:
            raise
        print(f"diffdensity {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"diffdensity {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        if args.debug:
            raise
        code = 2 if isinstance(e, (ValueError, TypeError)) else 1
        print(f"diffdensity {args.command}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
