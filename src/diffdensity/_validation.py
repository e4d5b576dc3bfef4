"""Argument checks shared by the public functions: clear errors, never silent NaNs."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

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
    """A positive integer (Python or NumPy), returned as ``int``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_float(value: Any, name: str) -> float:
    """A finite real number (Python, NumPy or a 0-d tensor), returned as ``float``."""
    if isinstance(value, Tensor) and value.ndim == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive_float(value: Any, name: str) -> float:
    value = check_float(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def check_optional_float(value: Any, name: str) -> float | None:
    return None if value is None else check_float(value, name)


def check_callable(value: Any, name: str) -> Callable:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_diffusion(value: Any, name: str) -> Any:
    """``None`` (no noise), a callable ``phi(x, t)`` or a number ``phi >= 0``."""
    if value is None or callable(value):
        return value
    phi = check_float(value, name)
    if phi < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return phi


def choice(*choices: Any) -> Callable[[Any, str], Any]:
    """A check that accepts only ``choices``."""

    def check(value: Any, name: str) -> Any:
        return check_choice(value, name, choices)

    return check


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """``check`` that lets ``None`` through."""
    return lambda value, name: None if value is None else check(value, name)


def check_generator(generator: Any, name: str = "generator") -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None, got {type(generator).__name__} "
            f"(make one with torch.Generator().manual_seed(seed))"
        )
    return generator


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
