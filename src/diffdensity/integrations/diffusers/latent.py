"""Latent diffusion: a score model on autoencoder latents with the autoencoder that decodes them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...models import ClassifierFreeGuidance, Model

__all__ = ["LatentDiffusion"]


class LatentDiffusion:
    """A score model on autoencoder latents, with the autoencoder that maps them to images.

    It is a model itself (``schedule``, ``score``, ``event_shape`` of the latents), so
    likelihoods, sampling and density guidance run in latent space; :meth:`decode` turns
    the final latents into images. Latents are scaled as in diffusers pipelines:
    ``z = (E(image) - shift_factor) * scaling_factor`` and
    ``image = D(z / scaling_factor + shift_factor)`` (factors from the VAE's config unless
    given). ``encode`` / ``decode`` respect the caller's grad mode: wrap them in
    ``torch.no_grad()`` unless gradients are wanted.
    """

    def __init__(self, model: Model, vae: Any, *, scaling_factor: float | None = None, shift_factor: float | None = None):
        cfg = getattr(vae, "config", {}) or {}
        self.model, self.vae = model, vae
        self.schedule = model.schedule
        self.event_shape = getattr(model, "event_shape", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else (cfg.get("scaling_factor") or 1.0))
        self.shift_factor = float(shift_factor if shift_factor is not None else (cfg.get("shift_factor") or 0.0))
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    def __repr__(self) -> str:
        guidance = f", guidance_scale={self.model.scale:g}" if isinstance(self.model, ClassifierFreeGuidance) else ""
        return f"LatentDiffusion({self.base!r}{guidance}, {type(self.vae).__name__}, scaling_factor={self.scaling_factor:g})"

    @property
    def base(self) -> Model:
        """The latent score model without classifier-free guidance."""
        model = self.model
        while isinstance(model, ClassifierFreeGuidance):
            model = model.model
        return model

    def score(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self.model.score(x, t, **cond)

    def guided(self, scale: float, *, cond: dict[str, Any], uncond: dict[str, Any]) -> "LatentDiffusion":
        """The same model with classifier-free guidance ``s_u + scale (s_c - s_u)`` on the base model."""
        cfg = ClassifierFreeGuidance(self.base, scale, cond=cond, uncond=uncond)
        return LatentDiffusion(cfg, self.vae, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)

    def _vae_dtype(self, like: Tensor) -> torch.dtype:
        return getattr(self.vae, "dtype", None) or like.dtype

    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[-1, 1]`` -> scaled latents (posterior mean, or a draw with ``sample=True``)."""
        dist = self.vae.encode(images.to(self._vae_dtype(images))).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``(B, *event_shape)`` -> images ``(B, 3, H, W)``, roughly in ``[-1, 1]``."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self._vae_dtype(latents))).sample.to(latents.dtype)

