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
import sys
from pathlib import Path
from typing import Any, Iterable

from .._files import atomic_write, fsync_dir

__all__ = ["ShardedCSV", "PartWriter"]


def _csv_line(values: Iterable[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


class ShardedCSV:
    """Rows ``{column: str}`` keyed by an integer ``key`` column, written by many ranks.

    Files: the merged output ``out``, its settings ``out.meta.json`` and, while a job
    runs, the part files ``out.parts/rank-NNNNN.csv`` (one per rank, append only).
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

    def _parse(self, data: bytes) -> tuple[list[dict[str, str]], int]:
        """Complete, well-formed rows of ``data``; a trailing line without newline is torn."""
        lines = data.split(b"\n")
        torn = lines.pop() != b""  # text after the last newline (or b"" when it ends cleanly)
        rows, bad = [], int(torn)
        header = self.header.rstrip("\n")
        for raw in lines:
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                bad += 1
                continue
            if not text or text == header:
                continue
            fields = next(csv.reader([text]), [])
            if len(fields) != len(self.columns):
                bad += 1
                continue
            row = dict(zip(self.columns, fields))
            try:
                int(row[self.key])
            except ValueError:
                bad += 1
                continue
            rows.append(row)
        return rows, bad

    def read_rows(self) -> tuple[list[dict[str, str]], int]:
        """All complete rows of the output and the part files, and the count of skipped lines."""
        rows, skipped = [], 0
        for path in ([self.out] if self.out.exists() else []) + self.part_files():
            try:
                data = path.read_bytes()
            except OSError as e:
                print(f"warning: cannot read {path}: {e}", file=sys.stderr)
                continue
            r, bad = self._parse(data)
            rows += r
            skipped += bad
        return rows, skipped

    # -- writing ----------------------------------------------------------------------
    def open_part(self, rank: int) -> "PartWriter":
        """This rank's append-only part file, with any torn trailing line removed."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        return PartWriter(self.parts_dir / f"rank-{rank:05d}.csv", self.columns, self.header)

    def merge(self, rows: Iterable[dict[str, str]]) -> int:
        """Write ``rows`` (deduplicated by key, first wins) in key order to ``out`` atomically."""
        by_key: dict[int, dict[str, str]] = {}
        for row in rows:
            by_key.setdefault(int(row[self.key]), row)
        text = self.header + "".join(_csv_line(by_key[k][c] for c in self.columns) for k in sorted(by_key))
        atomic_write(self.out, text)
        return len(by_key)

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

