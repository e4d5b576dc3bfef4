"""What a dataset-scoring run did: :class:`EvaluationResult`, its :meth:`~EvaluationResult.summary`
and the report on standard error."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._repr import short_repr

__all__ = ["EvaluationResult", "report"]


@dataclass(repr=False)
class EvaluationResult:
    """What :func:`score_dataset` did. ``rows`` (this run's inputs, in input order) is filled on rank 0 only.

    ``computed``: inputs scored by this call (all ranks); ``resumed``: taken from earlier
    runs; ``changed``: inputs rescored because their content differs from an earlier
    row's; ``failures``: ``(index, file, status, message)`` of inputs that could not be
    scored; ``problems``: ``"FILE line N: why"`` for every line of earlier results that
    was not accepted (and recomputed where it belongs to an input); ``n_rows``: rows in
    the output file (this run's inputs and those of earlier runs); ``seconds``: wall
    time of the scoring on rank 0.
    """

    __repr__ = short_repr

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
    problems: list[str] = field(default_factory=list)
    changed: int = 0
    n_rows: int = 0

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
        ok = lambda r: r["status"] == "ok" and r[name] != ""  # noqa: E731
        return torch.tensor([float(r[name]) if ok(r) else math.nan for r in self.rows], dtype=torch.float64)

    @property
    def logp(self) -> Tensor:
        """``(N,)`` float64 log-densities in nats (NaN where an input failed; rank 0 only)."""
        return self._column("logp_nats")

    @property
    def stderr(self) -> Tensor:
        """``(N,)`` float64 standard errors of :attr:`logp` in nats (NaN where unknown or failed; rank 0 only)."""
        return self._column("logp_se_nats")

    @property
    def bpd(self) -> Tensor:
        """``(N,)`` float64 bits per dimension (NaN where an input failed; rank 0 only)."""
        return self._column("bpd")

    def summary(self) -> dict[str, Any]:
        """The run as JSON-ready numbers: counts, mean bits/dim with its standard error over
        the inputs, network passes, timing, settings, failures and rejected lines."""
        bpd = self.bpd[~self.bpd.isnan()] if self.rows else torch.empty(0, dtype=torch.float64)
        n = int(bpd.numel())
        nfe = {k: sum(int(r[f"nfe_{k}"] or 0) for r in self.rows) for k in ("forward", "jvp", "vjp")}
        return dict(
            out=str(self.out), n_inputs=self.n_inputs, n_ok=self.n_ok, n_failed=self.n_failed, n_rows=self.n_rows,
            computed=self.computed, resumed=self.resumed, changed=self.changed,
            mean_bpd=float(bpd.mean()) if n else None,
            mean_bpd_stderr=float(bpd.std() / math.sqrt(n)) if n > 1 else None,
            nfe=nfe, seconds=self.seconds, samples_per_second=self.samples_per_second if self.computed else None,
            world_size=self.world_size, batch_size=self.batch_size, settings=self.settings,
            failures=[dict(index=i, file=f, status=s, message=m) for i, f, s, m in self.failures],
            problems=list(self.problems),
        )  # fmt: skip


def report(result: EvaluationResult, file=None) -> None:
    """The summary of a run on standard error: counts, mean bits/dim, failures, rejected lines."""
    err = sys.stderr if file is None else file
    s = result.summary()
    print(
        f"logp: {s['n_inputs']} inputs -> {s['out']}: {s['n_ok']} scored ({s['computed']} now, {s['resumed']} from "
        f"earlier runs), {s['n_failed']} failed" + (f"; {s['n_rows']} rows in the file" if s["n_rows"] > s["n_inputs"] else ""),
        file=err,
    )
    if s["changed"]:
        print(f"logp: {s['changed']} input(s) changed since their earlier row (other content): scored again", file=err)
    for p in s["problems"][:20]:
        print(f"logp: warning: {p}; line ignored (its input is scored again)", file=err)
    if len(s["problems"]) > 20:
        print(f"logp: warning: ... and {len(s['problems']) - 20} more lines ignored", file=err)
    if s["mean_bpd"] is not None:
        se = s["mean_bpd_stderr"]
        spread = f" +- {se:.4f} (standard error over {s['n_ok']} inputs)" if se is not None else " (one input: no spread over inputs)"
        print(f"logp: mean bits/dim {s['mean_bpd']:.4f}{spread}", file=err)
    failures = s["failures"]
    if failures:
        counts: dict[str, int] = {}
        for f in failures:
            counts[f["status"]] = counts.get(f["status"], 0) + 1
        print("logp: failed inputs: " + ", ".join(f"{c} {k}" for k, c in sorted(counts.items())), file=err)
        for f in failures[:50]:
            print(f"  [{f['status']}] {f['file'] or 'index ' + str(f['index'])}: {f['message']}", file=err)
        if len(failures) > 50:
            print(f"  ... and {len(failures) - 50} more (see the status column of {s['out']})", file=err)
