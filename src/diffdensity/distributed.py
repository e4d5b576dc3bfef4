"""Process groups and sharded, resumable result files for dataset-scale evaluation.

* :class:`ProcessGroup` joins the ``torch.distributed`` job that ``torchrun`` launched
  (``env://``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) with
  the gloo backend on CPU and NCCL on GPUs, reuses a group the caller initialised, and
  degrades to a single process when neither exists. Only small Python objects travel
  between ranks (the work list at the start, the finished rows at the end), so the
  ranks never synchronise while they compute.
* :class:`ShardedCSV` keeps one append-only part file per rank next to the output.
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
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

__all__ = ["ProcessGroup", "ShardedCSV", "atomic_write"]


# -- process group ---------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU. A bare ``"cuda"`` means ``cuda:LOCAL_RANK``."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


class ProcessGroup:
    """This process's place in a (possibly one-process) ``torch.distributed`` job.

    Use :meth:`join`; ``rank``, ``world_size``, ``local_rank`` and ``device`` describe
    the process. Collectives are no-ops for a single process. :meth:`close` destroys
    the group only if :meth:`join` created it.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, local_world_size: int, device: torch.device, owned: bool):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.device, self.owned = device, owned

    def __repr__(self) -> str:
        backend = dist.get_backend() if self.distributed else None
        return f"ProcessGroup(rank={self.rank}, world_size={self.world_size}, device={self.device}, backend={backend})"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @classmethod
    def join(cls, device: str | torch.device | None = None, *, timeout: timedelta = timedelta(hours=2)) -> "ProcessGroup":
        """Join the current job: an initialised default group, ``torchrun``'s environment, or none.

        A group is created (``init_method="env://"``) when ``WORLD_SIZE > 1`` and none
        exists: NCCL when this rank's device is a GPU, gloo otherwise. ``timeout``
        bounds how long a rank waits for the others at the start and the end.
        """
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", 1)
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            return cls(dist.get_rank(), world, local_rank, max(local_world, 1), dev, owned=False)
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls(0, 1, 0, 1, dev, owned=False)
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dev, owned=True)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (in rank order) on rank 0; ``None`` elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False

    def _comm_device(self) -> torch.device | None:
        return self.device if dist.get_backend() == "nccl" else None


# -- files -----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
            _fsync_dir(path.parent)

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
