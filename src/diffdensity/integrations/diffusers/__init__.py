"""Hugging Face diffusers models as diffdensity score models (docs/math.md s.1-2).

* :func:`from_diffusers` wraps a UNet (``UNet2DModel``, ``UNet2DConditionModel``, or
  any diffusers network called as ``net(x, timestep=..., **cond)``) and a scheduler
  (or its config) as a :class:`DiffusersScoreModel`; with an autoencoder it returns a
  :class:`LatentDiffusion` that scores latents and decodes them to images.
* :func:`from_diffusers_pretrained` loads the same from a local directory written by
  ``save_pretrained``: safetensors weights only, and only allow-listed model and
  scheduler classes (:mod:`.folders`).

Modules: :mod:`.schedule` (scheduler -> schedule), :mod:`.adapter` (the score model),
:mod:`.latent` (latent diffusion), :mod:`.folders` (safe loading of saved folders),
:mod:`.wrap` (the entry points).

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

from .adapter import DiffusersScoreModel
from .latent import LatentDiffusion
from .schedule import schedule_from_scheduler
from .wrap import from_diffusers, from_diffusers_pretrained

__all__ = [
    "from_diffusers",
    "from_diffusers_pretrained",
    "schedule_from_scheduler",
    "DiffusersScoreModel",
    "LatentDiffusion",
]
