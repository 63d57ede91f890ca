"""The encoder interface shared by every real backbone and by the extraction engine.

An encoder turns raw items (a media file path, or a string for ``text``) into L2-normalised
embeddings of width :attr:`Encoder.dim`. Decoding and preprocessing run on the CPU, possibly in
worker processes, through :meth:`Encoder.preprocessor`, which returns a picklable callable; the
forward pass runs on the encoder's device through :meth:`Encoder.encode_batch`.
:meth:`Encoder.encode` chains both for convenience.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch


class Encoder(abc.ABC):
    """A frozen modality-binding encoder.

    Attributes:
        name: backbone name used in the cache path (``imagebind``...).
        dim: embedding width.
        modalities: modalities this encoder can embed.
        checkpoint: the weights file or folder it was loaded from; ``""`` for random weights.
        random_weights: ``"tiny"`` (or another size) when built without weights, else ``""``.
    """

    name: ClassVar[str]
    dim: int
    modalities: tuple[str, ...]
    checkpoint: str = ""
    random_weights: str = ""

    @abc.abstractmethod
    def preprocessor(self, modality: str) -> Callable[[Any], torch.Tensor]:
        """A picklable function mapping one raw item to the model's input tensor (CPU)."""

    @abc.abstractmethod
    def encode_batch(self, modality: str, batch: torch.Tensor) -> np.ndarray:
        """Embed a stacked batch of preprocessed items; returns (n, dim) float32, unit rows."""

    def attributes(self) -> dict[str, Any]:
        """Preprocessing parameters and provenance, recorded in the shard's root attributes."""
        return {"random_weights": self.random_weights}

    def encode(self, modality: str, items: Sequence[Any]) -> np.ndarray:
        """Preprocess and embed ``items`` in one batch."""
        if modality not in self.modalities:
            raise ValueError(f"{self.name} cannot embed {modality!r} (it embeds {list(self.modalities)})")
        prep = self.preprocessor(modality)
        return self.encode_batch(modality, torch.stack([prep(item) for item in items]))
