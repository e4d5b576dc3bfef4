"""Target mode of density guidance: where to shoot next, and what to measure (docs/guidance.md).

Density guidance at ``z = Phi^-1(q)`` maps each latent to a sample whose ``log p_0``
increases with ``z``; target mode looks for the ``z`` that lands on a wanted value, one
sampling pass per guess. :func:`next_z` is the root finder, :func:`reencode_result` the
measurement that replaces a pass's tracked ``log p_0`` by the re-encoded density of its
samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MAX_DZ", "next_z", "reencode_result"]

MAX_DZ = 1.0
"""Largest change of ``z = Phi^-1(q)`` per shooting pass before the target is bracketed."""


def next_z(history: list[tuple[Tensor, Tensor]], target: Tensor, slope0: float) -> Tensor:
    """The next ``z`` per sample ``(B,)`` from the passes so far, ``history = [(z, log p_0), ...]`` (each ``(B,)``).

    Before two passes bracket ``target``: a secant step (with ``slope0`` nats per unit of
    ``z`` for the first, or where the secant is not usable), at most :data:`MAX_DZ`.
    Bracketed: regula falsi between the closest passes on either side, kept 5% inside the
    bracket, and a bisection after two passes on the same side (where regula falsi stalls).
    """
    zs, ls = torch.stack([h[0] for h in history]), torch.stack([h[1] for h in history])
    miss = target - ls  # (P, B): > 0 where log p_0 is below the target
    inf = torch.tensor(math.inf, dtype=zs.dtype, device=zs.device)
    z_lo = torch.where(miss > 0, zs, -inf).max(0).values  # highest z still below the target
    z_hi = torch.where(miss < 0, zs, inf).min(0).values  # lowest z above it
    cols = torch.arange(zs.shape[1], device=zs.device)
    l_lo = ls[torch.where(miss > 0, zs, -inf).argmax(0), cols]
    l_hi = ls[torch.where(miss < 0, zs, inf).argmin(0), cols]
    bracketed = torch.isfinite(z_lo) & torch.isfinite(z_hi) & (z_lo < z_hi)
    width = (z_hi - z_lo).where(bracketed, torch.ones_like(z_lo))
    falsi = z_lo + (target - l_lo) / (l_hi - l_lo).where(bracketed, torch.ones_like(l_lo)) * width
    falsi = torch.minimum(torch.maximum(falsi, z_lo + 0.05 * width), z_hi - 0.05 * width)
    if len(history) >= 2:  # regula falsi stalls on one side: bisect after two passes on the same side
        same_side = (miss[-1] > 0) == (miss[-2] > 0)
        falsi = falsi.where(~same_side, 0.5 * (z_lo + z_hi))
    z1, m1 = zs[-1], miss[-1]
    slope = torch.full_like(z1, slope0)
    if len(history) >= 2:
        dz, dl = zs[-1] - zs[-2], ls[-1] - ls[-2]
        secant = dl / dz.where(dz.abs() > 1e-12, torch.ones_like(dz))
        slope = secant.where((dz.abs() > 1e-12) & (secant > 0.05 * slope0) & torch.isfinite(secant), slope)
    step = (m1 / slope).clamp(-MAX_DZ, MAX_DZ)
    return falsi.where(bracketed, z1 + step)


def reencode_result(ctx, res) -> None:
    """Replace a pass's tracked ``log p_0`` by its samples' re-encoded one (:func:`~diffdensity.log_likelihood`).

    The re-encoding keeps the likelihood's defaults and the same probes in every pass
    (seed 0), so the shooting sees a smooth function of ``z``; its passes are added to the
    call's count. ``logp_path`` stays the tracked path.
    """
    from .likelihood import log_likelihood

    lik = log_likelihood(ctx.model, res.x, generator=torch.Generator(device=res.x.device).manual_seed(0), model_kwargs=ctx.cond or None)
    ctx.nfe.add(lik.nfe)
    res.settings["tracked_logp"] = [float(v) for v in res.logp]
    res.settings["logp_source"] = "re-encoded by log_likelihood (its defaults, probe seed 0)"
    res.logp, res.logp_stderr = lik.logp, lik.stderr
