"""DNS: dual-sided null-space gradient projection (the CMCL paper, Theorem 4 and Algorithm 1).

For the pair (a, b) trained at a step, each active learner's weight gradient G is replaced by
``G - Q G P`` before the optimizer step, where

* ``P`` (input side) projects onto the span of this modality's inputs from every earlier step that
  trained it: the leading eigenvectors (eigenvalue > ``lambda_min``) of the uncentred covariance
  ``C_in[m]``, updated after each step that trains m as ``C ← (n̄_{t-1}/n̄_t) C + XᵀX/n̄_t``
  (Algorithm 1 line 16), where n̄_t counts the pairs of *all* steps up to t: one count shared by
  every modality, as in the paper and the authors' code (``count="shared"``, the default). A
  modality first trained late enters with its eigenvalues scaled by n_t/n̄_t;
* ``Q`` (output side) projects onto the span of the *paired* modality's outputs under the models
  of those steps: ``C_out[m]`` accumulates ``W_m' C(x_m') W_m'ᵀ`` right after each step that paired
  m with m' (the authors' ``feature_covariance2``), thresholded by ``lambda_left``.

``lambda_left = 0`` (the default) keeps every direction, so ``Q = I`` and DNS is the one-sided
update ``G - G P``: this is what the authors' code does (method.md finding 1). A positive value
gives the paper's genuinely dual-sided projection. Projectors are rebuilt before each step; a
modality never trained before has ``P = 0`` (no projection).

Options (off by default): ``count="modality"`` keeps one count per modality instead, i.e. a plain
running mean of each modality's own inputs (cmcl's variant, not the paper's: late modalities keep
more directions above ``lambda_min``); ``energy_in``/``energy_out`` replace the absolute thresholds by an
energy ratio; ``project="update"`` projects the optimizer's final update instead of the gradient
(the Adam-NSCL variant, exact under AdamW; method.md finding 3); ``project_bias=True`` treats the
bias as the weight of a constant input (project over ``[x; 1]``), extending the guarantee to the
whole affine learner (finding 5).

Speed: with ``Q = I`` (the default), the projected gradient is ``G − G P = δᵀ (X − X P)``, so when the
trainer does not clip gradients DNS hands autograd the projected inputs for the weight gradient
(its ``weight_grad_inputs`` hook): the trainer computes X U over the step's rows once, O(N·d·k)
per step and N × k numbers kept, and each batch forms its rows of X − (X U) Uᵀ from its rows of
X U, instead of a d×d correction per batch. It is the same update; ``fused=False`` turns it off.
With clipping (reference harness) the hook route runs, which projects the clipped raw gradient
as the authors do. The output covariances are accumulated only when something reads them
(``lambda_left > 0`` or ``energy_out``), and a step reuses the Gram matrix of rows an earlier
step already summed (tvl and vggsound_s train each modality twice): it recognises the very same
input tensor, which the trainer's loader hands to every step of a dataset, by a weak reference,
so the cache never keeps a finished dataset's rows in memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import FactoredTransform, PairOutput
from cmcl.train.strategies.base import Strategy, param
from cmcl.train.strategies.projection import Projector, project_out, projector_from_covariance
from cmcl.types import StepInfo

_BLOCK = 8192
#: The Gram matrix is formed in _GRAM_SPLITS × _GRAM_SPLITS blocks of columns, the upper ones only.
_GRAM_SPLITS = 4
#: ``shared``: Algorithm 1's n̄_t over all steps (the paper); ``modality``: a running mean per modality.
COUNTS = ("shared", "modality")


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


class DNS(Strategy):
    """Dual-sided null-space projection of the active learners' gradients."""

    name = "dns"
    output_grads = True   # dL/du, dL/dv on out for the hook route's rank-B product; off on steps without it
    # The paper's thresholds; synthetic's is ours (docs/synthetic.md): its per-dataset energy is
    # spread over ~16 directions and diluted by later datasets, so 0.01 keeps fewer of them.
    backbone_defaults = {
        "synthetic": {"lambda_min": 1e-3},
        "imagebind": {"lambda_min": 0.01},
        "unibind": {"lambda_min": 0.01},
        "languagebind": {"lambda_min": 1e-4},
    }

    @dataclass(frozen=True)
    class Params(Strategy.Params):              # the options are described in the module docstring
        lambda_min: float = param(0.01, ge=0)
        lambda_left: float = param(0.0, ge=0)
        energy_in: float | None = param(None, gt=0, le=1)
        energy_out: float | None = param(None, gt=0, le=1)
        project: str = param("gradient", choices=("gradient", "update"))
        project_bias: bool = False
        fused: bool = True
        count: str = param("shared", choices=COUNTS)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._fused_now: set[str] = set()
        # modality -> running covariance (float64) and the number of rows behind it; n_bar is the
        # pairs of every step so far (Algorithm 1's n̄_t, the weight of the shared rule)
        self.n_bar = 0
        self.cov_in: dict[str, torch.Tensor] = {}
        self.n_in: dict[str, int] = {}
        self.cov_out: dict[str, torch.Tensor] = {}
        self.n_out: dict[str, int] = {}
        self._proj: dict[str, tuple[Projector, Projector]] = {}
        self._before: dict[str, torch.Tensor] = {}
        # modality -> (a weak reference to the inputs, their Gram matrix): consecutive steps on one
        # dataset (tvl, vggsound_s) share a modality's rows, and the loader hands them the same tensor
        self._grams: dict[str, tuple[weakref.ref, torch.Tensor]] = {}
        self._ranks: dict[str, float] = {}

    # ------------------------------------------------------------------ projectors
    @property
    def one_sided(self) -> bool:
        """``Q = I`` whatever the outputs (``lambda_left = 0``, no ``energy_out``): the output
        covariances are never read, so they are not computed."""
        return self.lambda_left <= 0 and self.energy_out is None

    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        device = self.learners[step.modalities[0]].weight.device
        self._proj = {}
        self._ranks = {}
        self._grams = {m: v for m, v in self._grams.items() if v[0]() is not None}   # inputs still alive
        d_in = self.learners.dim + (1 if self.project_bias else 0)
        for m in step.modalities:
            if m in self.cov_in:
                right = projector_from_covariance(self.cov_in[m], threshold=self.lambda_min, energy=self.energy_in)
            else:
                right = Projector.zero(d_in)
            if self.one_sided:
                left = Projector.identity(self.learners.dim) if m in self.cov_in else Projector.zero(self.learners.dim)
            elif m in self.cov_out:
                left = projector_from_covariance(self.cov_out[m], threshold=self.lambda_left, energy=self.energy_out)
            else:
                left = Projector.zero(self.learners.dim)
            self._proj[m] = (left.to(device), right.to(device))
            self._ranks[f"dns/rank_in/{m}"] = float(right.rank)
            self._ranks[f"dns/rank_out/{m}"] = float(left.rank)
            if (self.fused and self.project == "gradient" and step.clip_norm is None and left.is_identity
                    and not right.is_zero):
                self._fused_now.add(m)
        self._ranks["dns/fused"] = float(len(self._fused_now))
        # retaining dL/du and dL/dv costs two (B, d) copies per update: only the hook route reads them
        self.output_grads = self.project == "gradient" and any(
            not (left.is_zero or right.is_zero) and m not in self._fused_now for m, (left, right) in self._proj.items())

    def weight_grad_inputs(self, step: StepInfo) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The fused route: the trainer computes the weight gradient of these learners from X (I − P)."""
        return {m: self._projected_inputs(self._proj[m][1]) for m in self._fused_now}

    def _projected_inputs(self, right: Projector) -> Callable[[torch.Tensor], torch.Tensor]:
        """x ↦ x (I − P) (over [x; 1] with ``project_bias``): the weight gradient then is G − G P.
        Factored as ``x U`` (k numbers per row, computed over the step's rows once) and the batch's
        x − (x U) Uᵀ, so a step holds N × k numbers instead of its N × d projected rows."""
        aug = _augment if self.project_bias else (lambda x: x)
        if right.basis is None:   # P = I: the weight gradient is zero
            return lambda x: right.right_complement(aug(x))
        prepare, finish = right.complement_parts()
        return FactoredTransform(lambda x: prepare(aug(x)), lambda x, xu: finish(aug(x), xu))

    # ------------------------------------------------------------------ gradient projection
    def _sides(self, batch: PairedFeatures):
        pair = batch.single_pair
        if pair is None:
            raise ValueError("DNS trains one modality pair per step; got a batch mixing pairs")
        return ((pair[0], batch.xa, "a"), (pair[1], batch.xb, "b"))

    def before_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        if self.project == "update":
            for m, _, _ in self._sides(batch):
                layer = self.learners[m]
                self._before[m] = self._flat(layer.weight.detach(), layer.bias.detach()).clone()
            return
        for m, x, side in self._sides(batch):
            left, right = self._proj[m]
            if left.is_zero or right.is_zero or m in self._fused_now:
                continue
            layer = self.learners[m]
            if layer.weight.grad is None:
                continue
            g = self._flat(layer.weight.grad, layer.bias.grad)
            y = out.u if side == "a" else out.v
            delta = y.grad if y.retains_grad else None  # dL/du or dL/dv (output_grads)
            xin = _augment(x) if self.project_bias else x
            # .grad = grad_scale · δᵀX: the trainer reports the clipping factor it applied.
            project_out(g, left, right, x=xin, delta=delta, scale=out.grad_scale, subtract=True)
            self._unflat(g, layer.weight.grad, layer.bias.grad)

    def after_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        if self.project != "update":
            return
        with torch.no_grad():
            for m, _, _ in self._sides(batch):
                left, right = self._proj[m]
                before = self._before.pop(m)
                if left.is_zero or right.is_zero:
                    continue
                layer = self.learners[m]
                step = self._flat(layer.weight, layer.bias) - before
                step.sub_(project_out(step, left, right))
                new = before + step
                self._unflat(new, layer.weight, layer.bias)

    def _flat(self, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Weight (and bias as an extra input column when ``project_bias``) as one matrix."""
        if not self.project_bias:
            return w
        bias = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return torch.cat([w, bias[:, None]], dim=1)

    def _unflat(self, g: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
        if not self.project_bias:
            if g.data_ptr() != w.data_ptr():
                w.copy_(g)
            return
        w.copy_(g[:, :-1])
        if b is not None:
            b.copy_(g[:, -1])

    # ------------------------------------------------------------------ covariances
    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._fused_now = set()
        a, b = step.modalities
        n = len(data)
        shared = self.n_bar if self.count == "shared" else None
        with torch.no_grad():
            grams = {}
            for m, x in ((a, data.xa), (b, data.xb)):
                grams[m] = self._input_gram(m, x)
                self._accumulate(self.cov_in, self.n_in, m, grams[m], n, shared)
            # The partner's outputs W y (or W y + b) have the covariance W̃ (YᵀY) W̃ᵀ: reuse the input
            # Gram matrix instead of pushing every row through the learner (2d³ instead of 4Nd²).
            for m, other in () if self.one_sided else ((a, b), (b, a)):
                layer = self.learners[other]
                w = self._flat(layer.weight, layer.bias).to(torch.float64)
                self._accumulate(self.cov_out, self.n_out, m, w @ grams[other] @ w.T, n, shared)
        self.n_bar += n
        self._ranks["dns/n_bar"] = float(self.n_bar)

    def _input_gram(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """XᵀX (over ``[X, 1]`` with ``project_bias``), reused when a later step hands over the very
        same tensor ``x``: the same object, still alive. A weak reference recognises it without
        keeping it, so a finished dataset's rows are freed, and new data in their memory is a new
        object, never taken for them."""
        hit = self._grams.get(m)
        if hit is not None and hit[0]() is x:
            return hit[1]
        gram = self._gram(_augment(x) if self.project_bias else x)
        self._grams[m] = (weakref.ref(x), gram)
        return gram

    @staticmethod
    def _gram(x: torch.Tensor) -> torch.Tensor:
        """XᵀX in float64, accumulated over float32 blocks of rows. Only the blocks on and above the
        diagonal of a 4 × 4 partition of the columns are multiplied (10 of 16, the lower ones are
        their transposes), all through torch: 0.27 s against numpy's symmetric rank-k update's
        0.43 s for 60,000 × 1,024, and no second BLAS thread pool spinning against the learners'
        products (docs/performance.md, issue 14's ninth session)."""
        d = x.shape[1]
        gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        cuts = [d * j // _GRAM_SPLITS for j in range(_GRAM_SPLITS + 1)]
        x = x.detach()
        for i in range(0, len(x), _BLOCK):
            block = x[i:i + _BLOCK]
            for lo, hi in zip(cuts, cuts[1:]):
                gram[lo:hi, lo:] += (block[:, lo:hi].T @ block[:, lo:]).to(torch.float64)
        # the lower triangle is the upper one's transpose, inside the diagonal blocks too: a product
        # BᵀB need not come out exactly symmetric (it did with MKL on Intel, not on AMD EPYC)
        lower = torch.tril_indices(d, d, -1, device=x.device)
        gram[lower[0], lower[1]] = gram[lower[1], lower[0]]
        return gram

    @staticmethod
    def _accumulate(store: dict[str, torch.Tensor], counts: dict[str, int], m: str, gram: torch.Tensor,
                    n: int, shared: int | None) -> None:
        """Algorithm 1 line 16: C ← (n̄_{t-1}/n̄_t) C + Σ x xᵀ / n̄_t with n̄_t = n̄_{t-1} + n.

        ``shared`` is n̄_{t-1}, the pairs of every earlier step (the paper's count); ``None`` uses the
        rows this modality has seen (``count="modality"``: a plain running mean per modality).
        """
        n_old = counts.get(m, 0) if shared is None else shared
        total = n_old + n
        store[m] = store[m] * (n_old / total) + gram / total if m in store else gram / total
        counts[m] = counts.get(m, 0) + n

    # ------------------------------------------------------------------ bookkeeping
    def report(self) -> dict[str, float]:
        return dict(self._ranks)

    def state_dict(self) -> dict[str, Any]:
        return {
            "cov_in": {m: c.cpu() for m, c in self.cov_in.items()}, "n_in": dict(self.n_in),
            "cov_out": {m: c.cpu() for m, c in self.cov_out.items()}, "n_out": dict(self.n_out),
            "n_bar": self.n_bar,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next(self.learners.parameters()).device
        self.cov_in = {m: c.to(device) for m, c in state["cov_in"].items()}
        self.n_in = {m: int(n) for m, n in state["n_in"].items()}
        self.cov_out = {m: c.to(device) for m, c in state["cov_out"].items()}
        self.n_out = {m: int(n) for m, n in state["n_out"].items()}
        if "n_bar" not in state and self.count == "shared" and self.cov_in:
            raise ValueError("this DNS checkpoint predates the shared pair count (Algorithm 1's n̄); "
                             "resume it with -p count=modality")
        self.n_bar = int(state.get("n_bar", 0))
