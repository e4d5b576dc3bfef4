"""Running the network fast and within memory: device placement, autocast, compile, batch sizing."""

from __future__ import annotations

import copy
import math
import sys
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..models import ScoreModel

__all__ = ["is_oom", "network_of", "prepare_model", "available_memory", "bytes_per_row", "CPU_MAX_BATCH", "GPU_MAX_BATCH"]

CPU_MAX_BATCH, GPU_MAX_BATCH = 64, 2048


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def network_of(model) -> nn.Module | None:
    fn = getattr(model, "fn", None)
    return fn if isinstance(fn, nn.Module) else None


class Autocast:
    """Runs ``fn`` under ``torch.autocast``; the output is cast back to the input's dtype."""

    def __init__(self, fn: Callable, device_type: str, dtype: torch.dtype):
        self.fn, self.device_type, self.dtype = fn, device_type, dtype

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.fn(x, *args, **kwargs)
        return out.to(x.dtype)


class AutocastModel:
    def __init__(self, model, device_type: str, dtype: torch.dtype):
        self.model, self.schedule = model, model.schedule
        self.event_shape = getattr(model, "event_shape", None)
        self._score = Autocast(model.score, device_type, dtype)

    def score(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self._score(x, t, **cond)


def prepare_model(model, device: torch.device, *, amp: torch.dtype | None, compile: bool):
    net = network_of(model)
    if net is not None:
        net.to(device)
    if amp is None and not compile:
        return model
    if isinstance(model, ScoreModel) and net is not None:
        fn: Callable = net
        if compile:
            fn = torch.compile(fn, dynamic=False)
        if amp is not None:
            fn = Autocast(fn, device.type, amp)
        wrapped = copy.copy(model)
        wrapped.fn = fn
        return wrapped
    if compile:
        print("warning: --compile applies to networks wrapped in ScoreModel; ignored for this model", file=sys.stderr)
    return model if amp is None else AutocastModel(model, device.type, amp)


def available_memory(device: torch.device) -> int:
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


def bytes_per_row(model, event_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> int:
    """Rough peak memory of one row of a Jacobian-product pass (CPU estimate).

    Sums the outputs of every submodule in one forward pass of a single row, doubled for
    the tangents and doubled again for the intermediates the sum misses. Models that
    are not ``nn.Module`` networks get ``64 D`` float64 values.
    """
    net = network_of(model)
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

