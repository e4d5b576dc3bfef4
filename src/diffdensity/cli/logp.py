"""``diffdensity logp``: log-densities and bits/dim of image files, one CSV row per image.

A thin layer over :func:`diffdensity.scoring.score_dataset`; runs unchanged under
``torchrun`` (one shard per process, merged by rank 0).
"""

from __future__ import annotations

import argparse

from .common import (
    CliError, HelpFormatter, add_model_options, add_preprocess_options, flush_subnormals, output_file, positive_int,
    preprocessing_of, resolve_device,
)  # fmt: skip

HELP = "log-density and bits/dim of image files (CSV; resumable; runs under torchrun)"


def _api_default(name: str):
    """The default of ``score_dataset``'s keyword ``name`` (so that the CLI and the API agree)."""
    import inspect

    from ..scoring import score_dataset

    return inspect.signature(score_dataset).parameters[name].default

_DESCRIPTION = """\
Score PNG/JPEG images with the model's probability-flow ODE: one CSV row per image,
in input order. Unreadable or wrongly sized images are reported and skipped. Runs
unchanged under torchrun (one shard per process, merged by rank 0); rerunning the
command resumes an interrupted job.
"""

_EPILOG = """\
output columns: index, file, sha256 (of the file's bytes), logp_nats, logp_se_nats (standard
error of the Hutchinson part, empty where none), bpd (bits/dim), nfe_forward, nfe_jvp, nfe_vjp
(network passes per image), status (ok | unreadable | wrong_shape | ...), message, check (row
checksum). OUT.meta.json beside the CSV records the settings. Exit status 1 if any input
failed (all others are still scored), 2 for wrong options. Images of another size or mode
are refused unless --resize/--fit/--alpha say how to prepare them (docs/own-images.md).

examples:
  diffdensity logp images/ --out scores.csv
  diffdensity logp a.png b.jpg --model gmm:image16 --steps 32 --seed 1 --out ab.csv
  diffdensity logp test/ --model diffusers:./ddpm-cifar10 --device cuda --amp --out test.csv
  torchrun --nproc_per_node=4 -m diffdensity logp test/ --out test.csv    # 4 GPUs or processes
  (rerun the same command after an interruption: only missing rows are computed)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``logp`` options (defaults those of :func:`diffdensity.scoring.score_dataset`)."""
    from ..bases import BASES
    from ..schedules import GRIDS
    from ..solvers import TABLEAUX

    fixed_solvers = tuple(name for name, tab in TABLEAUX.items() if not tab.adaptive)
    p.add_argument("inputs", nargs="+", help="PNG/JPEG files and folders (a folder expands to its image files, sorted)")
    add_model_options(p)
    p.add_argument("--out", default="out/logp.csv", help="CSV to write (resumed if it exists with the same settings)")
    p.add_argument("--steps", type=positive_int, default=_api_default("steps"), help="PF-ODE steps")
    p.add_argument("--solver", choices=fixed_solvers, default=_api_default("solver"), help="fixed-step ODE solver")
    p.add_argument("--grid", choices=GRIDS, default="log_snr", help="time grid of the steps")
    p.add_argument("--divergence", choices=("hutchinson", "exact"), default="hutchinson", help="divergence estimator")
    p.add_argument("--probes", type=positive_int, default=_api_default("probes"), help="Hutchinson probes per network evaluation, fresh at each (every row carries its standard error)")
    p.add_argument("--probe-basis", choices=BASES, default=_api_default("probe_basis"),
                   help="basis of the Rademacher probes: 'auto' (the image DCT with opponent colours, less variance on natural images), 'pixel' or 'dct'")
    p.add_argument("--draws", type=positive_int, default=_api_default("draws"), help="uniform dequantisation draws per image (averaged)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default: %(default)s, i.e. sized to the free memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for the network (GPU; see docs/scale.md for the tolerance)")
    p.add_argument("--ad-mode", choices=("reverse", "forward", "auto"), default="reverse",
                   help="Jacobian products by reverse mode (fastest for conv nets), forward mode (less memory) or auto")
    p.add_argument("--recursive", action="store_true", help="also take images from sub-folders")
    add_preprocess_options(p)
    p.add_argument("--overwrite", action="store_true", help="discard earlier results at --out instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub) -> argparse.ArgumentParser:
    """Add the ``logp`` command to the ``diffdensity`` command line."""
    p = sub.add_parser("logp", help=HELP, description=_DESCRIPTION, formatter_class=HelpFormatter, epilog=_EPILOG)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status (0 ok, 1 some inputs failed, 2 bad settings)."""
    from ..scoring import score_dataset
    from ..scoring.distributed import ProcessGroup
    from ..zoo import load_model

    output_file(args.out)
    pg = ProcessGroup.join(resolve_device(args.device))
    flush_subnormals(pg.device)
    try:
        try:
            model = load_model(args.model, device=pg.device)
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise CliError(f"--model {args.model}: cannot load the model: {' '.join(str(e).split())}", 2) from e
        model_id = args.model
        info = getattr(model, "info", None)
        digest = info.get("sha256") if isinstance(info, dict) else None
        if digest:
            model_id += f"@sha256:{digest[:16]}"
        try:
            result = score_dataset(
                model, args.inputs, args.out, steps=args.steps, solver=args.solver, grid=args.grid,
                divergence=args.divergence, probes=args.probes, probe_basis=args.probe_basis, draws=args.draws, seed=args.seed,
                batch_size=args.batch_size, device=pg.device, amp=args.amp, compile=args.compile, ad_mode=args.ad_mode,
                recursive=args.recursive, preprocess=preprocessing_of(args), overwrite=args.overwrite, model_id=model_id, progress=not args.quiet,
            )  # fmt: skip
        except ValueError as e:
            if pg.rank == 0:
                raise CliError(" ".join(str(e).split()), 2) from e
            return 2
        return result.exit_code
    finally:
        pg.close()
