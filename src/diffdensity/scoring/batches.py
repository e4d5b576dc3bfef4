"""The per-batch evaluation of dataset scoring: dequantise, one PF-ODE solve, batch sizing.

:class:`Scorer` turns a batch of 8-bit images into log-densities; :class:`Batches`
chooses the batch size (given, estimated from the free CPU memory, or measured on a
first small GPU batch), pads batches to one size for compiled networks and halves a
batch that runs out of memory; :class:`Prefetch` decodes the next batch while the
current one is scored.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ..divergence import Exact
from ..likelihood import dequantize, log_likelihood
from .accel import CPU_MAX_BATCH, GPU_MAX_BATCH, available_memory, bytes_per_row, is_oom
from .inputs import Source
from .keys import STREAM_DEQUANT, STREAM_PROBES, sample_keys, uniform
from .probes import PerSampleHutchinson

__all__ = ["Scorer", "Scored", "Batches", "Prefetch"]


class Scorer:
    """Log-densities of a batch of 8-bit images: dequantise, then one PF-ODE solve (docs/math.md s.3a, s.7)."""

    def __init__(self, model, event_shape, *, steps, solver, grid, divergence, probes, noise, basis, draws, seed, dtype, ad_mode):
        self.model, self.event_shape = model, tuple(event_shape)
        self.dim = math.prod(event_shape)
        self.steps, self.solver, self.grid = steps, solver, grid
        self.draws, self.seed, self.dtype = draws, seed, dtype
        hutchinson = divergence != "exact"
        self.est = PerSampleHutchinson(probes, noise=noise, mode=ad_mode, basis=basis) if hutchinson else Exact(mode=ad_mode)
        self.rows_per_image = draws * (probes if hutchinson else 1)

    def __call__(self, images: Tensor, ids: Tensor) -> Scored:
        """``images`` uint8 ``(b, *event)`` and their content ids int64 ``(b,)`` -> :class:`Scored`.

        The dequantisation noise and the probes of image ``j`` are functions of
        ``(seed, ids[j], draw, step)`` only (see :mod:`.keys`).
        """
        b, dev = images.shape[0], images.device
        idx = ids.to(dev).repeat(self.draws)
        draw = torch.arange(self.draws, device=dev).repeat_interleave(b)
        noise = uniform(sample_keys(self.seed, STREAM_DEQUANT, idx, draw), self.dim)
        u = images.to(torch.float64).repeat(self.draws, *([1] * len(self.event_shape)))
        x = dequantize(u, noise.reshape(u.shape)).to(self.dtype)
        if isinstance(self.est, PerSampleHutchinson):
            self.est.bind(sample_keys(self.seed, STREAM_PROBES, idx, draw))
        res = log_likelihood(self.model, x, steps=self.steps, solver=self.solver, grid=self.grid, divergence=self.est)
        logp = res.logp.reshape(self.draws, b).mean(0).cpu()
        se = getattr(res, "stderr", None)  # per draw; the mean of the draws has sqrt(sum se_d^2) / draws
        se = torch.full_like(logp, math.nan) if se is None else se.reshape(self.draws, b).square().sum(0).sqrt().cpu() / self.draws
        n = res.nfe
        return Scored(logp, se, (n.forward * self.draws, n.jvp * self.draws, n.vjp * self.draws))


@dataclass
class Scored:
    """Results of a batch: ``logp`` float64 ``(b,)`` nats, its standard error ``se`` ``(b,)`` (NaN: unknown)
    and the network passes per image ``nfe = (forward, jvp, vjp)``."""

    logp: Tensor
    se: Tensor
    nfe: tuple[int, int, int]

    def __getitem__(self, sel: slice) -> "Scored":
        return Scored(self.logp[sel], self.se[sel], self.nfe)

    @staticmethod
    def cat(a: "Scored", b: "Scored") -> "Scored":
        return Scored(torch.cat([a.logp, b.logp]), torch.cat([a.se, b.se]), a.nfe)


class Batches:
    """The batch size of one rank's shard, and the scoring of a batch with out-of-memory halving.

    ``batch_size`` given: that size. Otherwise on CPU the size follows from
    :func:`~diffdensity.scoring.accel.bytes_per_row` and the free memory shared by the
    ``local_world`` processes of the machine; on a GPU the first batch has 2 images
    and :meth:`score` measures its peak memory to size the rest (``measuring``).
    """

    def __init__(self, scorer: Scorer, device: torch.device, *, batch_size, n_todo: int, local_world: int, compile: bool):
        self.scorer, self.device, self.compile = scorer, device, compile
        self.measuring = batch_size is None and device.type == "cuda"
        if batch_size is not None:
            size = batch_size
        elif self.measuring:
            size = 2
        else:
            per_image = bytes_per_row(scorer.model, scorer.event_shape, scorer.dtype, device) * scorer.rows_per_image
            budget = available_memory(device) // (2 * max(local_world, 1))
            size = max(1, min(CPU_MAX_BATCH, budget // max(per_image, 1)))
        self.size = max(1, min(size, n_todo)) if n_todo else size
        self.pad_to = self.size if compile else None

    def score(self, images: Tensor, ids: list[int]) -> Scored:
        """The :class:`Scored` results of a batch (content ids ``ids``); on a GPU's first batch, size the later ones."""
        if not self.measuring:
            return self._score(images, ids)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = self._score(images, ids)
        per_image = max(1, (torch.cuda.max_memory_allocated(self.device) - base) // len(ids))
        self.size = int(max(1, min(GPU_MAX_BATCH, 0.8 * available_memory(self.device) // per_image)))
        self.pad_to = self.size if self.compile else None
        self.measuring = False
        return out

    def _score(self, images: Tensor, ids: list[int]) -> Scored:
        n = len(ids)
        idx = torch.tensor(ids, dtype=torch.int64)
        if self.pad_to is not None and n < self.pad_to:  # one shape for compiled networks; extra rows are dropped
            images = torch.cat([images, images[-1:].expand(self.pad_to - n, *images.shape[1:])])
            idx = torch.cat([idx, idx[-1:].expand(self.pad_to - n)])
        try:
            return self.scorer(images.to(self.device), idx.to(self.device))[:n]
        except Exception as e:
            if not is_oom(e) or n == 1:
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = n // 2
        self.size = max(1, min(self.size, half))
        self.pad_to = None if self.pad_to is None else self.size
        return Scored.cat(self._score(images[:half], ids[:half]), self._score(images[half:n], ids[half:]))


class Prefetch:
    """Loads the batches of ``todo`` from ``source`` in a worker thread, one batch ahead."""

    def __init__(self, pool: ThreadPoolExecutor, source: Source, todo: list[int], batches: Batches):
        self.pool, self.source, self.todo, self.batches = pool, source, todo, batches
        self.pos = 0

    def submit(self) -> Future | None:
        """Start loading the next batch (of the current batch size); ``None`` when all are taken."""
        if self.pos >= len(self.todo):
            return None
        positions = self.todo[self.pos : self.pos + self.batches.size]
        self.pos += len(positions)
        return self.pool.submit(self.source.load, positions)
