"""Progress of the sampling commands: a tqdm bar on a terminal, one line per phase elsewhere.

Off a terminal (a log file, CI, a pipe) a bar would print nothing useful, so each phase
(one sampler run, one batch) prints a single line when it ends: its name, its steps and
its wall time.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "run_with_progress"]


class Progress:
    """A ``sample`` callback over ``steps`` solver steps (``None``: not known in advance, an
    adaptive solver), named ``desc``; call :meth:`close` at the end."""

    def __init__(self, steps: int | None, desc: str, *, stream=None, tty: bool | None = None):
        self.steps, self.desc = steps, desc
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.perf_counter()
        self.done = 0
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=desc, leave=False, unit="step", file=self.stream)

    def __call__(self, info) -> None:
        step = int(info.step)
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)
        self.done = max(self.done, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            return
        of = "" if self.steps is None else f"/{self.steps}"
        print(f"{self.desc}: {self.done}{of} steps in {time.perf_counter() - self.t0:.1f} s", file=self.stream, flush=True)


def run_with_progress(draw, desc: str, steps: int, *, adaptive: bool = False, **kwargs):
    """``draw(callback=..., steps=steps, **kwargs)`` with a :class:`Progress` around it
    (``adaptive``: the solver chooses its own steps, so no total is shown)."""
    bar = Progress(None if adaptive else steps, desc)
    try:
        return draw(callback=bar, steps=steps, **kwargs)
    finally:
        bar.close()
