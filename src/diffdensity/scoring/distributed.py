"""The process group of a dataset-scoring job (``torchrun``, a caller's group, or one process).

:class:`ProcessGroup` joins the ``torch.distributed`` job that ``torchrun`` launched
(``env://``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) with
the gloo backend on CPU and NCCL on GPUs, reuses a group the caller initialised, and
degrades to a single process when neither exists. Only small Python objects travel
between ranks (the work list at the start, the finished rows at the end), so the
ranks never synchronise while they compute.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ProcessGroup", "resolve_device"]


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

