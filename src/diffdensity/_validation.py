"""Argument checks shared by the public functions: clear errors, never silent NaNs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_model(model: Any) -> None:
    if not (hasattr(model, "score") and callable(model.score) and hasattr(model, "schedule")):
        raise TypeError(
            f"model must provide .score(x, t, **cond) and .schedule (wrap a network with "
            f"dd.ScoreModel(fn, schedule, parametrization=...)); got {type(model).__name__}"
        )


def check_x(x: Any, model: Any = None, *, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, *event_shape) with B >= 1, got {tuple(x.shape)}")
    event_shape = getattr(model, "event_shape", None)
    if event_shape is not None and tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{name} has event shape {tuple(x.shape[1:])}, but the model expects {tuple(event_shape)}")
    bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    if bad.any():
        raise ValueError(f"{name} contains NaN or Inf in {int(bad.sum())} of {x.shape[0]} samples (first: index {int(bad.nonzero()[0])})")
    return x


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices) -> Any:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")
    return value


def check_kwargs(kwargs: Any) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(kwargs).__name__}")
    return kwargs
