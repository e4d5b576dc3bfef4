"""diffdensity: measure and steer the log-density of samples in diffusion and flow models."""

from .analytic import GaussianMixture, random_rotation
from .divergence import Exact, Hutchinson
from .likelihood import bits_per_dim, log_likelihood
from .models import NFE, ClassifierFreeGuidance, ScoreModel
from .schedules import EDM, VE, VP, RectifiedFlow, Schedule, VPCosine, VPLinear

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
    # models
    "ScoreModel",
    "ClassifierFreeGuidance",
    "NFE",
    "GaussianMixture",
    "random_rotation",
    # divergence
    "Exact",
    "Hutchinson",
    # likelihood
    "log_likelihood",
    "bits_per_dim",
]
