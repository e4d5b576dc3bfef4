"""Adapters onto other libraries' models, each an optional extra imported on first use.

``diffdensity.integrations.diffusers`` wraps Hugging Face diffusers UNets and schedulers
(install with ``pip install 'diffdensity[diffusers]'``). Importing this package, or
diffdensity itself, never imports diffusers.
"""

from __future__ import annotations

from typing import Any

_DIFFUSERS_NAMES = (
    "from_diffusers",
    "from_diffusers_pretrained",
    "schedule_from_scheduler",
    "DiffusersScoreModel",
    "LatentDiffusion",
)

__all__ = list(_DIFFUSERS_NAMES)


def __getattr__(name: str) -> Any:
    if name in _DIFFUSERS_NAMES:
        from . import diffusers as _diffusers

        return getattr(_diffusers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
