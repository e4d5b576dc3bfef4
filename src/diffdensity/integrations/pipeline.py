"""A diffusers-style pipeline with density guidance and tracked log-densities.

:class:`DensityGuidedPipeline` is built from a diffusers pipeline folder and called the way
diffusers pipelines are::

    pipe = DensityGuidedPipeline.from_pretrained("path/to/pipeline")
    out = pipe(prompt="a red house", q=0.8, num_inference_steps=32, generator=torch.Generator().manual_seed(0))
    out.images, out.logp, out.logp_stderr

* **pixel-space** folders (``unet/`` with a ``UNet2DModel``, ``scheduler/``): unconditional
  sampling, ``batch_size`` images per call;
* **latent** folders with a text encoder (``unet/`` a ``UNet2DConditionModel``, ``vae/``,
  ``text_encoder/`` a CLIP text model, ``tokenizer/``, ``scheduler/``): prompts are
  encoded, classifier-free guidance ``s_u + w (s_c - s_u)`` with ``guidance_scale`` w
  (docs/math.md s.2), sampling in latent space, images decoded by the VAE. Latent folders
  without a text encoder sample unconditionally.

Sampling is :func:`diffdensity.sample`, so every method of
:data:`diffdensity.methods.METHODS` is available (``method=``, with its options as
keywords); ``q=`` alone selects density guidance (docs/math.md s.4a) at that quantile.
The log-density returned is that of the variable the model samples: ``log p_0`` of the
pixels in ``[-1, 1]`` for pixel models (with bits/dim, s.7), of the scaled latents for
latent models (under the guided score when ``guidance_scale != 1``).

Loading is offline and safe: networks through :func:`~diffdensity.from_diffusers_pretrained`,
the text encoder and tokenizer only from allow-listed classes, safetensors only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["DensityGuidedPipeline", "DensityPipelineOutput", "TEXT_ENCODERS", "TOKENIZERS"]

TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
"""Text-encoder classes the pipeline builds from a folder's ``text_encoder/config.json``."""
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
"""Tokenizer classes the pipeline builds from ``tokenizer/tokenizer_config.json``."""
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class DensityPipelineOutput:
    """What a :class:`DensityGuidedPipeline` call returns.

    ``images``: a list of ``PIL.Image`` (``output_type="pil"``), a float ``(B, H, W, C)``
    NumPy array in ``[0, 1]`` (``"np"``) or a float ``(B, C, H, W)`` tensor in ``[0, 1]``
    (``"pt"``). ``logp``: float64 ``(B,)`` tracked log-density in nats of the sampled
    variable (pixels or latents, module docstring); ``logp_stderr``: its per-sample
    standard error from the Hutchinson probes (``None`` where the tracking has no
    Monte-Carlo part). ``bits_per_dim``: float64 ``(B,)`` for pixel models, else ``None``.
    ``nfe``: network passes per sample; ``result``: the full
    :class:`~diffdensity.sampling.SampleResult`.
    """

    images: Any
    logp: Tensor | None
    logp_stderr: Tensor | None
    bits_per_dim: Tensor | None
    nfe: Any
    method: str
    result: Any

    def __repr__(self) -> str:
        n = len(self.images)
        if self.logp is None:
            return f"DensityPipelineOutput({n} images, {self.method!r}, logp not tracked, nfe=[{self.nfe}])"
        se = "" if self.logp_stderr is None else f" +- {float(self.logp_stderr.square().mean().sqrt()):.2g} (rms stderr)"
        return f"DensityPipelineOutput({n} images, {self.method!r}, mean logp {float(self.logp.mean()):.1f}{se} nats, nfe=[{self.nfe}])"


