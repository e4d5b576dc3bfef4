"""Dataset scoring: :func:`score_dataset` checks the options, plans the work, scores and merges."""

from __future__ import annotations

import math
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .. import _validation as v
from ..likelihood import DEFAULT_PROBES, DEFAULT_SOLVER, DEFAULT_STEPS, logp_to_bpd
from ..schedules import GRIDS
from ..solvers import TABLEAUX
from .accel import prepare_model
from .batches import Batches, Prefetch, Scored, Scorer
from .distributed import ProcessGroup
from .inputs import Batch, FileSource, Source, TensorSource, first_image_shape, list_images
from .plan import FORMAT, Plan, check_output, plan
from .result import EvaluationResult, report
from .rows import COLUMNS, escape_name, row_key, seal, settings_digest
from .shards import PartWriter, ShardedCSV

__all__ = ["score_dataset", "FIXED_SOLVERS"]
FIXED_SOLVERS = tuple(name for name, tab in TABLEAUX.items() if not tab.adaptive)
#: ``probe_basis`` choices and how the settings record them. Scored inputs are images, for
#: which ``"auto"`` is the DCT, so the two share one record: the one results files have
#: carried since probes were rotated (they resume).
_DCT_RECORD = "image DCT with opponent colours for (C, H, W) inputs, pixels otherwise"
PROBE_BASES = {"auto": _DCT_RECORD, "dct": _DCT_RECORD, "pixel": "pixels"}


def _basis_name(record: str) -> str:
    return next(name for name, text in PROBE_BASES.items() if text == record)


