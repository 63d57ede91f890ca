"""Shared vocabulary: modality names, recall protocols, and the description of one continual-learning step.

Words used throughout cmcl: a *step* is one stage of the continual sequence (one dataset and one
ordered modality pair); an *update* is one optimizer step; *batch* and *epoch* mean what they
usually do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Known modalities in the reference declaration order (the authors' ``ModalityType`` order).
#: The cache accepts any lowercase identifier, so a user may bring new modalities.
MODALITIES: tuple[str, ...] = (
    "vision", "text", "audio", "thermal", "depth", "imu", "video", "tactile", "point",
)

_MODALITY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def check_modality_name(name: str) -> str:
    """Return ``name`` if it is a valid modality identifier, else raise ``ValueError``."""
    if not isinstance(name, str) or not _MODALITY_RE.match(name):
        raise ValueError(
            f"invalid modality name {name!r}: use a lowercase identifier such as 'text' or 'audio'"
        )
    return name


#: How recall is sampled: the paper's seeded pools of 1000 test pairs, or the whole test split.
RECALL_PROTOCOLS: tuple[str, ...] = ("paper", "full")


@dataclass(frozen=True)
class Step:
    """One step of a continual sequence: a dataset and an ordered modality pair.

    Attributes:
        index: 1-based position in the protocol (0 is reserved for "before training").
        dataset: dataset name in the cache, e.g. ``"esc50"``.
        modalities: the ordered pair ``(a, b)``; ``a`` is the anchor (row) side of the loss.
    """

    index: int
    dataset: str
    modalities: tuple[str, str]

    @property
    def key(self) -> str:
        """Stable identifier of the step, e.g. ``"esc50:text-audio"``."""
        return f"{self.dataset}:{self.pair}"

    @property
    def pair(self) -> str:
        """``"a-b"``."""
        return f"{self.modalities[0]}-{self.modalities[1]}"


@dataclass(frozen=True)
class StepInfo(Step):
    """A step as the trainer hands it to strategies: the step plus what the run decided for it.

    Attributes:
        seed: a seed derived from the run seed and the step index, for any randomness a strategy
            needs inside this step (buffer sampling, perturbations). Using it keeps resumed runs
            identical to uninterrupted ones.
        clip_norm: the gradient-norm clipping the trainer applies in this step (``None``: none);
            set by the trainer, so a strategy can tell whether gradients get rescaled.
    """

    seed: int
    clip_norm: float | None = None
