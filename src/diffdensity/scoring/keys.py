"""Counter-based random numbers: a sample's noise is a function of its key, not of its batch.

A 32-bit integer hash (Wellons' "lowbias32", a bijection on 32-bit words) chained over
the words (seed, stream, sample id, draw, step) gives each sample two 32-bit keys;
element j of its stream is hash(hash(j ^ k1) ^ k2). Everything is int64 tensor
arithmetic that never overflows (products are split into 16-bit halves), so the bits
are the same on every device and for every batch layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sample_keys", "advance_keys", "uniform", "rademacher", "normal", "STREAM_DEQUANT", "STREAM_PROBES"]

_M32 = 0xFFFFFFFF
_LANES = (0x243F6A88, 0x85A308D3)  # digits of pi: two independent key lanes
STREAM_DEQUANT, STREAM_PROBES = 1, 2


def _mul32(a: Tensor, c: int) -> Tensor:
    """``a * c mod 2^32`` for int64 ``a`` in ``[0, 2^32)`` without int64 overflow."""
    lo, hi = a & 0xFFFF, a >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _words(value: int | Tensor) -> list[int | Tensor]:
    if isinstance(value, Tensor):
        value = value.to(torch.int64)
        return [value & _M32, (value >> 32) & _M32]
    value = int(value)
    if value < 0:
        raise ValueError(f"seed, index and counters must be non-negative, got {value}")
    return [value & _M32, (value >> 32) & _M32]


def sample_keys(seed: int, stream: int, index: Tensor, *counters: int | Tensor) -> Tensor:
    """Keys ``(B, 2)`` int64 of the random stream ``stream`` of samples ``index`` ``(B,)``.

    ``counters`` (ints or ``(B,)`` tensors, e.g. the dequantisation draw) are absorbed
    too. The keys depend on nothing else, in particular not on the batch.
    """
    index = index.to(torch.int64)
    if (index < 0).any():
        raise ValueError("sample indices must be non-negative")
    words = _words(seed) + [stream] + _words(index)
    for c in counters:
        words += _words(c)
    lanes = []
    for init in _LANES:
        h = torch.full_like(index, init)
        for w in words:
            h = _hash32(h ^ w)
        lanes.append(h)
    return torch.stack(lanes, 1)


def advance_keys(keys: Tensor, counter: int) -> Tensor:
    """The keys of sub-stream ``counter`` (e.g. a solver step) of ``keys`` ``(B, 2)``."""
    return _hash32(keys ^ (int(counter) & _M32))


def _bits(keys: Tensor, n: int) -> Tensor:
    j = torch.arange(n, device=keys.device, dtype=torch.int64)
    return _hash32(_hash32(keys[:, :1] ^ j) ^ keys[:, 1:])  # (B, n) in [0, 2^32)


def uniform(keys: Tensor, n: int) -> Tensor:
    """``(B, n)`` float64 uniforms in ``(0, 1)`` (32 random bits each) from keys ``(B, 2)``."""
    return (_bits(keys, n).to(torch.float64) + 0.5) * 2.0**-32


def rademacher(keys: Tensor, n: int) -> Tensor:
    """``(B, n)`` float64 signs +-1 from keys ``(B, 2)``."""
    return (_bits(keys, n) >> 31).to(torch.float64) * 2 - 1


def normal(keys: Tensor, n: int) -> Tensor:
    """``(B, n)`` float64 standard normals (Box-Muller) from keys ``(B, 2)``."""
    u = uniform(keys, 2 * n)
    return torch.sqrt(-2 * torch.log(u[:, :n])) * torch.cos(2 * math.pi * u[:, n:])