class DensityGuidedPipeline:
    """Density-guided sampling from a diffusers model, called like a diffusers pipeline.

    ``model``: a :class:`~diffdensity.integrations.diffusers.DiffusersScoreModel` (pixel
    space) or :class:`~diffdensity.integrations.diffusers.LatentDiffusion`;
    ``text_encoder`` / ``tokenizer``: transformers objects for prompts (latent models
    whose network takes ``encoder_hidden_states``). Build it with :meth:`from_pretrained`.
    """

    def __init__(self, model, *, text_encoder: Any = None, tokenizer: Any = None):
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("give text_encoder and tokenizer together (or neither)")
        self.model, self.text_encoder, self.tokenizer = model, text_encoder, tokenizer

    def __repr__(self) -> str:
        text = f", text encoder {type(self.text_encoder).__name__}" if self.text_encoder is not None else ""
        return f"DensityGuidedPipeline({self.model!r}{text})"

    @property
    def is_latent(self) -> bool:
        """Whether the model samples autoencoder latents (decoded to images by its VAE)."""
        return hasattr(self.model, "decode") and hasattr(self.model, "vae")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: torch.device | str | None = None,
                        torch_dtype: torch.dtype | None = None, **options: Any) -> "DensityGuidedPipeline":
        """Build from a local pipeline folder written by ``save_pretrained`` (offline, safetensors).

        ``options`` go to :func:`~diffdensity.from_diffusers_pretrained` (e.g.
        ``prediction_type=``). ``text_encoder/`` and ``tokenizer/`` are loaded when both are
        present (classes in :data:`TEXT_ENCODERS` and :data:`TOKENIZERS` only).
        """
        from .diffusers import from_diffusers_pretrained

        root = Path(path)
        model = from_diffusers_pretrained(root, device=device, torch_dtype=torch_dtype, **options)
        text_encoder = tokenizer = None
        if (root / "text_encoder" / "config.json").is_file() and (root / "tokenizer").is_dir():
            text_encoder, tokenizer = _load_text_parts(root, device=device, torch_dtype=torch_dtype)
        return cls(model, text_encoder=text_encoder, tokenizer=tokenizer)

    # -- prompts ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Text embeddings ``(len(prompts), L, D)`` from the tokenizer (padded to its maximum length) and the encoder."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: it samples unconditionally (call it without prompt=)")
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(device))[0]

    def _conditioned(self, prompt, negative_prompt, per_prompt: int, guidance_scale: float):
        """``(model, model_kwargs, n)`` for this call: prompts encoded, classifier-free guidance applied."""
        if prompt is None:
            if self.text_encoder is not None:
                raise ValueError("this pipeline is text-conditioned: pass prompt= (a string or a list of strings)")
            return self.model, None, None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a string or a non-empty list of strings")
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        emb = self.encode_prompt(prompts).repeat_interleave(per_prompt, 0)
        n = emb.shape[0]
        if guidance_scale == 1.0:
            return self.model, {"encoder_hidden_states": emb}, n
        neg = self.encode_prompt(negatives).repeat_interleave(per_prompt, 0)
        guided = self.model.guided(guidance_scale, cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg})
        return guided, None, n

    # -- sampling -----------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        q: float | Tensor | None = None,
        method: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        track_logp: bool = True,
        **method_options: Any,
    ) -> DensityPipelineOutput | tuple:
        """Sample images with their tracked log-densities.

        Args:
            prompt, negative_prompt: text for text-conditioned pipelines (one string or
                a list; the negative prompt is the unconditional branch of
                classifier-free guidance, default ``""``).
            q: density-guidance quantile in (0, 1) (> 0.5 smoother, higher log p).
            method: a sampling method of :data:`diffdensity.methods.METHODS` (default:
                ``"density-guidance"`` when ``q`` or ``target_logp`` is given, else
                ``"pf-ode"``); its other options are keywords (``log_snr_threshold=``,
                ``noise=``, ``drift=``, ...).
            num_inference_steps: solver steps (default: the method's).
            guidance_scale: classifier-free guidance weight w (1: none).
            num_images_per_prompt, batch_size: images per prompt (text pipelines), or
                images per call (unconditional; default 1).
            generator: the only source of randomness; latents: ``x_T`` instead.
            output_type: ``"pil"``, ``"np"`` or ``"pt"``; return_dict: ``False`` gives the
                tuple ``(images, logp)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        model, model_kwargs, n = self._conditioned(prompt, negative_prompt, int(num_images_per_prompt), float(guidance_scale))
        if n is None:
            n = 1 if batch_size is None else batch_size
        elif batch_size is not None:
            raise ValueError("batch_size applies to unconditional pipelines; with prompts use num_images_per_prompt")
        method, options = _method(method, q, method_options)
        from ..models import placement
        from ..sampling import sample

        if latents is None:  # drawn where the network is, in its dtype (a latent model's wrapper declares neither)
            options["device"], options["dtype"] = placement(getattr(self.model, "base", self.model))
        res = sample(model, None if latents is not None else n, x_T=latents, method=method, steps=num_inference_steps,
                     generator=generator, model_kwargs=model_kwargs, track_logp=track_logp, **options)  # fmt: skip
        images = self._images(res.x, output_type)
        bpd = None
        if res.logp is not None and not self.is_latent:
            from ..likelihood import logp_to_bpd

            bpd = logp_to_bpd(res.logp, math.prod(res.x.shape[1:]))
        out = DensityPipelineOutput(images, res.logp, getattr(res, "logp_stderr", None), bpd, res.nfe, method, res)
        return out if return_dict else (images, res.logp)

    @torch.no_grad()
    def _images(self, x: Tensor, output_type: str):
        """Samples (decoded by the VAE for latent models) in ``[0, 1]``, in ``output_type``."""
        img = self.model.decode(x) if self.is_latent else x
        img = ((img.detach().to(torch.float32).clamp(-1, 1) + 1) / 2).cpu()
        if output_type == "pt":
            return img
        arr = img.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return arr
        from PIL import Image

        u8 = (arr * 255).round().astype("uint8")
        return [Image.fromarray(a[..., 0] if a.shape[2] == 1 else a) for a in u8]


def _method(method: str | None, q: Any, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The method name and its options (``q`` joins them when given)."""
    if method is None:
        method = "density-guidance" if (q is not None or "target_logp" in options) else "pf-ode"
    options = dict(options)
    if q is not None:
        options["q"] = q
    return method, options


def _allowed_class(config_file: Path, key: str, allowed: tuple[str, ...]) -> str:
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {config_file}: {e}") from e
    names = cfg.get(key)
    name = names[0] if isinstance(names, list) and names else names
    if name not in allowed:
        raise ValueError(f"{config_file} names {name!r}; only {allowed} are loaded")
    return name


def _load_text_parts(root: Path, *, device, torch_dtype):
    """The text encoder and tokenizer of a pipeline folder (allow-listed classes, safetensors, offline)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("text-conditioned pipelines need transformers: pip install 'diffdensity[diffusers]' transformers") from e
    enc_name = _allowed_class(root / "text_encoder" / "config.json", "architectures", TEXT_ENCODERS)
    tok_name = _allowed_class(root / "tokenizer" / "tokenizer_config.json", "tokenizer_class", TOKENIZERS)
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    encoder = getattr(transformers, enc_name).from_pretrained(root / "text_encoder", local_files_only=True, use_safetensors=True, **kwargs)
    encoder.requires_grad_(False).eval()
    if device is not None:
        encoder.to(device)
    tokenizer = getattr(transformers, tok_name).from_pretrained(root / "tokenizer", local_files_only=True)
    return encoder, tokenizer
