"""Short, readable reprs for result objects: tensors summarised, never dumped."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


def summary(value: Any) -> str:
    """One short string for a field: a tensor as its shape, dtype and (if floating) mean."""
    if isinstance(value, Tensor):
        shape = "x".join(map(str, value.shape)) or "scalar"
        text = f"<{shape} {str(value.dtype).removeprefix('torch.')}"
        if value.is_floating_point() and value.numel() and value.device.type != "meta":
            text += f", mean {float(value.to(torch.float64).mean()):.4g}"
        return text + ">"
    if isinstance(value, dict):
        return f"{{{len(value)} settings}}" if len(value) > 4 else repr(value)
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"[{len(value)} items]"
    return repr(value)


def short_repr(self: Any) -> str:
    """``ClassName(field=summary, ...)`` for a dataclass instance (use as its ``__repr__``)."""
    fields = ", ".join(f"{f.name}={summary(getattr(self, f.name))}" for f in dataclasses.fields(self) if f.repr)
    return f"{type(self).__name__}({fields})"
