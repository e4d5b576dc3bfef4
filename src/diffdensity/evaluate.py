"""Former home of dataset scoring, now :mod:`diffdensity.scoring`; kept only for the image readers' old import path."""

from .scoring.inputs import list_images, read_image

__all__ = ["list_images", "read_image"]
