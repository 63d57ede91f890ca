"""Frozen encoders behind ``cmcl extract``; see :mod:`cmcl.extract.encoders.base` for the interface.

``ENCODERS`` maps a backbone name to its class. The ``synthetic`` backbone is not an encoder of
media (it writes whole datasets, :mod:`cmcl.extract.synthetic`) and so is not listed here.

The CLI calls :func:`load_encoder` (``cmcl extract --backbone NAME``) and :func:`check_checkpoint`
(``cmcl extract --check-checkpoint``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from cmcl.errors import EncoderError
from cmcl.extract.encoders.base import Encoder
from cmcl.extract.encoders.checkpoints import KeyReport
from cmcl.extract.encoders.imagebind import ImageBindEncoder
from cmcl.extract.encoders.languagebind import LanguageBindEncoder
from cmcl.extract.encoders.unibind import UniBindEncoder, diff_backbones, load_class_centres

#: backbone name -> Encoder subclass. Real encoders register here by name (literal dict, no scan).
ENCODERS: dict[str, type[Encoder]] = {
    "imagebind": ImageBindEncoder,
    "languagebind": LanguageBindEncoder,
    "unibind": UniBindEncoder,
}


def _encoder_class(name: str) -> type:
    try:
        return ENCODERS[name]
    except KeyError:
        raise EncoderError(f"unknown backbone {name!r} (choose from {sorted(ENCODERS)})") from None


def load_encoder(name: str, *, checkpoint: str | os.PathLike | None = None, random_weights: str | None = None,
                 device: str | torch.device | None = None, fp16: bool = False, **options: Any) -> Encoder:
    """Build a registered encoder.

    Args:
        name: ``imagebind``, ``unibind`` or ``languagebind``.
        checkpoint: weights file (ImageBind, UniBind) or folder (LanguageBind); ``None`` reads the
            backbone's environment variable (``CMCL_<NAME>_CHECKPOINT``).
        random_weights: ``"tiny"`` builds the tiny random test model instead of loading weights.
        device: ``"cuda"``, ``"cpu"``...; default cuda when available.
        fp16: run the network in float16 (outputs are float32, renormalised).
        options: backbone options: ``tokenizer`` (merge list / tokenizer folder),
            ``trust_pickle`` (allow the full unpickler), LanguageBind's ``text_checkpoint`` and
            ``modalities``.

    Raises:
        EncoderError: unknown name, missing or mismatched checkpoint or tokenizer file.
    """
    return _encoder_class(name).load(checkpoint, random_weights=random_weights, device=device, fp16=fp16,
                                     **options)


def check_checkpoint(name: str, checkpoint: str | os.PathLike | None, **options: Any) -> KeyReport:
    """Compare a checkpoint's parameter names and shapes with the full-size architecture.

    Tensors are memory-mapped, never read, so a 5 GB file is checked in seconds. ``report.ok`` says
    whether it fits; ``report.summary()`` is the line to print.
    """
    return _encoder_class(name).check_checkpoint(checkpoint, **options)


__all__ = ["ENCODERS", "Encoder", "check_checkpoint", "diff_backbones", "load_class_centres", "load_encoder"]
