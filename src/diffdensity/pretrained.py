"""Old import path of :func:`diffdensity.bundled.pretrained.load_pretrained` (for ``diffdensity/__init__``)."""

from .bundled.pretrained import load_pretrained  # noqa: F401
