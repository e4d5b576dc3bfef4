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
    """The ``nn.Module`` holding the model's weights, as the model declares it (``model.network``), or ``None``."""
    net = getattr(model, "network", None)
    return net if isinstance(net, nn.Module) else None


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
    """The model with its network on ``device``, optionally compiled and under autocast.

    A network the model calls as ``fn`` (:class:`~diffdensity.models.ScoreModel`) is
    replaced in a shallow copy of the model; one it calls as ``network`` (the diffusers
    adapter) is compiled there and autocast wraps the whole score. Models without a
    declared network are not compiled (with a warning) and get autocast on the score.
    """
    net = network_of(model)
    if net is not None:
        net.to(device)
    if amp is None and not compile:
        return model
    if net is None:
        if compile:
            print("warning: --compile needs a model that declares its network (model.network); ignored", file=sys.stderr)
        return model if amp is None else AutocastModel(model, device.type, amp)
    calls_fn = isinstance(model, ScoreModel) and model.fn is net
    wrapped = copy.copy(model)
    if compile:
        compiled = torch.compile(net, dynamic=False)
        if calls_fn:
            wrapped.fn = compiled
        else:
            wrapped.network = compiled
            if getattr(model.fn, "__self__", None) is model:  # fn is a method calling self.network: rebind it
                wrapped.fn = getattr(wrapped, model.fn.__name__)
    if amp is None:
        return wrapped
    if calls_fn:
        wrapped.fn = Autocast(wrapped.fn, device.type, amp)
        return wrapped
    return AutocastModel(wrapped, device.type, amp)


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

