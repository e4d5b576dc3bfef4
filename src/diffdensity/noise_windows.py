"""Noise windows of stochastic density guidance: ``phi~(t)`` from names, logSNR windows or a callable (docs/math.md s.4b)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["NOISE_WINDOWS", "noise_schedule"]

# phi~ windows of the DG-SDE: (logSNR low, logSNR high, phi~)
NOISE_WINDOWS = {
    "early": [(-10.0, -4.0, 0.2)],  # high noise: changes shapes and composition
    "late": [(-3.0, 9.0, 0.3)],  # low noise: changes texture
}


def noise_schedule(spec: Any, schedule: Schedule) -> Callable[[Tensor], float]:
    """``phi~(t)`` of the DG-SDE from ``"early"``, ``"late"``, windows or a callable.

    Windows are ``[(log_snr_low, log_snr_high, phi~), ...]``: ``phi~`` is that value while
    the logSNR lies in ``(low, high)`` and 0 elsewhere. A callable receives ``t`` (float64
    scalar tensor) and returns a number >= 0.
    """
    if callable(spec):
        def from_callable(t: Tensor) -> float:
            value = float(spec(t))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"noise schedule returned {value!r} at t={float(t):g}; it must be finite and >= 0")
            return value

        return from_callable
    if isinstance(spec, str):
        if spec not in NOISE_WINDOWS:
            raise ValueError(f"unknown noise schedule {spec!r}; expected one of {sorted(NOISE_WINDOWS)}, windows or a callable")
        windows = NOISE_WINDOWS[spec]
    else:
        windows = spec
    try:
        windows = [(float(lo), float(hi), float(val)) for lo, hi, val in windows]
    except (TypeError, ValueError):
        raise ValueError(f"noise windows must be (log_snr_low, log_snr_high, phi) triples, got {spec!r}") from None
    lmin, lmax = schedule.log_snr_min, schedule.log_snr_max
    for lo, hi, val in windows:
        if not (lo < hi and val >= 0 and math.isfinite(val)):
            raise ValueError(f"noise window {(lo, hi, val)} needs low < high and a finite phi >= 0")
        if lo < lmin - 1e-9 or hi > lmax + 1e-9:
            raise ValueError(f"noise window ({lo:g}, {hi:g}) lies outside the logSNR range [{lmin:.4g}, {lmax:.4g}] of {schedule!r}")

    def from_windows(t: Tensor) -> float:
        lam = float(schedule.log_snr(t.to(torch.float64)))
        return sum(val for lo, hi, val in windows if lo < lam < hi)

    return from_windows
