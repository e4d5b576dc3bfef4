"""Dataset scoring: :func:`score_dataset` checks the options, plans the work, scores and merges."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import _validation as v
from ..likelihood import logp_to_bpd
from ..schedules import GRIDS
from ..solvers import TABLEAUX
from .accel import prepare_model
from .batches import Batches, Prefetch, Scorer
from .distributed import ProcessGroup
from .inputs import FileSource, Source, TensorSource, first_image_shape, list_images
from .plan import FORMAT, plan
from .result import EvaluationResult, report
from .shards import PartWriter, ShardedCSV

__all__ = ["score_dataset", "COLUMNS", "FIXED_SOLVERS"]

COLUMNS = ["index", "file", "logp", "bpd", "nfe", "status", "message"]
FIXED_SOLVERS = tuple(name for name, tab in TABLEAUX.items() if not tab.adaptive)


def score_dataset(
    model,
    data: Tensor | str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    steps: int = 64,
    solver: str = "heun",
    grid: str = "log_snr",
    divergence: str = "hutchinson",
    probes: int = 1,
    noise: str = "rademacher",
    draws: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    amp: bool | torch.dtype = False,
    compile: bool = False,
    ad_mode: str = "reverse",
    recursive: bool = False,
    overwrite: bool = False,
    model_id: str | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> EvaluationResult:
    """Score a dataset of 8-bit images and write one CSV row per input to ``out``, in input order.

    A collective call: under ``torchrun`` (or in a process group the caller
    initialised) every rank calls it with the same arguments and scores a disjoint
    strided shard; otherwise it runs in one process. Each row holds the PF-ODE
    log-density (docs/math.md s.3a) of the uniformly dequantised input and its bits/dim
    (s.7); see ``docs/scale.md`` for the file format and the resumption rules.

    Args:
        model: a score model (``.score``, ``.schedule`` and ``.event_shape`` ``(C, H, W)``).
        data: image files and folders (PNG/JPEG; a folder expands to its image files
            in sorted order), or an integer tensor ``(N, *event_shape)`` in ``[0, 255]``.
        out: the CSV to write; ``out.meta.json`` records the settings and ``out.parts/``
            holds the per-rank rows while a job runs; earlier results are resumed.
        steps, solver, grid: the fixed-step PF-ODE solve (``euler``, ``heun``, ``midpoint``, ``rk4``).
        divergence: ``"hutchinson"`` (``probes`` probes, ``noise`` ``"rademacher"`` or
            ``"gaussian"``, fresh every step) or ``"exact"`` (D Jacobian products).
        draws: dequantisation draws per input; ``logp`` is their average.
        seed: with each sample's key, determines all noise (dequantisation and probes).
        batch_size: inputs per batch; ``None`` sizes batches to the free memory.
        device: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` (``cuda:LOCAL_RANK``) or a device.
        dtype: dtype of the network input (log-densities accumulate in float64).
        amp: ``torch.autocast`` for the network (``True``: bfloat16, or a dtype).
        compile: ``torch.compile`` the network (batches are padded to one size).
        ad_mode: Jacobian products by ``"reverse"`` mode (fastest for conv nets),
            ``"forward"`` (less memory) or ``"auto"``; changes results only by rounding.
        overwrite: discard earlier results at ``out`` instead of resuming.
        model_id: names the model in ``out.meta.json`` (default ``repr(model)``).
        progress: tqdm bar on rank 0. verbose: summary on stderr (rank 0).

    Returns:
        :class:`EvaluationResult`; its ``exit_code`` is 1 when some input failed.
        Failed inputs are reported, never fatal; settings that conflict with an
        earlier run at ``out`` raise ``ValueError`` (pass ``overwrite=True``).
    """
    settings, amp_dtype = _settings(
        model, steps=steps, solver=solver, grid=grid, divergence=divergence, probes=probes, noise=noise, draws=draws,
        seed=seed, batch_size=batch_size, dtype=dtype, amp=amp, ad_mode=ad_mode,
    )  # fmt: skip
    pg = ProcessGroup.join(device)
    try:
        return _evaluate(
            pg, model, data, Path(out), settings, dtype=dtype, amp=amp_dtype, ad_mode=ad_mode, batch_size=batch_size,
            compile=compile, recursive=recursive, overwrite=overwrite, model_id=model_id or repr(model),
            progress=progress, verbose=verbose,
        )  # fmt: skip
    finally:
        pg.close()


def _settings(model, *, steps, solver, grid, divergence, probes, noise, draws, seed, batch_size, dtype, amp, ad_mode):
    """Check the options; the settings recorded with the results, and the autocast dtype (or ``None``)."""
    v.check_model(model)
    v.check_positive_int(steps, "steps")
    if solver not in FIXED_SOLVERS:
        why = " (adaptive: its step sizes depend on the whole batch, so results would depend on the batching)"
        why = why if solver in TABLEAUX else ""
        raise ValueError(f"solver {solver!r} is not a fixed-step solver{why}; expected one of {FIXED_SOLVERS}")
    v.check_choice(grid, "grid", GRIDS)
    v.check_choice(divergence, "divergence", ("hutchinson", "exact"))
    v.check_positive_int(probes, "probes")
    v.check_choice(noise, "noise", ("rademacher", "gaussian"))
    v.check_positive_int(draws, "draws")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    if batch_size is not None:
        v.check_positive_int(batch_size, "batch_size")
    v.check_choice(ad_mode, "ad_mode", ("reverse", "forward", "auto"))
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    amp_dtype = (torch.bfloat16 if amp is True else amp) if amp is not False else None
    if amp_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp must be False, True, torch.bfloat16 or torch.float16, got {amp!r}")
    settings = dict(
        steps=steps, solver=solver, grid=grid, divergence=divergence, probes=probes, noise=noise, draws=draws, seed=seed,
        dtype=str(dtype).replace("torch.", ""), amp=None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
    )  # fmt: skip
    return settings, amp_dtype


def _make_source(pg: ProcessGroup, model, data, recursive: bool) -> Source:
    """The inputs; rank 0 lists the files and every rank uses its list (same indices everywhere)."""
    event_shape = getattr(model, "event_shape", None)
    if isinstance(data, Tensor):
        return TensorSource(data, tuple(event_shape) if event_shape is not None else tuple(data.shape[1:]))
    listing = None
    if pg.rank == 0:
        files = list_images(data, recursive=recursive)
        if event_shape is None:
            event_shape = first_image_shape(files)
        listing = (files, tuple(event_shape))
    files, event_shape = pg.broadcast(listing)
    if len(event_shape) != 3:
        raise ValueError(f"the model's event shape {tuple(event_shape)} is not an image shape (C, H, W)")
    return FileSource(files, event_shape)


def _shared_plan(pg: ProcessGroup, store: ShardedCSV, source: Source, settings: dict, overwrite: bool):
    """Rank 0 plans; every rank gets the list of indices to score (or the reason it cannot start)."""
    fingerprints = pg.gather(source.fingerprint) if isinstance(source, TensorSource) else None
    planned = plan(store, source, settings, overwrite, fingerprints) if pg.rank == 0 else None
    shared = pg.broadcast(None if planned is None else {k: planned[k] for k in ("todo", "error", "value_error") if k in planned})
    if "error" in shared:
        if planned is not None:
            raise planned["exc"]
        raise (ValueError if shared["value_error"] else RuntimeError)(f"rank 0 could not start: {shared['error']}")
    return planned, shared["todo"]


def _evaluate(
    pg, model, data, out, settings, *, dtype, amp, ad_mode, batch_size, compile, recursive, overwrite, model_id, progress, verbose
):
    source = _make_source(pg, model, data, recursive)
    settings = dict(settings, model=model_id, data=source.fingerprint, format=FORMAT)
    store = ShardedCSV(out, COLUMNS)
    planned, todo = _shared_plan(pg, store, source, settings, overwrite)
    mine = todo[pg.rank :: pg.world_size]
    scorer = Scorer(
        prepare_model(model, pg.device, amp=amp, compile=compile), source.event_shape,
        steps=settings["steps"], solver=settings["solver"], grid=settings["grid"], divergence=settings["divergence"],
        probes=settings["probes"], noise=settings["noise"], draws=settings["draws"], seed=settings["seed"], dtype=dtype,
        ad_mode=ad_mode,
    )  # fmt: skip
    batches = Batches(scorer, pg.device, batch_size=batch_size, n_todo=len(mine), local_world=pg.local_world_size, compile=compile)
    pg.barrier()  # a common start for the timing
    start = time.perf_counter()
    writer = store.open_part(pg.rank)
    try:
        my_rows, computed = _score_shard(source, mine, batches, writer, progress=progress and pg.rank == 0, world=pg.world_size)
    finally:
        writer.close()
    gathered = pg.gather(dict(rows=my_rows, computed=computed))
    summary, all_rows = None, []
    if pg.rank == 0:
        seconds = time.perf_counter() - start
        summary, all_rows = _merge(store, source, planned, gathered, settings, pg.world_size, verbose=verbose)
        summary.update(seconds=seconds, batch_size=batches.size)
    summary = pg.broadcast(summary)  # the merged output is on disk: part files are redundant now
    writer.path.unlink(missing_ok=True)
    try:
        store.parts_dir.rmdir()
    except OSError:
        pass
    return EvaluationResult(
        out=store.out, n_inputs=len(source), n_ok=summary["n_ok"], computed=summary["computed"],
        resumed=summary["resumed"], failures=summary["failures"], seconds=summary["seconds"],
        world_size=pg.world_size, batch_size=summary["batch_size"], settings=settings, rows=all_rows,
    )  # fmt: skip


def _score_shard(source: Source, mine: list[int], batches: Batches, writer: PartWriter, *, progress: bool, world: int):
    """Score this rank's inputs batch by batch, appending each batch's rows to ``writer``."""
    from tqdm.auto import tqdm

    desc = f"logp rank 0/{world}" if world > 1 else "logp"
    my_rows: list[dict[str, str]] = []
    computed = 0
    with tqdm(total=len(mine), unit="img", dynamic_ncols=True, disable=not progress, desc=desc) as bar:
        with ThreadPoolExecutor(max_workers=1) as pool:  # decode the next batch while this one runs
            prefetch = Prefetch(pool, source, mine, batches)
            pending = prefetch.submit()
            while pending is not None:
                images, ok, failures = pending.result()
                measuring = batches.measuring and bool(ok)  # the batch size is known after this batch
                if not measuring:
                    pending = prefetch.submit()
                results: dict[int, tuple[float, int]] = {}
                if ok:
                    logp, nfe = batches.score(images, ok)
                    results = {i: (lp, nfe) for i, lp in zip(ok, logp.tolist())}
                if measuring:
                    pending = prefetch.submit()
                rows = _rows(source, results, failures, batches.scorer.dim)
                writer.write_rows(rows)
                my_rows += [{k: str(val) for k, val in r.items()} for r in rows]
                computed += len(results)
                bar.update(len(rows))
    return my_rows, computed


def _fmt(x: float) -> str:
    return repr(float(x))


def _rows(source: Source, results: dict[int, tuple[float, int]], failures: dict[int, tuple[str, str]], dim: int) -> list[dict]:
    """The CSV rows of a batch, in index order: scored inputs and failed ones."""
    rows = []
    for i in sorted(list(results) + list(failures)):
        if i in results:
            lp, nfe = results[i]
            rows.append(dict(index=i, file=source.names[i], logp=_fmt(lp), bpd=_fmt(logp_to_bpd(lp, dim)), nfe=nfe, status="ok", message=""))
        else:
            status, message = failures[i]
            message = " ".join(message.split())  # one line per row, always
            rows.append(dict(index=i, file=source.names[i], logp="", bpd="", nfe=0, status=status, message=message))
    return rows


def _merge(store: ShardedCSV, source: Source, planned: dict, gathered: list, settings: dict, world: int, *, verbose: bool):
    """Rank 0: merge earlier and fresh rows into the output, record the settings, report."""
    fresh = [r for g in gathered for r in g["rows"]]
    fresh_idx = {int(r["index"]) for r in fresh}
    resumed = [r for i, r in planned["done"].items() if i not in fresh_idx]
    store.merge(resumed + fresh)
    all_rows = sorted(resumed + fresh, key=lambda r: int(r["index"]))
    failures = [(int(r["index"]), r["file"], r["status"], r["message"]) for r in all_rows if r["status"] != "ok"]
    n_ok = len(all_rows) - len(failures)
    summary: dict[str, Any] = dict(n_ok=n_ok, computed=sum(g["computed"] for g in gathered), resumed=len(resumed), failures=failures)
    bpds = [float(r["bpd"]) for r in all_rows if r["status"] == "ok"]
    mean_bpd = sum(bpds) / len(bpds) if bpds else None
    store.write_meta(dict(
        format=FORMAT, settings=settings, n_inputs=len(source), state="complete", n_ok=n_ok,
        n_failed=len(failures), mean_bpd=mean_bpd, world_size=world,
    ))  # fmt: skip
    store.remove_parts()
    if verbose:
        report(store.out, len(source), summary, bpds, planned.get("skipped", 0))
    return summary, all_rows