def score_dataset(
    model,
    data: Tensor | str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    steps: int = DEFAULT_STEPS,
    solver: str = DEFAULT_SOLVER,
    grid: str = "log_snr",
    divergence: str = "hutchinson",
    probes: int = DEFAULT_PROBES,
    noise: str = "rademacher",
    probe_basis: str = "auto",
    draws: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    amp: bool | torch.dtype = False,
    compile: bool = False,
    ad_mode: str = "reverse",
    recursive: bool = False,
    preprocess: Any = None,
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
        steps, solver, grid: the fixed-step PF-ODE solve (``euler``, ``heun``, ``midpoint``, ``rk4``;
            default the likelihood defaults, RK4 with 24 logSNR steps).
        divergence, probe_basis: ``"hutchinson"`` (``probes`` probes, ``noise`` ``"rademacher"`` or ``"gaussian"``, fresh
            every step, in the ``probe_basis`` ``"auto"`` = ``"dct"`` or ``"pixel"``, :mod:`diffdensity.bases`) or ``"exact"``.
        draws: dequantisation draws per input (``logp`` is their average). seed: with each sample's key, determines all noise.
        batch_size: inputs per batch; ``None`` sizes batches to the free memory.
        device: ``None``/``"auto"``, ``"cpu"``, ``"cuda"`` (``cuda:LOCAL_RANK``) or a device.
        dtype: dtype of the network input (log-densities accumulate in float64).
        amp: ``torch.autocast`` for the network (``True``: bfloat16, or a dtype).
        compile: ``torch.compile`` the network (batches are padded to one size).
        ad_mode: Jacobian products by ``"reverse"`` mode (fastest for conv nets),
            ``"forward"`` (less memory) or ``"auto"``; changes results only by rounding.
        preprocess: a :class:`~diffdensity.preprocess.Preprocessing` for image files
            (recorded in the settings when it changes pixels); ``None``: its defaults
            (greyscale to RGB, opaque alpha dropped, other sizes refused with the fix).
        overwrite: discard earlier results at ``out`` instead of resuming.
        model_id: names the model in ``out.meta.json`` (default ``repr(model)``).
        progress: tqdm bar on rank 0. verbose: summary on stderr (rank 0).

    Returns:
        :class:`EvaluationResult`; its ``exit_code`` is 1 when some input failed.
        Failed inputs are reported, never fatal; settings that conflict with an
        earlier run at ``out`` raise ``ValueError`` (pass ``overwrite=True``).
    """
    batch_size = None if batch_size is None else v.check_positive_int(batch_size, "batch_size")
    settings, amp_dtype = _settings(
        model, steps=steps, solver=solver, grid=grid, divergence=divergence, probes=probes, noise=noise, probe_basis=probe_basis,
        draws=draws, seed=seed, dtype=dtype, amp=amp, ad_mode=ad_mode,
    )  # fmt: skip
    decode = _decoder(preprocess, data, settings)
    pg = ProcessGroup.join(device)
    try:
        return _evaluate(
            pg, model, data, Path(out), settings, dtype=dtype, amp=amp_dtype, ad_mode=ad_mode, batch_size=batch_size,
            compile=compile, listing=(recursive, decode), overwrite=overwrite, model_id=model_id or repr(model),
            progress=progress, verbose=verbose,
        )  # fmt: skip
    finally:
        pg.close()


def _decoder(preprocess: Any, data: Any, settings: dict) -> Callable:
    """The image decoder of the file inputs; a preprocessing that changes pixels joins the settings."""
    from ..preprocess import Preprocessing

    if preprocess is None:
        preprocess = Preprocessing()  # the documented defaults: greyscale replicated, opaque alpha dropped, nothing resized
    if not isinstance(preprocess, Preprocessing):
        raise TypeError(f"preprocess must be a diffdensity.preprocess.Preprocessing or None, got {type(preprocess).__name__}")
    if isinstance(data, Tensor) and preprocess != Preprocessing():
        raise ValueError("preprocess applies to image files; a data tensor must already have the model's shape")
    if preprocess != Preprocessing():
        settings["preprocess"] = preprocess.settings()
    return preprocess.decode


def _settings(model, *, steps, solver, grid, divergence, probes, noise, probe_basis, draws, seed, dtype, amp, ad_mode):
    """Check the options; the settings recorded with the results, and the autocast dtype (or ``None``)."""
    v.check_model(model)
    steps = v.check_positive_int(steps, "steps")
    if solver not in FIXED_SOLVERS:
        why = " (adaptive: its step sizes depend on the whole batch, so results would depend on the batching)"
        why = why if solver in TABLEAUX else ""
        raise ValueError(f"solver {solver!r} is not a fixed-step solver{why}; expected one of {FIXED_SOLVERS}")
    v.check_choice(grid, "grid", GRIDS)
    v.check_choice(divergence, "divergence", ("hutchinson", "exact"))
    probes = v.check_positive_int(probes, "probes")
    v.check_choice(noise, "noise", ("rademacher", "gaussian"))
    v.check_choice(probe_basis, "probe_basis", tuple(PROBE_BASES))
    draws = v.check_positive_int(draws, "draws")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    seed = int(seed)
    v.check_choice(ad_mode, "ad_mode", ("reverse", "forward", "auto"))
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    amp_dtype = (torch.bfloat16 if amp is True else amp) if amp is not False else None
    if amp_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp must be False, True, torch.bfloat16 or torch.float16, got {amp!r}")
    settings = dict(
        steps=steps, solver=solver, grid=grid, divergence=divergence, probes=probes, probes_fresh="every call",
        probe_basis=PROBE_BASES[probe_basis], noise=noise,
        draws=draws, seed=seed, dtype=str(dtype).replace("torch.", ""), amp=None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
    )  # fmt: skip
    return settings, amp_dtype


def _on_rank0(pg: ProcessGroup, fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0, its result on every rank; its exception raised on every rank."""
    value, error = None, None
    if pg.rank == 0:
        try:
            value = fn()
        except Exception as e:  # tell the other ranks instead of leaving them waiting
            error = e
    shared = pg.broadcast(None if pg.rank != 0 else (None if error else value, _describe(error)))
    if error is not None:
        raise error
    if shared[1] is not None:
        kind, message = shared[1]
        raise kind(f"rank 0 could not start: {message}")
    return value if pg.rank == 0 else shared[0]


def _describe(e: Exception | None):
    if e is None:
        return None
    kind = next(k for k in (ValueError, FileNotFoundError, OSError, RuntimeError, Exception) if isinstance(e, k))
    return kind, str(e)


def _make_source(pg: ProcessGroup, model, data, listing_options: tuple[bool, Callable]) -> Source:
    """The inputs; rank 0 lists the files and every rank uses its list (same positions everywhere).

    ``listing_options``: ``(recursive, decode)``, how folders are listed and files decoded."""
    recursive, decode = listing_options
    event_shape = getattr(model, "event_shape", None)
    if isinstance(data, Tensor):
        return TensorSource(data, tuple(event_shape) if event_shape is not None else tuple(data.shape[1:]))

    def listing():
        files = list_images(data, recursive=recursive)
        return files, tuple(event_shape) if event_shape is not None else first_image_shape(files)

    files, shape = _on_rank0(pg, listing)
    if len(shape) != 3:
        raise ValueError(f"the model's event shape {tuple(shape)} is not an image shape (C, H, W)")
    return FileSource(files, shape, decode=decode)


def _shared_plan(pg: ProcessGroup, store: ShardedCSV, source: Source, settings: dict, overwrite: bool, lock: ExitStack):
    """Rank 0 takes the output's lock and plans; every rank gets its ``(position, row index)`` work list."""
    if isinstance(source, TensorSource):
        fingerprints = pg.gather(source.fingerprint)
        if pg.rank == 0 and len(set(fingerprints)) > 1:
            raise ValueError("the ranks were given different data tensors; every rank must pass the same dataset")

    def planning():
        check_output(store.out, source)  # before the lock file is created beside it
        lock.enter_context(store.lock())
        return plan(store, source, settings, overwrite)

    planned = _on_rank0(pg, planning)
    todo = pg.broadcast(planned.todo if pg.rank == 0 else None)
    return planned, todo


def _evaluate(
    pg, model, data, out, settings, *, dtype, amp, ad_mode, batch_size, compile, listing, overwrite, model_id, progress, verbose
):
    source = _make_source(pg, model, data, listing)
    settings = dict(settings, model=model_id, data=source.fingerprint, format=FORMAT)
    store = ShardedCSV(out, COLUMNS)
    with ExitStack() as lock:
        planned, todo = _shared_plan(pg, store, source, settings, overwrite, lock)
        mine = todo[pg.rank :: pg.world_size]
        scorer = Scorer(
            prepare_model(model, pg.device, amp=amp, compile=compile), source.event_shape,
            steps=settings["steps"], solver=settings["solver"], grid=settings["grid"], divergence=settings["divergence"],
            probes=settings["probes"], noise=settings["noise"], basis=_basis_name(settings["probe_basis"]), draws=settings["draws"], seed=settings["seed"], dtype=dtype,
            ad_mode=ad_mode,
        )  # fmt: skip
        batches = Batches(scorer, pg.device, batch_size=batch_size, n_todo=len(mine), local_world=pg.local_world_size, compile=compile)
        pg.barrier()  # a common start for the timing
        start = time.perf_counter()
        writer = store.open_part(pg.rank)
        shard = _Shard(source, dict(mine), settings_digest(settings), batches.scorer.dim)
        try:
            shard.run(batches, writer, progress=progress and pg.rank == 0, world=pg.world_size)
        finally:
            writer.close()
        gathered = pg.gather(dict(rows=shard.rows, computed=shard.computed))
        result = None
        if pg.rank == 0:
            seconds = time.perf_counter() - start
            result = _merge(store, source, planned, gathered, settings, pg.world_size)
            result.update(seconds=seconds, batch_size=batches.size, world_size=pg.world_size)
    result = pg.broadcast(None if result is None else {k: v for k, v in result.items() if k != "rows"}) | (
        {"rows": result["rows"]} if pg.rank == 0 else {"rows": []}
    )
    writer.path.unlink(missing_ok=True)  # the merged output is on disk: part files are redundant now
    try:
        store.parts_dir.rmdir()
    except OSError:
        pass
    res = EvaluationResult(out=store.out, n_inputs=len(source), settings=settings, **result)
    if verbose and pg.rank == 0:
        report(res)
    return res


class _Shard:
    """This rank's inputs, scored batch by batch; each batch's rows are appended to the part file."""

    def __init__(self, source: Source, index_of: dict[int, int], digest: str, dim: int):
        self.source, self.index_of, self.digest, self.dim = source, index_of, digest, dim
        self.rows: list[dict[str, str]] = []
        self.computed = 0

    def run(self, batches: Batches, writer: PartWriter, *, progress: bool, world: int) -> None:
        from tqdm.auto import tqdm

        desc = f"logp rank 0/{world}" if world > 1 else "logp"
        positions = list(self.index_of)
        with tqdm(total=len(positions), unit="img", dynamic_ncols=True, disable=not progress, desc=desc) as bar:
            with ThreadPoolExecutor(max_workers=1) as pool:  # decode the next batch while this one runs
                prefetch = Prefetch(pool, self.source, positions, batches)
                pending = prefetch.submit()
                while pending is not None:
                    batch = pending.result()
                    measuring = batches.measuring and bool(batch.ok)  # the batch size is known after this batch
                    if not measuring:
                        pending = prefetch.submit()
                    batch, scored = _score_isolating_non_finite(batches, batch)
                    if measuring:
                        pending = prefetch.submit()
                    rows = self._rows(batch, scored)
                    writer.write_rows(rows)
                    self.rows += rows
                    self.computed += len(batch.ok)
                    bar.update(len(rows))

    def _rows(self, batch: Batch, scored: Scored | None) -> list[dict[str, str]]:
        """The sealed CSV rows of a batch: scored inputs and failed ones."""
        rows = []
        empty = dict(logp_nats="", logp_se_nats="", bpd="", nfe_forward=0, nfe_jvp=0, nfe_vjp=0)
        for j, i in enumerate(batch.ok):
            lp, se = float(scored.logp[j]), float(scored.se[j])
            forward, jvp, vjp = scored.nfe
            values = dict(
                logp_nats=_fmt(lp), logp_se_nats="" if math.isnan(se) else _fmt(se), bpd=_fmt(logp_to_bpd(lp, self.dim)),
                nfe_forward=forward, nfe_jvp=jvp, nfe_vjp=vjp, status="ok", message="",
            )  # fmt: skip
            if not (math.isfinite(lp) and math.isfinite(logp_to_bpd(lp, self.dim))):
                values = dict(empty, status="non_finite", message=f"log-density {lp!r} is not finite")
            rows.append(self._row(i, batch, values))
        for i, (status, message) in batch.failures.items():
            rows.append(self._row(i, batch, dict(empty, status=status, message=" ".join(message.split()))))
        return rows

    def _row(self, i: int, batch: Batch, values: dict) -> dict[str, str]:
        name = escape_name(self.source.names[i])
        return seal(dict(values, index=self.index_of[i], file=name, sha256=batch.hashes.get(i, "")), self.digest)


def _score_isolating_non_finite(batches: Batches, batch: Batch) -> tuple[Batch, Scored | None]:
    """Score a batch; if the solve meets NaN or Inf, score its inputs one by one and mark those that fail.

    Returns the batch with the failing inputs moved to ``failures`` (status ``non_finite``,
    with the solver's message naming the time) and the results of the others.
    """
    if not batch.ok:
        return batch, None
    try:
        return batch, batches.score(batch.images, batch.ids)
    except FloatingPointError as e:
        if len(batch.ok) == 1:
            return Batch(batch.images[:0], [], {**batch.failures, batch.ok[0]: ("non_finite", str(e))}, batch.hashes, []), None
    ok, keep, parts, failures = [], [], [], dict(batch.failures)
    for j, i in enumerate(batch.ok):
        try:
            parts.append(batches.score(batch.images[j : j + 1], batch.ids[j : j + 1]))
        except FloatingPointError as e:
            failures[i] = ("non_finite", str(e))
            continue
        ok.append(i)
        keep.append(j)
    scored = parts[0] if parts else None
    for part in parts[1:]:
        scored = Scored.cat(scored, part)
    ids = [batch.ids[j] for j in keep]
    return Batch(batch.images[keep], ok, failures, batch.hashes, ids), scored


def _fmt(x: float) -> str:
    return repr(float(x))


def _merge(store: ShardedCSV, source: Source, planned: Plan, gathered: list, settings: dict, world: int) -> dict[str, Any]:
    """Rank 0: merge kept, resumed and fresh rows into the output and record the settings."""
    fresh = {row_key(r["file"], r["index"]): r for g in gathered for r in g["rows"]}
    resumed = {k: r for k, r in planned.done.items() if k not in fresh}
    n_rows = store.merge([*planned.kept, *resumed.values(), *fresh.values()])
    current = {**resumed, **fresh}
    rows = [current[row_key(escape_name(name), i)] for i, name in enumerate(source.names)]
    failures = [(int(r["index"]), r["file"], r["status"], r["message"]) for r in rows if r["status"] != "ok"]
    n_ok = len(rows) - len(failures)
    bpds = [float(r["bpd"]) for r in rows if r["status"] == "ok"]
    store.write_meta(dict(
        format=FORMAT, settings=settings, n_inputs=len(source), n_rows=n_rows, state="complete", n_ok=n_ok,
        n_failed=len(failures), mean_bpd=sum(bpds) / len(bpds) if bpds else None, world_size=world,
    ))  # fmt: skip
    store.remove_parts()
    return dict(
        n_ok=n_ok, computed=sum(g["computed"] for g in gathered), resumed=len(resumed), failures=failures, rows=rows,
        problems=planned.problems, changed=planned.changed, n_rows=n_rows,
    )  # fmt: skip
