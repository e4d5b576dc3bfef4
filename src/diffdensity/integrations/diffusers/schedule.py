"""Diffusers schedulers as diffdensity schedules (discrete-time VP and flow matching)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ...schedules import DiscreteVP, RectifiedFlow, Schedule

__all__ = ["schedule_from_scheduler", "is_flow_matching", "config_of", "require_diffusers", "SCHEDULERS"]

ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
#: the scheduler classes a config dict (or a folder's ``scheduler_config.json``) may name
SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
)  # fmt: skip


def require_diffusers():
    """The ``diffusers`` module, or an ``ImportError`` that says how to install it."""
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - the extra is installed in the tests
        raise ImportError(
            "the diffusers integration needs the 'diffusers' package: pip install 'diffdensity[diffusers]'"
        ) from err
    return diffusers


def config_of(obj: Any) -> Mapping[str, Any]:
    """The config mapping of a diffusers scheduler or model (or the dict itself)."""
    cfg = getattr(obj, "config", obj)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a diffusers scheduler, model or config dict, got {type(obj).__name__}")
    return cfg


def is_flow_matching(scheduler: Any) -> bool:
    name = type(scheduler).__name__
    if isinstance(scheduler, Mapping):
        name = scheduler.get("_class_name", "")
    return "FlowMatch" in name


def scheduler_class(name: str, where: str):
    """The allow-listed diffusers scheduler class ``name`` (``where`` names its source in errors)."""
    if name not in SCHEDULERS:
        raise ValueError(f"{where} names scheduler class {name!r}, which is not allowed; expected one of {SCHEDULERS}")
    cls = getattr(require_diffusers(), name, None)
    if cls is None:
        raise ValueError(f"{where} names {name!r}, which this diffusers version does not provide")
    return cls


def _alphas_cumprod(scheduler: Any) -> Tensor:
    """``alphas_cumprod`` of a scheduler instance, or rebuilt from a config dict."""
    if not isinstance(scheduler, Mapping) and hasattr(scheduler, "alphas_cumprod"):
        return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clone()
    cfg = config_of(scheduler)
    if "beta_schedule" not in cfg:
        raise TypeError(
            f"unsupported scheduler {cfg.get('_class_name', type(scheduler).__name__)!r}: "
            "expected a discrete-time VP scheduler (with alphas_cumprod) or a flow-matching scheduler"
        )
    # a plain config: let diffusers build the (allow-listed) scheduler it names, DDPM's rules by default
    cls = scheduler_class(cfg.get("_class_name", "DDPMScheduler"), "the scheduler config")
    return _alphas_cumprod(cls.from_config(dict(cfg)))


def schedule_from_scheduler(
    scheduler: Any, *, t_min: float | None = None, t_max: float | None = None, interpolation: str = "linear"
) -> Schedule:
    """The diffdensity schedule matching a diffusers scheduler (instance or config dict).

    Discrete-time VP schedulers give :class:`~diffdensity.schedules.DiscreteVP` over the
    training timesteps ``[0, N-1]``; flow-matching schedulers give
    :class:`~diffdensity.schedules.RectifiedFlow` with ``t = sigma`` (defaults
    ``t_min = 1e-3``, ``t_max = 1 - 1e-3``). ``t_min`` / ``t_max`` restrict the range;
    ``interpolation`` (``"linear"`` in log sigma_ve, as k-diffusion, or ``"cubic"``,
    continuously differentiable) applies to discrete schedules.
    """
    if is_flow_matching(scheduler):
        cfg = config_of(scheduler)
        if cfg.get("invert_sigmas", False):
            raise NotImplementedError("flow-matching schedulers with invert_sigmas=True are not supported")
        kwargs = {k: v for k, v in (("t_min", t_min), ("t_max", t_max)) if v is not None}
        return RectifiedFlow(**kwargs)
    abar = _alphas_cumprod(scheduler)
    if abar[-1] <= 0:
        abar[-1] = _zero_snr_substitute(abar)
    return DiscreteVP(abar, t_min=t_min, t_max=t_max, interpolation=interpolation)


def _zero_snr_substitute(abar: Tensor) -> float:
    """A finite stand-in for ``alphas_cumprod[-1] = 0`` (zero terminal SNR).

    ``2**-24`` as ``EulerDiscreteScheduler`` uses, unless the previous step is already
    below it; then the geometric continuation ``abar[-2]^2 / abar[-3]`` (log sigma_ve
    continues linearly), which keeps the schedule strictly decreasing.
    """
    prev = float(abar[-2])
    if ZERO_SNR_ALPHA_CUMPROD < prev:
        return ZERO_SNR_ALPHA_CUMPROD
    return prev * prev / float(abar[-3])

