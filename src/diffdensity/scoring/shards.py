"""Sharded, resumable result files: one append-only part file per rank, merged atomically.

:class:`ShardedCSV` keeps one append-only part file per rank next to the output.
Every batch of rows is one ``write`` of whole lines followed by ``fsync``, so a
killed process leaves at most one torn trailing line, which readers ignore and the
owning rank truncates before appending again. Rows are keyed by the sample index;
rank 0 merges them, deduplicated and in index order, into the output with an atomic
replace.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

from .._files import atomic_write, fsync_dir

__all__ = ["ShardedCSV", "PartWriter"]


def _csv_line(values: Iterable[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


class ShardedCSV:
    """Rows ``{column: str}`` keyed by an integer ``key`` column, written by many ranks.

    Files: the merged output ``out``, its settings ``out.meta.json`` and, while a job
    runs, the part files ``out.parts/rank-NNNNN.csv`` (one per rank, append only) and
    the lock ``out.lock`` (see :meth:`lock`).
    """

    def __init__(self, out: str | os.PathLike, columns: list[str], key: str = "index"):
        self.out = Path(out)
        self.columns, self.key = list(columns), key
        self.header = _csv_line(self.columns)
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.meta_path = self.out.with_name(self.out.name + ".meta.json")

    # -- settings ---------------------------------------------------------------------
    def exists(self) -> bool:
        return self.out.exists() or self.parts_dir.exists() or self.meta_path.exists()

    def read_meta(self) -> dict | None:
        if not self.meta_path.exists():
            return None
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def write_meta(self, meta: dict) -> None:
        atomic_write(self.meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def remove(self) -> None:
        """Delete the output, its settings and any part files."""
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        for p in (self.out, self.meta_path):
            p.unlink(missing_ok=True)

    # -- reading ----------------------------------------------------------------------
    def part_files(self) -> list[Path]:
        return sorted(self.parts_dir.glob("rank-*.csv")) if self.parts_dir.exists() else []

    def _parse(self, path: Path, data: bytes, validate: Callable[[dict], str | None]) -> tuple[list[dict[str, str]], list[str]]:
        """Rows of ``data`` that ``validate`` accepts, and a ``"PATH line N: why"`` for each other line.

        The header line is skipped; a last line without its newline is torn (a writer
        was killed mid-line) and ignored.
        """
        lines = data.split(b"\n")
        problems = []
        if lines.pop() != b"":  # text after the last newline (or b"" when it ends cleanly)
            problems.append(f"{path} line {len(lines) + 1}: incomplete last line (an interrupted write)")
        header = self.header.rstrip("\n")
        rows = []
        for number, raw in enumerate(lines, 1):
            why = None
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                text, why = "", "not UTF-8 text"
            if text == header or (not text and why is None):
                continue
            fields = next(csv.reader([text]), []) if why is None else []
            if why is None and len(fields) != len(self.columns):
                why = f"{len(fields)} fields, expected {len(self.columns)} ({', '.join(self.columns)})"
            row = dict(zip(self.columns, fields))
            why = why or validate(row)
            if why:
                problems.append(f"{path} line {number}: {why}")
            else:
                rows.append(row)
        return rows, problems

    def read_rows(self, validate: Callable[[dict], str | None] = lambda row: None) -> tuple[list[dict[str, str]], list[str]]:
        """The accepted rows of the output, then of the part files, and what was wrong with the others."""
        rows, problems = [], []
        for path in ([self.out] if self.out.exists() else []) + self.part_files():
            try:
                data = path.read_bytes()
            except OSError as e:
                problems.append(f"{path}: cannot be read ({e})")
                continue
            r, bad = self._parse(path, data, validate)
            rows += r
            problems += bad
        return rows, problems

    @contextmanager
    def lock(self):
        """Hold ``out.lock`` (``flock``) for one run; another run at the same output is refused."""
        import fcntl

        path = self.out.with_name(self.out.name + ".lock")
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OSError(f"cannot write next to the output {self.out}: creating {path} failed ({e.strerror}); choose a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RuntimeError(
                    f"{self.out} is being written by another run (it holds {path.name}); wait for it to finish or choose another output"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a lock file another run just removed
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    # -- writing ----------------------------------------------------------------------
    def open_part(self, rank: int) -> "PartWriter":
        """This rank's append-only part file, with any torn trailing line removed."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        return PartWriter(self.parts_dir / f"rank-{rank:05d}.csv", self.columns, self.header)

    def merge(self, rows: Iterable[dict[str, str]]) -> int:
        """Write ``rows`` in the order of their integer ``key`` column to ``out`` atomically; returns their count."""
        rows = sorted(rows, key=lambda r: int(r[self.key]))
        atomic_write(self.out, self.header + "".join(_csv_line(r[c] for c in self.columns) for r in rows))
        return len(rows)

    def remove_parts(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)


class PartWriter:
    """Appends whole lines with one ``os.write`` and an ``fsync`` per call."""

    def __init__(self, path: Path, columns: list[str], header: str):
        self.path, self.columns = path, columns
        with open(path, "a+b") as f:  # created if missing
            f.seek(0)
            data = f.read()
            keep = data.rfind(b"\n") + 1  # drop a torn trailing line left by a killed writer
            if keep != len(data):
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        size = keep
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if size == 0:
            self._write(header)
            fsync_dir(path.parent)

    def _write(self, text: str) -> None:
        data = text.encode()
        view = memoryview(data)
        while view:  # a regular file takes it in one call; loop only on a short write
            n = os.write(self.fd, view)
            view = view[n:]
        os.fsync(self.fd)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._write("".join(_csv_line(row[c] for c in self.columns) for row in rows))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

