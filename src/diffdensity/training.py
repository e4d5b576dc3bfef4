"""Old import path of :func:`diffdensity.bundled.training.train` (for ``cli/train.py``)."""

from .bundled.training import train  # noqa: F401
