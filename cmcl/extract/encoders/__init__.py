"""Frozen encoders behind ``cmcl extract``; see :mod:`cmcl.extract.encoders.base` for the interface.

``ENCODERS`` maps a backbone name to its class. The ``synthetic`` backbone is not an encoder of
media (it writes whole datasets, :mod:`cmcl.extract.synthetic`) and so is not listed here.
"""

from cmcl.extract.encoders.base import Encoder

#: backbone name -> Encoder subclass. Real encoders register here by name (literal dict, no scan).
ENCODERS: dict[str, type[Encoder]] = {}

__all__ = ["ENCODERS", "Encoder"]
