"""Hugging Face diffusers models as diffdensity score models (MATH.md s.1-2).

* :func:`from_diffusers` wraps a UNet (``UNet2DModel``, ``UNet2DConditionModel``, or
  any diffusers network called as ``net(x, timestep=..., **cond)``) and a scheduler
  (or its config) as a :class:`DiffusersScoreModel`; with an autoencoder it returns a
  :class:`LatentDiffusion` that scores latents and decodes them to images.
* :func:`from_diffusers_pretrained` loads the same from a local directory written by
  ``save_pretrained`` (never the network).

Conventions
-----------
*Discrete-time VP schedulers* (DDPM, DDIM, Euler-discrete and every other scheduler
with ``alphas_cumprod``): the diffdensity time ``t`` in ``[0, N-1]`` is the diffusers
timestep, fractional in between; the schedule is :class:`~diffdensity.schedules.DiscreteVP`
(``log sigma_ve`` interpolated linearly between steps, as k-diffusion does). The network
sees the VP input ``x_t = alpha_t x_0 + sigma_t eps`` (what DDPM/DDIM feed it, and what
Euler's ``scale_model_input`` turns ``x_ve = x_t / alpha_t`` back into) and the
timestep ``t`` itself -- or ``0.25 log sigma_ve`` for Euler's ``timestep_type="continuous"``.
``prediction_type`` maps to the parametrization: ``epsilon -> "eps"``,
``v_prediction -> "v"``, ``sample -> "x0"``. A zero-terminal-SNR last step
(``alphas_cumprod[-1] = 0``) becomes ``2**-24``, as in ``EulerDiscreteScheduler`` (or
continues the schedule geometrically when the previous step is already below that).

*Flow matching* (``FlowMatchEulerDiscreteScheduler`` and relatives): diffusers writes
``x = (1 - sigma) x_0 + sigma eps`` with ``sigma = 0`` at the data, passes
``timestep = sigma * num_train_timesteps`` and trains the network on the velocity
``dx/dsigma = eps - x_0``. That clock already runs from data to noise, so
``t = sigma`` on :class:`~diffdensity.schedules.RectifiedFlow` (no reversal is needed;
libraries whose clock has ``t = 0`` at the noise must flip it) and the output is the
parametrization ``"velocity"``. ``shift`` / dynamic shifting only change the sampling
grid, not this map.

Sampler heuristics of the schedulers (``clip_sample``, ``thresholding``, DDPM's
variance choices, Karras sigmas, timestep spacing) are not part of the model and are
ignored. A network that also predicts its variance (``2 C`` output channels) is
reduced to its first ``C`` channels.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..models import ClassifierFreeGuidance, Model, ScoreModel, broadcast_time, prediction_to_score
from ..schedules import DiscreteVP, RectifiedFlow, Schedule

__all__ = [
    "from_diffusers",
    "from_diffusers_pretrained",
    "schedule_from_scheduler",
    "DiffusersScoreModel",
    "LatentDiffusion",
]

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "velocity": "velocity"}
ATTENTION = ("math", "keep")
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
# keyword arguments of UNet2DConditionModel's ``added_cond_kwargs`` (SDXL and relatives),
# accepted flat so that they are batched (and repeated over probes) like any tensor
ADDED_COND_KEYS = ("text_embeds", "time_ids", "image_embeds", "hint")
NETWORK_FOLDERS = ("unet", "transformer")


def _require_diffusers():
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - the extra is installed in the tests
        raise ImportError(
            "the diffusers integration needs the 'diffusers' package: pip install 'diffdensity[diffusers]'"
        ) from err
    return diffusers


def _config(obj: Any) -> Mapping[str, Any]:
    cfg = getattr(obj, "config", obj)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a diffusers scheduler, model or config dict, got {type(obj).__name__}")
    return cfg


def _is_flow_matching(scheduler: Any) -> bool:
    name = type(scheduler).__name__
    if isinstance(scheduler, Mapping):
        name = scheduler.get("_class_name", "")
    return "FlowMatch" in name


# ------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------
def _alphas_cumprod(scheduler: Any) -> Tensor:
    """``alphas_cumprod`` of a scheduler instance, or rebuilt from a config dict."""
    if not isinstance(scheduler, Mapping) and hasattr(scheduler, "alphas_cumprod"):
        return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clone()
    cfg = _config(scheduler)
    if "beta_schedule" not in cfg:
        raise TypeError(
            f"unsupported scheduler {cfg.get('_class_name', type(scheduler).__name__)!r}: "
            "expected a discrete-time VP scheduler (with alphas_cumprod) or a flow-matching scheduler"
        )
    # a plain config: let diffusers build the scheduler it names (DDPM's rules by default)
    diffusers = _require_diffusers()
    cls = getattr(diffusers, cfg.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
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
    if _is_flow_matching(scheduler):
        cfg = _config(scheduler)
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


# ------------------------------------------------------------------------------------
# the score model
# ------------------------------------------------------------------------------------
def _math_attention():
    """A context running ``scaled_dot_product_attention`` on its composite math kernel.

    Fused kernels (flash / memory-efficient) lack forward-mode AD and double backward;
    the math kernel is built from differentiable primitives and supports both.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])


