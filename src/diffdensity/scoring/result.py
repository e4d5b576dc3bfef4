"""What a dataset-scoring run did: :class:`EvaluationResult` and its summary on standard error."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["EvaluationResult", "report"]


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



def report(out: Path, n: int, summary: dict, bpds: list[float], skipped: int) -> None:
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

