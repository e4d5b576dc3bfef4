"""Wrapping diffusers objects or a saved folder as a diffdensity model: :func:`from_diffusers`,
:func:`from_diffusers_pretrained`."""

from __future__ import annotations

import os
from typing import Any

import torch

from ...models import ClassifierFreeGuidance
from .adapter import DiffusersScoreModel, event_shape_from_config
from .folders import NETWORK_FOLDERS, load_parts
from .latent import LatentDiffusion
from .schedule import config_of, is_flow_matching, schedule_from_scheduler

__all__ = ["from_diffusers", "from_diffusers_pretrained", "PREDICTION_TYPES"]

LOAD_OPTIONS = ("scheduler", "vae", "load_vae", "torch_dtype", "device")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "velocity": "velocity"}


def _unpack_pipeline(obj: Any) -> tuple[Any, Any, Any]:
    for name in NETWORK_FOLDERS:
        net = getattr(obj, name, None)
        if isinstance(net, torch.nn.Module):
            return net, getattr(obj, "scheduler", None), getattr(obj, "vae", None)
    raise TypeError(f"{type(obj).__name__} has no unet or transformer")


def from_diffusers(
    unet: Any,
    scheduler: Any = None,
    *,
    vae: Any = None,
    prediction_type: str | None = None,
    guidance_scale: float | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    attention: str = "math",
    event_shape: tuple[int, ...] | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    interpolation: str = "linear",
    timestep_scale: float | None = None,
    **load_options: Any,
) -> DiffusersScoreModel | ClassifierFreeGuidance | LatentDiffusion:
    """Wrap a diffusers network and scheduler as a diffdensity model.

    Args:
        unet: a ``UNet2DModel`` / ``UNet2DConditionModel`` (or another diffusers network
            called as ``net(x, timestep=..., **cond)``), a pipeline holding ``unet`` (or
            ``transformer``), ``scheduler`` and optionally ``vae``, or the path of a local
            directory (loaded as :func:`from_diffusers_pretrained`
            does, with ``load_options``).
        scheduler: the scheduler the network was trained with (an instance or its config
            dict): DDPM, DDIM, Euler-discrete (any scheduler with ``alphas_cumprod``) or
            flow matching.
        vae: an ``AutoencoderKL``; the result is then a :class:`LatentDiffusion`.
        prediction_type: overrides ``scheduler.config.prediction_type``
            (``"epsilon"``, ``"v_prediction"``, ``"sample"``); flow matching is always
            ``"velocity"``.
        guidance_scale, cond, uncond: classifier-free guidance
            ``s_u + w (s_c - s_u)`` with the conditioning keywords of the two branches
            (e.g. ``{"encoder_hidden_states": emb}``; leading dimension B or 1).
        attention: ``"math"`` (default) or ``"keep"``, see :class:`DiffusersScoreModel`.
        event_shape: ``(C, H, W)`` of the inputs; default from the network's config
            (``in_channels``, ``sample_size``).
        t_min, t_max, interpolation: the time range and, for discrete VP schedules, how
            log sigma_ve is interpolated between steps (see :func:`schedule_from_scheduler`).
        timestep_scale: flow matching only: ``timestep = sigma * timestep_scale``
            (default ``num_train_timesteps``; 1 for networks that take ``sigma`` itself).

    The network is put in eval mode. Returns a :class:`DiffusersScoreModel`, that model
    under :class:`~diffdensity.models.ClassifierFreeGuidance`, or a :class:`LatentDiffusion`.
    """
    if isinstance(unet, (str, os.PathLike)):
        unet, scheduler, vae = load_parts(unet, scheduler=scheduler, vae=vae, **load_options)
        load_options = {}
    if load_options:
        raise TypeError(f"unexpected keyword arguments {sorted(load_options)} (they apply to loading from a path)")
    if not isinstance(unet, torch.nn.Module):
        unet, pipe_scheduler, pipe_vae = _unpack_pipeline(unet)
        scheduler = scheduler if scheduler is not None else pipe_scheduler
        vae = vae if vae is not None else pipe_vae
    if scheduler is None:
        raise TypeError("from_diffusers needs the scheduler (or its config) the network was trained with")
    if (guidance_scale is None) != (cond is None and uncond is None) or (cond is None) != (uncond is None):
        raise ValueError("classifier-free guidance needs guidance_scale, cond and uncond together")

    schedule = schedule_from_scheduler(scheduler, t_min=t_min, t_max=t_max, interpolation=interpolation)
    parametrization, timestep, scale = _prediction(scheduler, prediction_type, timestep_scale)
    unet.eval()
    model: Any = DiffusersScoreModel(
        unet,
        schedule,
        parametrization,
        timestep=timestep,
        timestep_scale=scale,
        event_shape=event_shape if event_shape is not None else event_shape_from_config(unet),
        attention=attention,
    )
    if guidance_scale is not None:
        model = ClassifierFreeGuidance(model, guidance_scale, cond=cond, uncond=uncond)
    if vae is not None:
        vae.eval()
        model = LatentDiffusion(model, vae)
    return model


def _prediction(scheduler: Any, prediction_type: str | None, timestep_scale: float | None) -> tuple[str, str, float]:
    """``(parametrization, timestep kind, timestep scale)`` of a network trained with ``scheduler``."""
    cfg = config_of(scheduler)
    if is_flow_matching(scheduler):
        if prediction_type not in (None, "velocity", "flow_prediction"):
            raise ValueError(f"flow-matching networks predict the velocity; got prediction_type={prediction_type!r}")
        scale = float(timestep_scale if timestep_scale is not None else cfg.get("num_train_timesteps", 1000))
        return "velocity", "sigma", scale
    if timestep_scale is not None:
        raise ValueError("timestep_scale applies to flow-matching schedulers only")
    ptype = prediction_type or cfg.get("prediction_type", "epsilon")
    if ptype not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {ptype!r}; expected 'epsilon', 'v_prediction' or 'sample'")
    continuous = cfg.get("timestep_type") == "continuous" and ptype == "v_prediction"
    return PREDICTION_TYPES[ptype], "log_sigma" if continuous else "index", 1.0


def from_diffusers_pretrained(path: str | os.PathLike, **options: Any) -> DiffusersScoreModel | ClassifierFreeGuidance | LatentDiffusion:
    """Load a model from a local directory written by ``save_pretrained``, offline and safely.

    ``path`` is either a pipeline directory (``unet/`` or ``transformer/``, ``scheduler/``
    and, for latent diffusion, ``vae/``; text encoders are not needed: pass text
    embeddings as tensors) or a single model directory (``config.json``) with the
    scheduler given or saved beside it (``scheduler_config.json``). Only safetensors
    weights and allow-listed classes are loaded (see :mod:`.folders`); nothing is
    downloaded. Loaded networks are frozen (``requires_grad_(False)``) and moved to
    ``device`` / ``torch_dtype``. The options :data:`LOAD_OPTIONS` (``scheduler``,
    ``vae``, ``load_vae``, ``torch_dtype``, ``device``) go to
    :func:`~.folders.load_parts` (``load_vae=False`` skips the autoencoder), all others to
    :func:`from_diffusers`.
    """
    load = {k: options.pop(k) for k in LOAD_OPTIONS if k in options}
    network, scheduler, vae = load_parts(path, **load)
    return from_diffusers(network, scheduler, vae=vae, **options)
