"""The trainable part: one affine learner ``z = W x + b`` per modality, identity-initialised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from cmcl.data.paired import PairedFeatures
from cmcl.types import check_modality_name


@dataclass
class PairOutput:
    """Learner outputs of a batch: ``u = f_a(x_a)`` and ``v = f_b(x_b)``, row-aligned with the batch."""

    u: torch.Tensor
    v: torch.Tensor


class ModalityLearners(nn.Module):
    """A ``Linear(d, d)`` per modality, weight = identity and bias = 0 at creation.

    At initialisation every learner is the identity map, so step 0 reproduces the frozen encoder.
    A learner that a batch does not use receives no gradient (``grad is None``), so optimizers
    leave it bit-identical.
    """

    def __init__(self, modalities: Iterable[str], dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.layers = nn.ModuleDict()
        for m in modalities:
            layer = nn.Linear(self.dim, self.dim)
            with torch.no_grad():
                layer.weight.copy_(torch.eye(self.dim))
                layer.bias.zero_()
            self.layers[check_modality_name(m)] = layer

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities with a learner."""
        return tuple(self.layers.keys())

    def __getitem__(self, modality: str) -> nn.Linear:
        return self.layers[modality]

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Apply the learner of ``modality`` to (N, D) inputs."""
        return self.layers[modality](x)

    def _apply_rows(self, names: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        first = names[0]
        if (names == first).all():
            return self.layers[str(first)](x)
        out = torch.empty_like(x)
        # One matmul per distinct modality, scattered back into row order.
        for m in np.unique(names):
            rows = torch.as_tensor(np.flatnonzero(names == m), device=x.device)
            out = out.index_put((rows,), self.layers[str(m)](x[rows]))
        return out

    def forward_pairs(self, batch: PairedFeatures) -> PairOutput:
        """Outputs of a batch whose rows may mix modality pairs."""
        return PairOutput(self._apply_rows(batch.ma, batch.xa), self._apply_rows(batch.mb, batch.xb))
