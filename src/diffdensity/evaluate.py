"""Dataset-scale likelihood evaluation: image files or an 8-bit tensor -> one CSV row per input.

:func:`score_dataset` scores every input with the probability-flow ODE
(:func:`~diffdensity.likelihood.log_likelihood`, MATH.md s.3a) after uniform
dequantisation of the 8-bit values into ``[-1, 1]``, and writes, in input order,

    index, file, logp, bpd, nfe, status, message

with ``logp`` the model's log-density in nats of the dequantised point (averaged over
``draws`` dequantisation draws), ``bpd = -logp / (D ln 2) + 7`` its bits per dimension
(MATH.md s.7), ``nfe`` the network passes spent on the input, and ``status`` one of
``ok``, ``unreadable`` (missing, corrupt or truncated file) or ``wrong_shape`` (size,
channels or pixel format other than the model's ``event_shape``; message says which).

Reproducible at any scale. Dequantisation noise and Hutchinson probes are drawn from a
counter-based generator keyed by ``(seed, sample index, draw, solver step)``: a
sample's numbers do not depend on which other samples share its batch, on the batch
size, on the number of processes or on the device. Only fixed-step solvers are
accepted: an adaptive solver picks one step size from the error of the whole batch,
which couples the samples of a batch.

Parallel and resumable. Under ``torchrun`` each rank scores a strided shard of the
missing samples and appends its rows to its own part file (one ``write`` of whole lines
plus ``fsync`` per batch); rank 0 merges everything into the output in input order. An
interrupted job, a dead rank or a rerun loses no finished row and recomputes only the
missing ones (see :mod:`diffdensity.distributed` and ``docs/scale.md``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import _validation as v
from .distributed import ProcessGroup, ShardedCSV
from .divergence import Exact, Hutchinson
from .likelihood import log_likelihood, logp_to_bpd
from .schedules import GRIDS
from .models import ScoreModel
from .solvers import TABLEAUX

__all__ = [
    "score_dataset",
    "EvaluationResult",
    "PerSampleHutchinson",
    "list_images",
    "sample_keys",
    "uniform",
    "register",
    "main_logp",
]

COLUMNS = ["index", "file", "logp", "bpd", "nfe", "status", "message"]
FIXED_SOLVERS = tuple(name for name, tab in TABLEAUX.items() if not tab.adaptive)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMAT = "diffdensity-logp-v1"
CPU_MAX_BATCH, GPU_MAX_BATCH = 64, 2048


# -- counter-based random numbers --------------------------------------------------------
#
# A 32-bit integer hash (Wellons' "lowbias32", a bijection on 32-bit words) chained over
# the words (seed, stream, index, draw, step) gives each sample two 32-bit keys; element
# j of its stream is hash(hash(j ^ k1) ^ k2). Everything is int64 tensor arithmetic that
# never overflows (products are split into 16-bit halves), so the bits are the same on
# every device and for every batch layout.

_M32 = 0xFFFFFFFF
_LANES = (0x243F6A88, 0x85A308D3)  # digits of pi: two independent key lanes
STREAM_DEQUANT, STREAM_PROBES = 1, 2


def _mul32(a: Tensor, c: int) -> Tensor:
    """``a * c mod 2^32`` for int64 ``a`` in ``[0, 2^32)`` without int64 overflow."""
    lo, hi = a & 0xFFFF, a >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _words(value: int | Tensor) -> list[int | Tensor]:
    if isinstance(value, Tensor):
        value = value.to(torch.int64)
        return [value & _M32, (value >> 32) & _M32]
    value = int(value)
    if value < 0:
        raise ValueError(f"seed, index and counters must be non-negative, got {value}")
    return [value & _M32, (value >> 32) & _M32]


def sample_keys(seed: int, stream: int, index: Tensor, *counters: int | Tensor) -> Tensor:
    """Keys ``(B, 2)`` int64 of the random stream ``stream`` of samples ``index`` ``(B,)``.

    ``counters`` (ints or ``(B,)`` tensors, e.g. the dequantisation draw) are absorbed
    too. The keys depend on nothing else, in particular not on the batch.
    """
    index = index.to(torch.int64)
    if (index < 0).any():
        raise ValueError("sample indices must be non-negative")
    words = _words(seed) + [stream] + _words(index)
    for c in counters:
        words += _words(c)
    lanes = []
    for init in _LANES:
        h = torch.full_like(index, init)
        for w in words:
            h = _hash32(h ^ w)
        lanes.append(h)
    return torch.stack(lanes, 1)


def advance_keys(keys: Tensor, counter: int) -> Tensor:
    """The keys of sub-stream ``counter`` (e.g. a solver step) of ``keys`` ``(B, 2)``."""
    return _hash32(keys ^ (int(counter) & _M32))


def _bits(keys: Tensor, n: int) -> Tensor:
    j = torch.arange(n, device=keys.device, dtype=torch.int64)
    return _hash32(_hash32(keys[:, :1] ^ j) ^ keys[:, 1:])  # (B, n) in [0, 2^32)


def uniform(keys: Tensor, n: int) -> Tensor:
    """``(B, n)`` float64 uniforms in ``(0, 1)`` (32 random bits each) from keys ``(B, 2)``."""
    return (_bits(keys, n).to(torch.float64) + 0.5) * 2.0**-32


def rademacher(keys: Tensor, n: int) -> Tensor:
    """``(B, n)`` float64 signs +-1 from keys ``(B, 2)``."""
    return (_bits(keys, n) >> 31).to(torch.float64) * 2 - 1


def normal(keys: Tensor, n: int) -> Tensor:
    """``(B, n)`` float64 standard normals (Box-Muller) from keys ``(B, 2)``."""
    u = uniform(keys, 2 * n)
    return torch.sqrt(-2 * torch.log(u[:, :n])) * torch.cos(2 * math.pi * u[:, n:])


class PerSampleHutchinson(Hutchinson):
    """Hutchinson's estimator whose probes are a function of each sample's key and the step.

    Call :meth:`bind` with the keys ``(B, 2)`` of the batch's samples (see
    :func:`sample_keys`) before a solve. Probes are fresh every solver step and shared
    by the stages of a step, like ``Hutchinson(resample="step")``, but sample ``b`` at
    step ``k`` always gets the same probes whatever batch it is in, so likelihoods do
    not depend on the batch composition, the batch size or the number of processes.
    """

    def __init__(self, probes: int = 1, *, noise: str = "rademacher", mode: str = "auto"):
        super().__init__(probes, noise=noise, resample="step", mode=mode)
        self.keys: Tensor | None = None
        self._step = 0

    def __repr__(self) -> str:
        return f"PerSampleHutchinson(probes={self.probes}, noise={self.noise!r}, mode={self.mode!r})"

    def bind(self, keys: Tensor) -> None:
        """Use ``keys`` ``(B, 2)`` for the samples of the next solve."""
        if keys.ndim != 2 or keys.shape[1] != 2:
            raise ValueError(f"keys must have shape (B, 2), got {tuple(keys.shape)}")
        self.keys = keys

    def reset(self, generator: torch.Generator | None = None) -> None:
        super().reset(None)  # the generator is not used: probes come from the keys
        self._step = -1

    def begin_step(self) -> None:
        super().begin_step()
        self._step += 1

    def draw(self, x: Tensor) -> Tensor:
        if self.keys is None or self.keys.shape[0] != x.shape[0]:
            raise RuntimeError(f"bind() keys for the {x.shape[0]} samples of the batch before solving")
        keys = advance_keys(self.keys.to(x.device), max(self._step, 0))
        n = self.probes * math.prod(x.shape[1:])
        e = normal(keys, n) if self.noise == "gaussian" else rademacher(keys, n)
        return e.reshape(x.shape[0], self.probes, *x.shape[1:]).transpose(0, 1).to(x.dtype)


# -- inputs ------------------------------------------------------------------------------


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike], *, recursive: bool = False) -> list[str]:
    """Files in input order: a folder expands to its PNG/JPEG files, sorted by path.

    Files named explicitly are kept whatever their suffix (and reported later if they
    cannot be read); ``recursive`` also descends into sub-folders.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            files += sorted(str(p) for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(str(path))
    return files


_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def read_image(path: str, event_shape: tuple[int, ...]) -> tuple[np.ndarray | None, str, str]:
    """``(uint8 (C, H, W) array or None, status, message)`` for one file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: truncated or corrupt data fails here
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "1":
                im = im.convert("L")
            arr = np.asarray(im) if im.mode in _CHANNEL_MODES.values() else None
    except Exception as e:  # PIL raises many types for damaged files (OSError, SyntaxError, ...)
        return None, "unreadable", f"{type(e).__name__}: {e}"
    c, h, w = event_shape
    want = f"{w}x{h} {_CHANNEL_MODES.get(c, f'{c}-channel')}"
    if arr is None:
        return None, "wrong_shape", f"pixel format {mode} is not 8-bit L/LA/RGB/RGBA; the model expects {want}"
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if arr.shape != (h, w, c):
        got = f"{arr.shape[1]}x{arr.shape[0]} {im.mode}"
        return None, "wrong_shape", f"image is {got}; the model expects {want}"
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), "ok", ""


class _Source:
    """Inputs by index: ``names[i]`` and ``load(indices) -> (uint8 (b, *event), ok_indices, failures)``."""

    names: list[str]
    event_shape: tuple[int, ...]
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.names)

    def load(self, indices: list[int]) -> tuple[Tensor, list[int], dict[int, tuple[str, str]]]:
        raise NotImplementedError


class _FileSource(_Source):
    def __init__(self, files: list[str], event_shape: tuple[int, ...]):
        self.names, self.event_shape = files, event_shape

    def load(self, indices):
        arrays, ok, failures = [], [], {}
        for i in indices:
            arr, status, message = read_image(self.names[i], self.event_shape)
            if arr is None:
                failures[i] = (status, message)
            else:
                arrays.append(arr)
                ok.append(i)
        images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, *self.event_shape, dtype=torch.uint8)
        return images, ok, failures


class _TensorSource(_Source):
    def __init__(self, data: Tensor, event_shape: tuple[int, ...]):
        if data.ndim < 2 or tuple(data.shape[1:]) != tuple(event_shape):
            raise ValueError(f"data must have shape (N, *{tuple(event_shape)}), got {tuple(data.shape)}")
        u = data.detach().cpu()
        if u.is_floating_point():
            if not torch.isfinite(u).all() or (u != u.round()).any():
                raise ValueError("data must hold integer values in [0, 255] (8-bit images)")
        elif u.dtype == torch.bool or u.is_complex():
            raise TypeError(f"data must be an integer (uint8) tensor, got {u.dtype}")
        if u.numel() and (u.min() < 0 or u.max() > 255):
            raise ValueError("data must hold integer values in [0, 255] (8-bit images)")
        self.data, self.event_shape = u.to(torch.uint8).contiguous(), tuple(event_shape)
        self.names = [""] * len(u)
        self.fingerprint = hashlib.sha256(self.data.numpy().tobytes()).hexdigest()
        self.fingerprint += f":{tuple(u.shape)}"

    def load(self, indices):
        return self.data[indices], list(indices), {}


# -- scoring -----------------------------------------------------------------------------


class _Scorer:
    """Log-densities of a batch of 8-bit images: dequantise, then one PF-ODE solve."""

    def __init__(self, model, event_shape, *, steps, solver, grid, divergence, probes, noise, draws, seed, dtype, ad_mode):
        self.model, self.event_shape = model, tuple(event_shape)
        self.dim = math.prod(event_shape)
        self.steps, self.solver, self.grid = steps, solver, grid
        self.draws, self.seed, self.dtype = draws, seed, dtype
        self.est = Exact(mode=ad_mode) if divergence == "exact" else PerSampleHutchinson(probes, noise=noise, mode=ad_mode)

    def __call__(self, images: Tensor, index: Tensor) -> tuple[Tensor, int]:
        """``images`` uint8 ``(b, *event)`` and ``index`` int64 ``(b,)`` -> (logp float64 ``(b,)``, NFE per image)."""
        b, dev = images.shape[0], images.device
        idx = index.to(dev).repeat(self.draws)
        draw = torch.arange(self.draws, device=dev).repeat_interleave(b)
        noise = uniform(sample_keys(self.seed, STREAM_DEQUANT, idx, draw), self.dim)
        u = images.to(torch.float64).repeat(self.draws, *([1] * len(self.event_shape)))
        x = (2 * (u + noise.reshape(u.shape)) / 256 - 1).to(self.dtype)
        if isinstance(self.est, PerSampleHutchinson):
            self.est.bind(sample_keys(self.seed, STREAM_PROBES, idx, draw))
        res = log_likelihood(self.model, x, steps=self.steps, solver=self.solver, grid=self.grid, divergence=self.est)
        return res.logp.reshape(self.draws, b).mean(0).cpu(), res.nfe.total * self.draws


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def _network(model) -> nn.Module | None:
    fn = getattr(model, "fn", None)
    return fn if isinstance(fn, nn.Module) else None


class _Autocast:
    """Runs ``fn`` under ``torch.autocast``; the output is cast back to the input's dtype."""

    def __init__(self, fn: Callable, device_type: str, dtype: torch.dtype):
        self.fn, self.device_type, self.dtype = fn, device_type, dtype

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.fn(x, *args, **kwargs)
        return out.to(x.dtype)


class _AutocastModel:
    def __init__(self, model, device_type: str, dtype: torch.dtype):
        self.model, self.schedule = model, model.schedule
        self.event_shape = getattr(model, "event_shape", None)
        self._score = _Autocast(model.score, device_type, dtype)

    def score(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self._score(x, t, **cond)


def _prepare_model(model, device: torch.device, *, amp: torch.dtype | None, compile: bool):
    net = _network(model)
    if net is not None:
        net.to(device)
    if amp is None and not compile:
        return model
    if isinstance(model, ScoreModel) and net is not None:
        fn: Callable = net
        if compile:
            fn = torch.compile(fn, dynamic=False)
        if amp is not None:
            fn = _Autocast(fn, device.type, amp)
        wrapped = copy.copy(model)
        wrapped.fn = fn
        return wrapped
    if compile:
        print("warning: --compile applies to networks wrapped in ScoreModel; ignored for this model", file=sys.stderr)
    return model if amp is None else _AutocastModel(model, device.type, amp)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _bytes_per_row(model, event_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> int:
    """Rough peak memory of one row of a Jacobian-product pass (CPU estimate).

    Sums the outputs of every submodule in one forward pass of a single row, doubled for
    the tangents and doubled again for the intermediates the sum misses. Models that
    are not ``nn.Module`` networks get ``64 D`` float64 values.
    """
    net = _network(model)
    dim = math.prod(event_shape)
    if net is None:
        return 64 * dim * 8
    total = [0]

    def hook(_m, _inp, out):
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, Tensor):
                total[0] += o.numel() * o.element_size()

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with torch.no_grad():
            x = torch.zeros(1, *event_shape, dtype=dtype, device=device)
            t = torch.full((1,), 0.5 * (model.schedule.t_min + model.schedule.t_max), dtype=torch.float64, device=device)
            model.score(x, t)
    except Exception:
        return 64 * dim * 8
    finally:
        for h in handles:
            h.remove()
    return max(4 * total[0], dim * 8)


# -- results -----------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """What :func:`score_dataset` did. ``rows`` (all inputs, input order) is filled on rank 0 only.

    ``computed``: inputs scored by this call (all ranks); ``resumed``: taken from earlier
    runs; ``failures``: ``(index, file, status, message)`` of inputs that could not be
    scored; ``seconds``: wall time of the scoring on rank 0.
    """

    out: Path
    n_inputs: int
    n_ok: int
    computed: int
    resumed: int
    failures: list[tuple[int, str, str, str]]
    seconds: float
    world_size: int
    batch_size: int
    settings: dict
    rows: list[dict[str, str]] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def exit_code(self) -> int:
        """0 when every input was scored, 1 otherwise (the ``logp`` command's exit status)."""
        return 1 if self.failures else 0

    @property
    def samples_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")

    def _column(self, name: str) -> Tensor:
        return torch.tensor([float(r[name]) if r["status"] == "ok" else math.nan for r in self.rows], dtype=torch.float64)

    @property
    def logp(self) -> Tensor:
        """``(N,)`` float64 log-densities in nats (NaN where an input failed; rank 0 only)."""
        return self._column("logp")

    @property
    def bpd(self) -> Tensor:
        """``(N,)`` float64 bits per dimension (NaN where an input failed; rank 0 only)."""
        return self._column("bpd")


def _fmt(x: float) -> str:
    return repr(float(x))


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
    strided shard; otherwise it runs in one process.

    Args:
        model: a score model (``.score``, ``.schedule`` and ``.event_shape``
            ``(C, H, W)``). A network in ``model.fn`` is moved to ``device``.
        data: image files and folders (PNG/JPEG; a folder expands to its image files
            in sorted order), or an integer tensor ``(N, *event_shape)`` with values in
            ``[0, 255]``.
        out: the CSV to write; ``out.meta.json`` records the settings and
            ``out.parts/`` holds the per-rank rows while a job runs. If they exist from
            an earlier run with the same settings, only missing rows are computed.
        steps, solver, grid: the fixed-step PF-ODE solve (``solver`` one of
            ``euler``, ``heun``, ``midpoint``, ``rk4``).
        divergence: ``"hutchinson"`` (``probes`` probes, ``noise`` ``"rademacher"``
            or ``"gaussian"``, fresh every step) or ``"exact"`` (D Jacobian products).
        draws: dequantisation draws per input; ``logp`` is their average.
        seed: with the sample index, determines all noise (dequantisation and probes).
        batch_size: inputs per batch; ``None`` sizes batches to the free memory (on
            GPUs measured on a small first batch, with halving on out-of-memory).
        device: ``None``/``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` (this
            rank's ``cuda:LOCAL_RANK``) or an explicit device.
        dtype: dtype of the network input (log-densities accumulate in float64).
        amp: run the network under ``torch.autocast`` (``True``: bfloat16, or a dtype);
            changes results by roughly the half-precision rounding (docs/scale.md).
        compile: ``torch.compile`` the network (batches are padded to one size).
        ad_mode: how Jacobian products are taken: ``"reverse"`` (vector-Jacobian
            products; the faster mode for convolutional networks, 2.5x on the bundled
            U-Net on CPU), ``"forward"`` (JVPs; less memory) or ``"auto"`` (forward, with
            a reverse fallback). Changes results only by float rounding.
        overwrite: discard earlier results at ``out`` instead of resuming.
        model_id: names the model in ``out.meta.json`` (default ``repr(model)``); a rerun
            with another id refuses to resume.
        progress: tqdm bar on rank 0. verbose: summary on stderr (rank 0).

    Returns:
        :class:`EvaluationResult`; its ``exit_code`` is 1 when some input failed.
        Failed inputs are reported, never fatal; settings that conflict with an
        earlier run at ``out`` raise ``ValueError`` (pass ``overwrite=True``).
    """
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

    pg = ProcessGroup.join(device)
    try:
        return _evaluate(
            pg, model, data, Path(out),
            dict(steps=steps, solver=solver, grid=grid, divergence=divergence, probes=probes, noise=noise,
                 draws=draws, seed=seed, dtype=str(dtype).replace("torch.", ""),
                 amp=None if amp_dtype is None else str(amp_dtype).replace("torch.", "")),
            dtype=dtype, amp=amp_dtype, ad_mode=ad_mode, batch_size=batch_size, compile=compile, recursive=recursive,
            overwrite=overwrite, model_id=model_id or repr(model), progress=progress, verbose=verbose,
        )  # fmt: skip
    finally:
        pg.close()


def _make_source(pg: ProcessGroup, model, data, recursive: bool) -> _Source:
    """The inputs; rank 0 lists the files and every rank uses its list (same indices everywhere)."""
    event_shape = getattr(model, "event_shape", None)
    if isinstance(data, Tensor):
        return _TensorSource(data, tuple(event_shape) if event_shape is not None else tuple(data.shape[1:]))
    listing = None
    if pg.rank == 0:
        files = list_images(data, recursive=recursive)
        if event_shape is None:
            event_shape = _first_image_shape(files)
        listing = (files, tuple(event_shape))
    files, event_shape = pg.broadcast(listing)
    if len(event_shape) != 3:
        raise ValueError(f"the model's event shape {tuple(event_shape)} is not an image shape (C, H, W)")
    return _FileSource(files, event_shape)


def _first_image_shape(files: list[str]) -> tuple[int, int, int]:
    """``(C, H, W)`` of the first readable image (for models without ``event_shape``)."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                return len(im.getbands()), im.height, im.width
        except Exception:
            continue
    return 3, 1, 1


def _plan(pg: ProcessGroup, store: ShardedCSV, source: _Source, settings: dict, overwrite: bool, fingerprints: list | None):
    """Rank 0: check earlier results, collect the finished rows, list the missing indices."""
    if pg.rank != 0:
        return None
    try:
        if fingerprints is not None and len(set(fingerprints)) > 1:
            raise ValueError("the ranks were given different data tensors; every rank must pass the same dataset")
        meta = store.read_meta()
        if overwrite:
            store.remove()
        elif store.exists():
            if meta is None:
                raise ValueError(
                    f"{store.out} (or {store.parts_dir.name}/) exists but {store.meta_path.name} is missing, so it "
                    "cannot be resumed safely; pass overwrite=True (--overwrite) or choose another output"
                )
            if meta.get("settings") != settings:
                old, new = meta.get("settings", {}), settings
                diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
                raise ValueError(
                    f"{store.out} was computed with other settings {diff} (old, new); "
                    "pass overwrite=True (--overwrite) or choose another output"
                )
        rows, skipped = store.read_rows() if not overwrite else ([], 0)
        done: dict[int, dict[str, str]] = {}
        for row in rows:
            i = int(row["index"])
            if row["status"] == "ok" and 0 <= i < len(source) and row["file"] == source.names[i]:
                done.setdefault(i, row)
        store.write_meta(dict(format=FORMAT, settings=settings, n_inputs=len(source), state="running"))
        todo = [i for i in range(len(source)) if i not in done]
        return dict(done=done, todo=todo, skipped=skipped)
    except Exception as e:  # tell the other ranks instead of leaving them waiting
        return dict(error=str(e), value_error=isinstance(e, ValueError), exc=e)


def _evaluate(
    pg, model, data, out, settings, *, dtype, amp, ad_mode, batch_size, compile, recursive, overwrite, model_id, progress, verbose
):
    source = _make_source(pg, model, data, recursive)
    settings = dict(settings, model=model_id, data=source.fingerprint, format=FORMAT)
    store = ShardedCSV(out, COLUMNS)
    fingerprints = pg.gather(source.fingerprint) if isinstance(source, _TensorSource) else None
    plan = _plan(pg, store, source, settings, overwrite, fingerprints)
    shared = pg.broadcast(None if plan is None else {k: plan[k] for k in ("todo", "error", "value_error") if k in plan})
    if "error" in shared:
        if plan is not None:
            raise plan["exc"]
        raise (ValueError if shared["value_error"] else RuntimeError)(f"rank 0 could not start: {shared['error']}")
    todo: list[int] = shared["todo"]
    mine = todo[pg.rank :: pg.world_size]

    device = pg.device
    scorer = _Scorer(
        _prepare_model(model, device, amp=amp, compile=compile), source.event_shape,
        steps=settings["steps"], solver=settings["solver"], grid=settings["grid"], divergence=settings["divergence"],
        probes=settings["probes"], noise=settings["noise"], draws=settings["draws"], seed=settings["seed"], dtype=dtype,
        ad_mode=ad_mode,
    )  # fmt: skip
    rows_per_image = settings["draws"] * (settings["probes"] if settings["divergence"] == "hutchinson" else 1)
    measure_first = batch_size is None and device.type == "cuda"
    if batch_size is not None:
        bs = batch_size
    elif measure_first:
        bs = 2
    else:
        per_image = _bytes_per_row(model, scorer.event_shape, dtype, device) * rows_per_image
        budget = _available_memory(device) // (2 * max(pg.local_world_size, 1))
        bs = max(1, min(CPU_MAX_BATCH, budget // max(per_image, 1)))
    bs = max(1, min(bs, len(mine))) if mine else bs
    pad_to = bs if compile else None
    pg.barrier()  # a common start for the timing
    start = time.perf_counter()

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(mine), unit="img", dynamic_ncols=True, disable=not (progress and pg.rank == 0),
        desc=f"logp rank 0/{pg.world_size}" if pg.world_size > 1 else "logp",
    )  # fmt: skip
    my_rows: list[dict[str, Any]] = []
    computed = 0
    writer = store.open_part(pg.rank)

    def score(images: Tensor, index: list[int]) -> tuple[Tensor, int]:
        nonlocal bs, pad_to
        n = len(index)
        idx = torch.tensor(index, dtype=torch.int64)
        if pad_to is not None and n < pad_to:  # one shape for compiled networks; extra rows are dropped
            images = torch.cat([images, images[-1:].expand(pad_to - n, *images.shape[1:])])
            idx = torch.cat([idx, idx[-1:].expand(pad_to - n)])
        try:
            logp, nfe = scorer(images.to(device), idx.to(device))
            return logp[:n], nfe
        except Exception as e:
            if not _is_oom(e) or n == 1:
                raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = n // 2
        bs = max(1, min(bs, half))
        pad_to = None if pad_to is None else bs
        a, nfe = score(images[:half], index[:half])
        b, _ = score(images[half:n], index[half:])
        return torch.cat([a, b]), nfe

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:  # decode the next batch while this one runs
            pos = 0

            def submit():
                nonlocal pos
                if pos >= len(mine):
                    return None
                index = mine[pos : pos + bs]
                pos += len(index)
                return pool.submit(source.load, index)

            pending = submit()
            while pending is not None:
                images, ok, failures = pending.result()
                calibrate = measure_first and bool(ok)  # GPU: size batches from this batch's peak memory
                if not calibrate:
                    pending = submit()
                else:
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                results: dict[int, tuple[float, int]] = {}
                if ok:
                    logp, nfe = score(images, ok)
                    results = {i: (lp, nfe) for i, lp in zip(ok, logp.tolist())}
                if calibrate:
                    per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) // len(ok))
                    bs = int(max(1, min(GPU_MAX_BATCH, 0.8 * _available_memory(device) // per_image)))
                    pad_to = bs if compile else None
                    measure_first = False
                    pending = submit()
                rows = []
                for i in sorted(ok + list(failures)):
                    if i in results:
                        lp, nfe = results[i]
                        bpd = logp_to_bpd(lp, scorer.dim)
                        rows.append(dict(index=i, file=source.names[i], logp=_fmt(lp), bpd=_fmt(bpd), nfe=nfe, status="ok", message=""))
                    else:
                        status, message = failures[i]
                        message = " ".join(message.split())  # one line per row, always
                        rows.append(dict(index=i, file=source.names[i], logp="", bpd="", nfe=0, status=status, message=message))
                writer.write_rows(rows)
                my_rows += [{k: str(val) for k, val in r.items()} for r in rows]
                computed += len(results)
                bar.update(len(rows))
    finally:
        writer.close()
        bar.close()

    gathered = pg.gather(dict(rows=my_rows, computed=computed))
    seconds = time.perf_counter() - start
    summary = None
    all_rows: list[dict[str, str]] = []
    if pg.rank == 0:
        fresh = [r for g in gathered for r in g["rows"]]
        fresh_idx = {int(r["index"]) for r in fresh}
        resumed = [r for i, r in plan["done"].items() if i not in fresh_idx]
        store.merge(resumed + fresh)
        all_rows = sorted(resumed + fresh, key=lambda r: int(r["index"]))
        failures = [(int(r["index"]), r["file"], r["status"], r["message"]) for r in all_rows if r["status"] != "ok"]
        n_ok = len(all_rows) - len(failures)
        summary = dict(
            n_ok=n_ok, computed=sum(g["computed"] for g in gathered), resumed=len(resumed), failures=failures,
            seconds=seconds, batch_size=bs,
        )  # fmt: skip
        bpds = [float(r["bpd"]) for r in all_rows if r["status"] == "ok"]
        mean_bpd = sum(bpds) / len(bpds) if bpds else None
        store.write_meta(dict(
            format=FORMAT, settings=settings, n_inputs=len(source), state="complete", n_ok=n_ok,
            n_failed=len(failures), mean_bpd=mean_bpd, world_size=pg.world_size,
        ))  # fmt: skip
        store.remove_parts()
        if verbose:
            _report(store.out, len(source), summary, bpds, plan.get("skipped", 0))
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


def _report(out: Path, n: int, summary: dict, bpds: list[float], skipped: int) -> None:
    failures = summary["failures"]
    err = sys.stderr
    print(
        f"logp: {n} inputs -> {out}: {summary['n_ok']} scored ({summary['computed']} now, {summary['resumed']} from "
        f"earlier runs), {len(failures)} failed",
        file=err,
    )
    if skipped:
        print(f"logp: ignored {skipped} incomplete or malformed line(s) left by an interrupted run", file=err)
    if bpds:
        mean = sum(bpds) / len(bpds)
        se = math.sqrt(sum((b - mean) ** 2 for b in bpds) / (len(bpds) - 1) / len(bpds)) if len(bpds) > 1 else math.nan
        print(f"logp: mean bits/dim {mean:.4f} +- {se:.4f} (standard error over {len(bpds)} inputs)", file=err)
    if failures:
        counts: dict[str, int] = {}
        for _, _, status, _ in failures:
            counts[status] = counts.get(status, 0) + 1
        print("logp: failed inputs: " + ", ".join(f"{c} {s}" for s, c in sorted(counts.items())), file=err)
        for i, name, status, message in failures[:50]:
            print(f"  [{status}] {name or f'index {i}'}: {message}", file=err)
        if len(failures) > 50:
            print(f"  ... and {len(failures) - 50} more (see the status column of {out})", file=err)


# -- command line ------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _positive_int(s: str) -> int:
    try:
        value = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return value


def _seed(s: str) -> int:
    try:
        value = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2^63), got {s}")
    return value


_DESCRIPTION = """\
Score PNG/JPEG images with the model's probability-flow ODE: one CSV row per image,
in input order. Unreadable or wrongly sized images are reported and skipped. Runs
unchanged under torchrun (one shard per process, merged by rank 0); rerunning the
command resumes an interrupted job.
"""

_EPILOG = """\
output columns: index, file, logp (nats), bpd (bits/dim), nfe, status (ok | unreadable |
wrong_shape), message. Exit status 1 if any input failed (all others are still scored).

examples:
  diffdensity logp images/ --out scores.csv
  diffdensity logp a.png b.jpg --model gmm:image16 --steps 32 --seed 1 --out ab.csv
  diffdensity logp test/ --model diffusers:./ddpm-cifar10 --device cuda --amp --out test.csv
  torchrun --nproc_per_node=4 -m diffdensity logp test/ --out test.csv    # 4 GPUs or processes
  (rerun the same command after an interruption: only missing rows are computed)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``logp`` options (shared by ``diffdensity logp`` and ``python -m diffdensity.evaluate``)."""
    p.add_argument("inputs", nargs="+", help="PNG/JPEG files and folders (a folder expands to its image files, sorted)")
    p.add_argument("--model", default="builtin:patches16", help="builtin:NAME, diffusers:PATH (local folder) or gmm:NAME")
    p.add_argument("--out", default="out/logp.csv", help="CSV to write (resumed if it exists with the same settings)")
    p.add_argument("--steps", type=_positive_int, default=64, help="PF-ODE steps")
    p.add_argument("--solver", choices=FIXED_SOLVERS, default="heun", help="fixed-step ODE solver")
    p.add_argument("--grid", choices=GRIDS, default="log_snr", help="time grid of the steps")
    p.add_argument("--divergence", choices=("hutchinson", "exact"), default="hutchinson", help="divergence estimator")
    p.add_argument("--probes", type=_positive_int, default=1, help="Hutchinson probes per step")
    p.add_argument("--draws", type=_positive_int, default=1, help="uniform dequantisation draws per image (averaged)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of all noise (with each image's index)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (cuda:LOCAL_RANK under torchrun) or cuda:N")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images per batch (default: %(default)s, i.e. sized to the free memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for the network (GPU; see docs/scale.md for the tolerance)")
    p.add_argument("--ad-mode", choices=("reverse", "forward", "auto"), default="reverse",
                   help="Jacobian products by reverse mode (fastest for conv nets), forward mode (less memory) or auto")
    p.add_argument("--recursive", action="store_true", help="also take images from sub-folders")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results at --out instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``logp`` command to the ``diffdensity`` command line."""
    p = subparsers.add_parser(
        "logp",
        help="log-density and bits/dim of image files (CSV; resumable; runs under torchrun)",
        description=_DESCRIPTION,
        formatter_class=_HelpFormatter,
        epilog=_EPILOG,
    )
    add_arguments(p)
    p.set_defaults(func=main_logp)
    return p


def main_logp(args: argparse.Namespace) -> int:
    """Run the ``logp`` command; returns the exit status (0 ok, 1 some inputs failed, 2 bad settings)."""
    from .zoo import load_model

    pg = ProcessGroup.join(args.device)
    try:
        try:
            model = load_model(args.model, device=pg.device)
        except (ValueError, FileNotFoundError, ImportError) as e:
            print(f"diffdensity logp: error: cannot load model {args.model!r}: {e}", file=sys.stderr)
            return 2
        model_id = args.model
        digest = getattr(model, "info", {}).get("sha256") if isinstance(getattr(model, "info", None), dict) else None
        if digest:
            model_id += f"@sha256:{digest[:16]}"
        try:
            result = score_dataset(
                model, args.inputs, args.out, steps=args.steps, solver=args.solver, grid=args.grid,
                divergence=args.divergence, probes=args.probes, draws=args.draws, seed=args.seed,
                batch_size=args.batch_size, device=pg.device, amp=args.amp, compile=args.compile, ad_mode=args.ad_mode,
                recursive=args.recursive, overwrite=args.overwrite, model_id=model_id, progress=not args.quiet,
            )  # fmt: skip
        except ValueError as e:
            if pg.rank == 0:
                print(f"diffdensity logp: error: {e}", file=sys.stderr)
            return 2
        return result.exit_code
    finally:
        pg.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m diffdensity.evaluate ARGS`` is ``diffdensity logp ARGS``."""
    p = argparse.ArgumentParser(prog="diffdensity logp", description=_DESCRIPTION, formatter_class=_HelpFormatter, epilog=_EPILOG)
    add_arguments(p)
    return main_logp(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
