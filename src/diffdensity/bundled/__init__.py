"""The bundled model: its data (:mod:`.data`), network (:mod:`.nets`), training recipe
(:mod:`.training`), loader (:mod:`.pretrained`, :func:`load_pretrained`) and weights
(``weights/NAME.safetensors`` with ``NAME.json``); see ``docs/model.md``.
"""

from .pretrained import available, load_pretrained

__all__ = ["load_pretrained", "available"]
