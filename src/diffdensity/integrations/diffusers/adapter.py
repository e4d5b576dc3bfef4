"""A diffusers network as a diffdensity score model: :class:`DiffusersScoreModel`."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Mapping

import torch
from torch import Tensor

from ...models import ScoreModel, broadcast_time, check_output, prediction_to_score
from ...schedules import Schedule

__all__ = ["DiffusersScoreModel", "event_shape_from_config", "ATTENTION"]

ATTENTION = ("math", "keep")
# keyword arguments of UNet2DConditionModel's ``added_cond_kwargs`` (SDXL and relatives),
# accepted flat so that they are batched (and repeated over probes) like any tensor
ADDED_COND_KEYS = ("text_embeds", "time_ids", "image_embeds", "hint")


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


def event_shape_from_config(network: Any) -> tuple[int, ...] | None:
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
    """A diffusers network as a score model: ``score(x, t, **cond)`` (docs/math.md s.2).

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
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"network must be a torch.nn.Module (a diffusers model), got {type(network).__name__}")
        # the network declares the model's device and dtype (ScoreModel reads them off it)
        super().__init__(self.prediction, schedule, parametrization, event_shape=event_shape, network=network)
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
        dtype = self.dtype or x.dtype
        ts = self.timestep(t).to(device=x.device, dtype=torch.float32)
        ctx = _math_attention() if self.attention == "math" else contextlib.nullcontext()
        with ctx:
            out = self.network(x.to(dtype), timestep=ts, **self._network_kwargs(cond, x.shape[0]), return_dict=False)[0]
        if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]  # learned variance in the second half of the channels
        return check_output(out, x, type(self.network).__name__).to(x.dtype)

    def score(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = broadcast_time(t, x)
        return prediction_to_score(self.prediction(x, t, **cond), x, self.schedule(t), self.parametrization)

