"""The trainable part: one affine learner ``z = W x + b`` per modality, identity-initialised."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from cmcl.data.paired import PairedFeatures
from cmcl.types import check_modality_name


@dataclass
class PairOutput:
    """Learner outputs of a batch: ``u = f_a(x_a)`` and ``v = f_b(x_b)``, row-aligned with the batch.

    The trainer fills in where the batch falls (``epoch``, and ``update``, the update's index within
    the step, both from 0) and ``grad_scale``, the factor it multiplied every learner gradient by
    after back-propagation (gradient-norm clipping; 1.0 when it did not rescale). Hooks that reason
    about the raw gradient (DNS's rank-B projection) read it in ``before_update``.
    """

    u: torch.Tensor
    v: torch.Tensor
    grad_scale: float = 1.0
    epoch: int = 0
    update: int = 0
    #: outputs of the rows a strategy asked to forward with the batch (``Strategy.extra_inputs``)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FactoredTransform:
    """A row-wise map of a learner's inputs, ``x ↦ finish(x, prepare(x))``, whose ``prepare`` part
    gives a few numbers per row (DNS: ``x U``, k columns, for x (I − U Uᵀ)).

    The trainer computes ``prepare`` once over a step's rows and ``finish`` per batch, from the
    batch's rows and their prepared rows: the step then holds N × k numbers instead of N × d
    transformed rows, and a batch gathers k numbers per row instead of d. Both parts are row-wise.
    Called on a batch, it applies both (the route when a step's rows are not prepared).
    """

    prepare: Callable[[torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.prepare(x))


class _GradInputLinear(torch.autograd.Function):
    """``x Wᵀ + b`` whose weight gradient is computed from other inputs ``xg`` (``δᵀ xg``).

    ``xg`` has d columns, or d + 1 when the bias is treated as the weight of a constant input
    (its gradient is then ``δᵀ xg[:, d]`` instead of ``Σ δ``).
    """

    @staticmethod
    def forward(ctx, x, xg, weight, bias):
        ctx.save_for_backward(xg, weight)
        return torch.addmm(bias, x, weight.T)

    @staticmethod
    def backward(ctx, gz):
        xg, weight = ctx.saved_tensors
        d = weight.shape[1]
        grad_x = gz @ weight if ctx.needs_input_grad[0] else None
        grad_w = gz.T @ xg[:, :d]
        grad_b = gz.T @ xg[:, d] if xg.shape[1] > d else gz.sum(0)
        return grad_x, None, grad_w, grad_b


class ModalityLearners(nn.Module):
    """A ``Linear(d, d)`` per modality on ``device``, weight = identity and bias = 0 at creation.

    At initialisation every learner is the identity map, so step 0 reproduces the frozen encoder.
    A learner that a batch does not use receives no gradient (``grad is None``), so optimizers
    leave it bit-identical.
    """

    def __init__(self, modalities: Iterable[str], dim: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.dim = int(dim)
        self.layers = nn.ModuleDict()
        for m in modalities:
            layer = nn.Linear(self.dim, self.dim, device=device)
            with torch.no_grad():
                layer.weight.copy_(torch.eye(self.dim, device=device))
                layer.bias.zero_()
            self.layers[check_modality_name(m)] = layer
        #: modality -> function of a batch's inputs giving the inputs its *weight gradient* is
        #: computed from (outputs are unchanged). Empty by default; DNS projects here.
        self.grad_inputs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities with a learner."""
        return tuple(self.layers.keys())

    def __getitem__(self, modality: str) -> nn.Linear:
        return self.layers[modality]

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Apply the learner of ``modality`` to (N, D) inputs."""
        return self.layers[modality](x)

    def _linear(self, m: str, x: torch.Tensor, xg: torch.Tensor | None = None) -> torch.Tensor:
        """``m``'s learner on ``x``; its weight gradient from ``grad_inputs[m](x)``, or from ``xg``,
        those inputs computed beforehand (when ``m`` has a transform)."""
        layer = self.layers[m]
        transform = self.grad_inputs.get(m)
        if transform is None or not torch.is_grad_enabled() or not layer.weight.requires_grad:
            return layer(x)
        return _GradInputLinear.apply(x, transform(x) if xg is None else xg, layer.weight, layer.bias)

    def _apply_rows(self, names: np.ndarray, x: torch.Tensor, extra: dict[str, torch.Tensor],
                    outputs: dict[str, torch.Tensor], xg: torch.Tensor | None = None) -> torch.Tensor:
        def linear(m: str, rows_x: torch.Tensor) -> torch.Tensor:
            more = extra.pop(m, None)
            if more is None:
                return self._linear(m, rows_x, xg)
            y = self._linear(m, torch.cat([rows_x, more]))
            outputs[m] = y[len(rows_x):]
            return y[:len(rows_x)]

        first = names[0]
        if (names == first).all():
            return linear(str(first), x)
        if xg is not None:
            raise ValueError("precomputed weight-gradient inputs need the batch's side to be one modality")
        out = torch.empty_like(x)
        # One matmul per distinct modality, scattered back into row order.
        for m in np.unique(names):
            rows = torch.as_tensor(np.flatnonzero(names == m), device=x.device)
            out = out.index_put((rows,), linear(str(m), x[rows]))
        return out

    def forward_pairs(self, batch: PairedFeatures, extra: Mapping[str, torch.Tensor] | None = None,
                      weight_inputs: Mapping[str, torch.Tensor] | None = None) -> PairOutput:
        """Outputs of a batch whose rows may mix modality pairs.

        ``extra`` maps modalities to more input rows for their learners: they go through the same
        product as the batch's rows of that modality (so the backward pass forms one weight
        gradient for both), and their outputs are returned in ``out.extra``.

        ``weight_inputs`` maps a side (``"a"``, ``"b"``) whose rows are all one modality to that
        learner's ``grad_inputs`` of the batch's rows, computed beforehand (by the trainer, from
        what it computed over the step's rows once: ``trainer.StepInputs``); ignored for a learner
        given ``extra`` rows.
        """
        pending, outputs, pre = dict(extra or {}), {}, weight_inputs or {}
        u = self._apply_rows(batch.ma, batch.xa, pending, outputs, pre.get("a"))
        v = self._apply_rows(batch.mb, batch.xb, pending, outputs, pre.get("b"))
        for m, x in pending.items():   # modalities the batch does not use
            outputs[m] = self._linear(m, x)
        return PairOutput(u, v, extra=outputs)