def _network_dtype(network: torch.nn.Module) -> torch.dtype | None:
    dtype = getattr(network, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    param = next(network.parameters(), None)
    return None if param is None else param.dtype


def _event_shape_from_config(network: Any) -> tuple[int, ...] | None:
    cfg = getattr(network, "config", None)
    if not isinstance(cfg, Mapping):
        return None
    channels, size = cfg.get("in_channels"), cfg.get("sample_size")
    if not isinstance(channels, int) or size is None:
        return None
    if isinstance(size, int):
        return (channels, size, size)
    return (channels, *(int(s) for s in size))


class DiffusersScoreModel(ScoreModel):
    """A diffusers network as a score model: ``score(x, t, **cond)`` (MATH.md s.2).

    ``network(x, timestep=self.timestep(t), **cond)`` must return (as its first output)
    the prediction of ``parametrization`` at diffdensity time ``t``. ``timestep``:

    ===============  ==============================================================
    ``"index"``      the (fractional) discrete timestep is ``t`` itself (DDPM family)
    ``"sigma"``      ``t * timestep_scale`` (flow matching: ``sigma * 1000``)
    ``"log_sigma"``  ``0.25 log sigma_ve(t)`` (Euler, ``timestep_type="continuous"``)
    ===============  ==============================================================

    Conditioning keywords go to the network's ``forward`` (tensors with a leading
    dimension of 1 are broadcast over the batch); ``text_embeds``,
    ``time_ids``, ``image_embeds`` and ``hint`` are gathered into ``added_cond_kwargs``
    (SDXL). Unknown keywords raise ``TypeError``. ``attention="math"`` (default) runs
    every call under the math attention kernel so that forward-mode AD and double
    backward work; ``"keep"`` leaves the network's choice.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        schedule: Schedule,
        parametrization: str,
        *,
        timestep: str = "index",
        timestep_scale: float = 1.0,
        event_shape: tuple[int, ...] | None = None,
        attention: str = "math",
    ):
        if timestep not in ("index", "sigma", "log_sigma"):
            raise ValueError(f"unknown timestep {timestep!r}; expected 'index', 'sigma' or 'log_sigma'")
        if attention not in ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTION}")
        if parametrization in ("score", "edm"):
            raise ValueError(f"parametrization {parametrization!r} does not describe a diffusers network")
        super().__init__(self.prediction, schedule, parametrization, event_shape=event_shape)
        self.network = network
        self.timestep_kind, self.timestep_scale = timestep, float(timestep_scale)
        self.attention = attention
        params = inspect.signature(network.forward).parameters
        self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        names = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        self._cond_names = tuple(n for n in names[1:] if n not in ("timestep", "return_dict"))

    def __repr__(self) -> str:
        return f"DiffusersScoreModel({type(self.network).__name__}, {self.schedule!r}, {self.parametrization!r})"

    # -- time -------------------------------------------------------------------------
    def timestep(self, t: Tensor | float) -> Tensor:
        """The timestep the network is given at diffdensity time ``t`` (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.timestep_kind == "index":
            return t
        if self.timestep_kind == "sigma":
            return t * self.timestep_scale
        return -self.schedule.log_snr(t) / 8  # 0.25 log sigma_ve, sigma_ve = exp(-lambda / 2)

    def t_from_timestep(self, timestep: Tensor | float) -> Tensor:
        """Inverse of :meth:`timestep`: the diffdensity time of a diffusers timestep (float64)."""
        ts = torch.as_tensor(timestep, dtype=torch.float64)
        if self.timestep_kind == "index":
            return ts
        if self.timestep_kind == "sigma":
            return ts / self.timestep_scale
        return self.schedule.t_from_log_snr(-8 * ts)

    # -- network ----------------------------------------------------------------------
    def _network_kwargs(self, cond: dict[str, Any], batch: int | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        added: dict[str, Any] = {}
        for key, value in cond.items():
            if batch is not None and isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == 1 != batch:
                value = value.expand(batch, *value.shape[1:])  # leading dimension 1: shared by the batch
            if key in self._cond_names:
                kwargs[key] = value
            elif key in ADDED_COND_KEYS and "added_cond_kwargs" in self._cond_names:
                added[key] = value
            elif self._var_kw:
                kwargs[key] = value
            else:
                raise TypeError(
                    f"{type(self.network).__name__} takes no conditioning {key!r}; "
                    f"it accepts {self._cond_names + (ADDED_COND_KEYS if 'added_cond_kwargs' in self._cond_names else ())}"
                )
        if added:
            kwargs["added_cond_kwargs"] = {**(kwargs.get("added_cond_kwargs") or {}), **added}
        return kwargs

    def prediction(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """The network's output (``parametrization``) at ``(x, t)``, shape of ``x``, dtype of ``x``."""
        t = broadcast_time(t, x)
        dtype = _network_dtype(self.network) or x.dtype
        ts = self.timestep(t).to(device=x.device, dtype=torch.float32)
        ctx = _math_attention() if self.attention == "math" else contextlib.nullcontext()
        with ctx:
            out = self.network(x.to(dtype), timestep=ts, **self._network_kwargs(cond, x.shape[0]), return_dict=False)[0]
        if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]  # learned variance in the second half of the channels
        if out.shape != x.shape:
            raise ValueError(f"network output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        return out.to(x.dtype)

    def score(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = broadcast_time(t, x)
        return prediction_to_score(self.prediction(x, t, **cond), x, self.schedule(t), self.parametrization)


# ------------------------------------------------------------------------------------
# latent diffusion
# ------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------
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
            directory (then see :func:`from_diffusers_pretrained`, which gets
            ``load_options``).
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
        if scheduler is not None:
            load_options["scheduler"] = scheduler
        return from_diffusers_pretrained(
            unet,
            vae=vae,
            prediction_type=prediction_type,
            guidance_scale=guidance_scale,
            cond=cond,
            uncond=uncond,
            attention=attention,
            event_shape=event_shape,
            t_min=t_min,
            t_max=t_max,
            interpolation=interpolation,
            timestep_scale=timestep_scale,
            **load_options,
        )
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
    cfg = _config(scheduler)
    if _is_flow_matching(scheduler):
        if prediction_type not in (None, "velocity", "flow_prediction"):
            raise ValueError(f"flow-matching networks predict the velocity; got prediction_type={prediction_type!r}")
        parametrization, timestep = "velocity", "sigma"
        scale = float(timestep_scale if timestep_scale is not None else cfg.get("num_train_timesteps", 1000))
    else:
        if timestep_scale is not None:
            raise ValueError("timestep_scale applies to flow-matching schedulers only")
        ptype = prediction_type or cfg.get("prediction_type", "epsilon")
        if ptype not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {ptype!r}; expected 'epsilon', 'v_prediction' or 'sample'")
        parametrization, scale = PREDICTION_TYPES[ptype], 1.0
        continuous = cfg.get("timestep_type") == "continuous" and ptype == "v_prediction"
        timestep = "log_sigma" if continuous else "index"

    unet.eval()
    model: Any = DiffusersScoreModel(
        unet,
        schedule,
        parametrization,
        timestep=timestep,
        timestep_scale=scale,
        event_shape=event_shape if event_shape is not None else _event_shape_from_config(unet),
        attention=attention,
    )
    if guidance_scale is not None:
        model = ClassifierFreeGuidance(model, guidance_scale, cond=cond, uncond=uncond)
    if vae is not None:
        vae.eval()
        model = LatentDiffusion(model, vae)
    return model


def _read_class_name(config_file: Path) -> str:
    try:
        return json.loads(config_file.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the class name from {config_file}: {err}") from err


def _load(folder: Path, config_name: str, kind: str, **kwargs: Any) -> Any:
    diffusers = _require_diffusers()
    name = _read_class_name(folder / config_name)
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{folder / config_name} names {name!r}, which this diffusers version does not provide")
    if kind != "model":
        return cls.from_pretrained(folder, local_files_only=True)
    if not diffusers.utils.is_accelerate_available():
        kwargs.setdefault("low_cpu_mem_usage", False)  # what diffusers falls back to, without its warning
    return cls.from_pretrained(folder, local_files_only=True, **kwargs)


def from_diffusers_pretrained(
    path: str | os.PathLike,
    *,
    scheduler: Any = None,
    vae: Any = None,
    load_vae: bool = True,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **options: Any,
) -> DiffusersScoreModel | ClassifierFreeGuidance | LatentDiffusion:
    """Load a model from a local directory written by ``save_pretrained``, offline.

    ``path`` is either a pipeline directory (``unet/`` or ``transformer/``, ``scheduler/``
    and, for latent diffusion, ``vae/``; text encoders are not needed: pass text
    embeddings as tensors) or a single model directory (``config.json``) with the
    scheduler given or saved beside it (``scheduler_config.json``). Files are read with
    ``local_files_only=True``; nothing is downloaded. Loaded networks are frozen
    (``requires_grad_(False)``) and moved to ``device`` / ``torch_dtype``. ``options``
    go to :func:`from_diffusers`; ``load_vae=False`` skips the autoencoder.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected a folder written by save_pretrained)")
    model_kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}

    net_dir = next((root / n for n in NETWORK_FOLDERS if (root / n / "config.json").is_file()), None)
    if net_dir is None and (root / "config.json").is_file():
        net_dir = root
    if net_dir is None:
        raise FileNotFoundError(f"no unet/config.json, transformer/config.json or config.json under {root}")
    network = _load(net_dir, "config.json", "model", **model_kwargs)

    if scheduler is None:
        for folder in (root / "scheduler", net_dir, root):
            if (folder / "scheduler_config.json").is_file():
                scheduler = _load(folder, "scheduler_config.json", "scheduler")
                break
        else:
            raise FileNotFoundError(f"no scheduler/scheduler_config.json under {root}; pass scheduler=")

    if vae is None and load_vae and (root / "vae" / "config.json").is_file():
        vae = _load(root / "vae", "config.json", "model", **model_kwargs)

    for module in (network, vae):
        if module is not None:
            module.requires_grad_(False)
            if device is not None:
                module.to(device)
    return from_diffusers(network, scheduler, vae=vae, **options)
