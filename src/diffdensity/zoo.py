"""Models by name: ``builtin:NAME``, ``diffusers:PATH`` and ``gmm:NAME`` (exact mixtures).

The exact mixtures are ground truth and zero-setup demos: their log-density, score and
Laplacian are known in closed form at every t.
"""

from __future__ import annotations

import math

import torch

from .analytic import GaussianMixture, random_rotation
from .schedules import VP

__all__ = ["load_model", "gmm_preset", "GMM_PRESETS"]

GMM_PRESETS = {
    "ring2d": "8 isotropic components on a circle of radius 2 in D = 2 (std 0.15)",
    "mix64": "rotated 4-component mixture in D = 64, stds log-uniform in 0.05..1",
    "image16": "rotated 10-component mixture of 3x16x16 images, stds log-uniform in 0.05..1",
    "image32": "rotated 10-component mixture of 3x32x32 images, stds log-uniform in 0.05..1 (the benchmark problem)",
}


def gmm_preset(name: str, *, seed: int = 0) -> GaussianMixture:
    """One of :data:`GMM_PRESETS` on the VP schedule (logSNR in [-10, 10])."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    if name == "ring2d":
        angles = torch.arange(8, dtype=f64) * (2 * math.pi / 8)
        means = 2 * torch.stack([angles.cos(), angles.sin()], 1)
        return GaussianMixture(means, 0.15, schedule=VP())
    shapes = {"mix64": ((64,), 4), "image16": ((3, 16, 16), 10), "image32": ((3, 32, 32), 10)}
    if name not in shapes:
        raise ValueError(f"unknown mixture preset {name!r}; expected one of {sorted(GMM_PRESETS)}")
    shape, k = shapes[name]
    dim = math.prod(shape)
    rotation = random_rotation(dim, generator=g)
    means = torch.randn(k, dim, generator=g, dtype=f64) * (2.0 if name == "mix64" else 1.0) / (1.0 if name == "mix64" else math.sqrt(3))
    stds = torch.exp(torch.empty(k, dim, dtype=f64).uniform_(math.log(0.05), 0.0, generator=g))
    if len(shape) > 1:  # images: keep pixel values mostly inside [-1, 1]
        means = means.clamp(-0.8, 0.8)
        stds = stds * 0.3
    return GaussianMixture(means.reshape(k, *shape), stds.reshape(k, *shape), schedule=VP(), rotation=rotation)


def load_model(spec: str, *, device: torch.device | str | None = None):
    """Resolve a model specification.

    * ``builtin:NAME`` -- a model shipped with the package (``builtin`` alone: the default);
    * ``diffusers:PATH`` -- a local diffusers pipeline or model folder (offline);
    * ``gmm:NAME`` -- an exact Gaussian mixture from :data:`GMM_PRESETS`.
    """
    kind, _, arg = spec.partition(":")
    if kind == "builtin":
        from .bundled.pretrained import load_pretrained

        return load_pretrained(arg or "patches16", device=device)
    if kind == "diffusers":
        if not arg:
            raise ValueError("diffusers:PATH needs a local folder, e.g. diffusers:./my-pipeline")
        from .integrations.diffusers import from_diffusers_pretrained

        return from_diffusers_pretrained(arg, device=device)
    if kind == "gmm":
        return gmm_preset(arg or "image16")
    raise ValueError(f"unknown model specification {spec!r}; expected builtin:NAME, diffusers:PATH or gmm:NAME")
