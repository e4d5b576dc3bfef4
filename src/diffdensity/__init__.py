"""diffdensity: measure and steer the log-density of samples in diffusion and flow models."""

from .analytic import GaussianMixture, random_rotation
from .alignment import score_alignment
from .divergence import Exact, Hutchinson
from .guidance import chi_quantile, rescale_latent  # also registers the guidance methods
from .likelihood import bits_per_dim, log_likelihood
from .bundled import load_pretrained
from .models import NFE, ClassifierFreeGuidance, ScoreModel
from .mode_tracking import ModeTrackingResult, mode_tracking
from .typicality import typicality
from .methods import register_method
from .sampling import SampleResult, sample
from .schedules import EDM, VE, VP, DiscreteVP, RectifiedFlow, Schedule, VPCosine, VPLinear

__version__ = "0.1.0"

__all__ = [
    # schedules
    "Schedule",
    "VP",
    "VPLinear",
    "VPCosine",
    "VE",
    "EDM",
    "RectifiedFlow",
    "DiscreteVP",
    # models
    "ScoreModel",
    "ClassifierFreeGuidance",
    "NFE",
    "GaussianMixture",
    "random_rotation",
    "load_pretrained",
    # divergence
    "Exact",
    "Hutchinson",
    # likelihood
    "log_likelihood",
    "bits_per_dim",
    # sampling and control
    "sample",
    "SampleResult",
    "register_method",
    "rescale_latent",
    "chi_quantile",
    "mode_tracking",
    "ModeTrackingResult",
    # diagnostics
    "score_alignment",
    "typicality",
    # integrations (imported on first use)
    "from_diffusers",
    "from_diffusers_pretrained",
    "LatentDiffusion",
    "DiffusersScoreModel",
]

_LAZY = {"from_diffusers", "from_diffusers_pretrained", "LatentDiffusion", "DiffusersScoreModel"}


def __getattr__(name: str):
    if name in _LAZY:
        from .integrations import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module 'diffdensity' has no attribute {name!r}")
