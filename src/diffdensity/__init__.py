"""diffdensity: measure and steer the log-density of samples in diffusion and flow models.

Every public name is imported on first use (``import diffdensity`` imports neither torch
nor any optional library until a name is touched), so the command line starts fast. The
table below is the public API; docs/architecture.md says why each name is in it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    # forward processes
    "schedules": ("Schedule", "VP", "VPLinear", "VPCosine", "VE", "EDM", "RectifiedFlow", "DiscreteVP"),
    # models, exact models, the bundled model
    "models": ("ScoreModel", "ClassifierFreeGuidance", "NFE"),
    "analytic": ("GaussianMixture", "random_rotation"),
    "linear_flow": ("LinearScoreModel",),
    "bundled": ("load_pretrained",),
    # divergence estimators
    "divergence": ("Exact", "Hutchinson"),
    # likelihood
    "likelihood": ("log_likelihood", "bits_per_dim"),
    # sampling and control
    "sampling": ("sample", "SampleResult"),
    "methods": ("register_method",),
    "guidance": ("rescale_latent", "chi_quantile"),
    "mode_tracking": ("mode_tracking", "ModeTrackingResult"),
    # diagnostics
    "alignment": ("score_alignment",),
    "typicality": ("typicality",),
    "consistency": ("check_consistency",),
    # integrations (optional extras)
    "integrations.diffusers": ("from_diffusers", "from_diffusers_pretrained", "LatentDiffusion", "DiffusersScoreModel"),
    "integrations.pipeline": ("DensityGuidedPipeline",),
}

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'diffdensity' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
