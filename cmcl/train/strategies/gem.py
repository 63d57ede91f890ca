"""GEM: gradient episodic memory, projected over the current pair's parameters (baselines.md §3).

Memory: a step-balanced buffer (policy S) of ``buffer_size`` pairs, refilled after each step.
Every update of step t:

1. ``compute_gradients``: for each past step k whose pair shares a learner with (a_t, b_t), the
   base loss on all of step k's stored pairs (one batch, in-batch negatives, each row through its
   own learners) is differentiated at the current parameters. Only the current pair's parameters
   ``theta_cur = (W_a, c_a, W_b, c_b)`` count; a step sharing no learner has ``g_k = 0`` and is
   dropped. Then the trainer's closure computes the current batch's gradient ``g``.
2. ``before_update`` (after the trainer's clipping): if some ``<g, g_k> < 0``, solve the dual

       v* = argmin_v  1/2 v^T (G G^T + ridge I) v + (G g)^T v   subject to  v >= margin

   exactly (``quadprog``, or ``scipy.optimize.nnls`` after a Cholesky change of variables) and
   write ``g + G^T v*`` into ``.grad`` in place. With no violation ``.grad`` is left untouched.
   The margin is the lower bound of the reference codes, not the paper's "add gamma to v*", and the
   ridge is mammoth's (baselines.md §11.1).

Per-row gradients of linear learners are rank one, so ``G`` (K x 2(d^2+d)) is never formed:
``g_k`` restricted to learner m is ``D_k^T [X_k, 1]`` with ``D_k`` the loss's gradient with
respect to the learner outputs of step k's rows, hence
``G G^T = S^T ((D D^T) * (X X^T + 1)) S`` (S the rows' one-hot step membership),
``<g_k, g> = sum_rows D_i . (Grad_W x_i + grad_c)``, and the correction ``G^T v = (D * v_k)^T [X, 1]``
is one matmul per learner. As in the reference codes, the gradients' products are float32 and the
quadratic program float64: the per-row products ``D D^T``, ``X X^T`` and ``D Delta^T`` are float32
(the reference forms ``g_k`` and ``<g, g_k>`` in float32), their sums over rows and steps float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.train.learners import PairOutput
from cmcl.train.objective import two_way
from cmcl.train.strategies.base import Closure, Losses, param
from cmcl.train.strategies.buffer import Replay
from cmcl.types import StepInfo

SOLVERS = ("quadprog", "nnls")


def equal_blocks(groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, int] | None:
    """``(order, size)`` when every group has the same number of rows (``groups[order]`` sorted), else
    None: the argument ``blocks`` of :func:`grouped_info_nce`, computed once while the groups are fixed."""
    counts = torch.bincount(groups, minlength=n_groups)
    size = int(counts[0])
    if n_groups > 1 and size > 0 and bool((counts == size).all()):
        return torch.argsort(groups, stable=True), size
    return None


def grouped_info_nce(u: torch.Tensor, v: torch.Tensor, groups: torch.Tensor, n_groups: int, *,
                     temperature: float = 1.0, direction: str = "a2b",
                     blocks: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """The base InfoNCE of each group of rows, negatives taken within the group only: shape (K,).

    Equals ``info_nce(u[g], v[g])`` for every group ``g``. Given ``blocks`` (:func:`equal_blocks`:
    groups of equal size, as the step-balanced memory's shares are), the groups are scored as one
    batch of K blocks, Σ n_g² d work; otherwise as one masked N x N product, N² d work (K times
    more for K equal groups).
    """
    if blocks is not None:
        order, size = blocks
        a, b = u[order].view(n_groups, size, -1), v[order].view(n_groups, size, -1)
        logits = torch.bmm(a, b.transpose(1, 2))
        if temperature != 1.0:
            logits = logits / temperature
        target = torch.arange(size, device=u.device).repeat(n_groups)
        per_row = two_way(direction,
                          lambda: F.cross_entropy(logits.reshape(-1, size), target, reduction="none"),
                          lambda: F.cross_entropy(logits.transpose(1, 2).reshape(-1, size), target, reduction="none"))
        return per_row.view(n_groups, size).mean(dim=1)
    logits = u @ v.T
    if temperature != 1.0:
        logits = logits / temperature
    logits = logits.masked_fill(groups[:, None] != groups[None, :], float("-inf"))
    target = torch.arange(len(u), device=u.device)
    per_row = two_way(direction, lambda: F.cross_entropy(logits, target, reduction="none"),
                      lambda: F.cross_entropy(logits.T, target, reduction="none"))
    counts = torch.bincount(groups, minlength=n_groups).to(per_row.dtype)
    return torch.zeros(n_groups, dtype=per_row.dtype, device=u.device).index_add(0, groups, per_row) / counts


def gem_multipliers(gram: np.ndarray, dots: np.ndarray, *, margin: float, ridge: float,
                    solver: str = "quadprog") -> np.ndarray:
    """Solve ``min_v 1/2 v^T (gram + ridge I) v + dots^T v`` subject to ``v >= margin`` (float64)."""
    k = len(dots)
    q_mat = np.asarray(gram, dtype=np.float64) + ridge * np.eye(k)
    q_mat = 0.5 * (q_mat + q_mat.T)
    q = np.asarray(dots, dtype=np.float64)
    if solver == "quadprog":
        import quadprog
        # quadprog minimises 1/2 x^T G x - a^T x subject to C^T x >= b
        return quadprog.solve_qp(q_mat, -q, np.eye(k), np.full(k, float(margin)))[0]
    if solver == "nnls":
        from scipy.linalg import cholesky, solve_triangular
        from scipy.optimize import nnls
        # v = margin + w, w >= 0: 1/2 w^T Q w + c^T w with c = q + margin Q 1 = 1/2 ||L^T w + L^-1 c||^2 + const
        c = q + margin * q_mat.sum(axis=1)
        low = cholesky(q_mat, lower=True)
        w, _ = nnls(low.T, -solve_triangular(low, c, lower=True))
        return margin + w
    raise ValueError(f"unknown GEM solver {solver!r}; expected one of {', '.join(SOLVERS)}")


class GEM(Replay):
    """Gradient episodic memory with a step-balanced memory and an exact dual QP."""

    @dataclass(frozen=True)
    class Params(Replay.Params):
        margin: float = param(0.5, ge=0)        # lower bound of the dual variables
        ridge: float = param(1e-3, ge=0)        # added to the Gram matrix's diagonal
        solver: str = param("quadprog", choices=SOLVERS)

    name = "gem"
    output_grads = True   # dL/du, dL/dv on out: the rank-B route

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._mem: dict[str, Any] | None = None
        self._grads: dict[str, Any] | None = None
        self.last_dots: torch.Tensor | None = None     # <g, g_k> of the last update (diagnostic)
        self._stats: dict[str, float] = {}

    # ------------------------------------------------------------------ memory of past steps
    def before_step(self, step: StepInfo, data: PairedFeatures) -> None:
        super().before_step(step, data)
        self._cur = tuple(dict.fromkeys(step.modalities))
        self._stats = {"updates": 0, "projected": 0, "violations": 0, "constraints": 0,
                       "v_sum": 0.0, "v_count": 0, "v_max": 0.0, "min_cosine": float("inf")}
        self._mem = None
        feats = self.buffer.features()
        if feats is None:
            return
        shared = []
        for s in sorted(self.buffer.composition()):
            first = int(torch.nonzero(feats.step == s)[0])
            if {str(feats.ma[first]), str(feats.mb[first])} & set(self._cur):
                shared.append(s)
        if not shared:
            return
        rows = torch.nonzero(torch.isin(feats.step, torch.tensor(shared, device=feats.step.device))).flatten()
        mem = feats.select(rows.cpu())
        groups = torch.as_tensor(np.searchsorted(shared, mem.step.cpu().numpy()), device=mem.xa.device)
        with torch.no_grad():
            out = self.learners.forward_pairs(mem)     # sides outside the current pair stay fixed
        idx = {}
        for m in self._cur:
            idx[m] = (torch.as_tensor(np.flatnonzero(mem.ma == m), device=mem.xa.device),
                      torch.as_tensor(np.flatnonzero(mem.mb == m), device=mem.xa.device))
        # per current learner: its memory inputs, their step (index and one-hot) and X X^T + 1 (fixed
        # during the step)
        inputs = {}
        for m, (ia, ib) in idx.items():
            if len(ia) or len(ib):
                xm = torch.cat([mem.xa[ia], mem.xb[ib]])
                gm = torch.cat([groups[ia], groups[ib]])
                inputs[m] = (xm, gm, (xm @ xm.T + 1.0).double(), F.one_hot(gm, len(shared)).double())
        self._mem = {"data": mem, "groups": groups, "blocks": equal_blocks(groups, len(shared)),
                     "k": len(shared), "steps": shared,
                     "u0": out.u, "v0": out.v, "idx": idx, "inputs": inputs}

    def memory_gradients(self) -> dict[str, Any] | None:
        """Per-learner factors ``(D, X, step of each row)`` of every g_k; the Gram ``G G^T`` (float64)
        is :meth:`memory_gram`'s, formed on first use."""
        mem = self._mem
        if mem is None:
            return None
        groups, k = mem["groups"], mem["k"]
        with torch.no_grad():
            outs, fresh = {"a": mem["u0"], "b": mem["v0"]}, set()
            for m, (xm, _, _, _) in mem["inputs"].items():
                ia, ib = mem["idx"][m]
                # the learner's memory inputs of each side are fixed for the step: gathered once
                layer, na = self.learners[m], len(ia)
                for side, rows, x in (("a", ia, xm[:na]), ("b", ib, xm[na:])):
                    if not len(rows):
                        continue
                    part = layer(x)
                    if len(rows) == len(outs[side]):     # every row of this side: no scatter
                        outs[side] = part
                    else:
                        if side not in fresh:
                            outs[side] = outs[side].clone()
                        outs[side][rows] = part
                    fresh.add(side)
            u, v = outs["a"], outs["b"]
        u.requires_grad_(True)
        v.requires_grad_(True)
        with torch.enable_grad():
            per_step = grouped_info_nce(u, v, groups, k, temperature=self.objective.temperature,
                                        direction=self.objective.direction, blocks=mem["blocks"])
            du, dv = torch.autograd.grad(per_step.sum(), [u, v])
        factors = {}
        for m, (xm, gm, _, _) in mem["inputs"].items():
            ia, ib = mem["idx"][m]
            if len(ia) == len(du) and not len(ib):
                dm = du
            elif len(ib) == len(dv) and not len(ia):
                dm = dv
            else:
                dm = torch.cat([du[ia], dv[ib]])
            factors[m] = (dm, xm, gm)
        return {"factors": factors, "gram": None, "k": k}

    def memory_gram(self, mg: dict[str, Any]) -> torch.Tensor:
        """``G G^T`` (K x K, float64) of :meth:`memory_gradients`' factors, computed once per update
        and only when read: with no violation it only feeds the cosine diagnostic."""
        if mg["gram"] is None:
            gram = torch.zeros(mg["k"], mg["k"], dtype=torch.float64, device=self._mem["u0"].device)
            for m, (dm, _, _) in mg["factors"].items():
                _, _, x_gram, member = self._mem["inputs"][m]
                pair_dots = (dm @ dm.T).double() * x_gram    # <D_i x_i^T, D_j x_j^T> + <D_i, D_j>
                gram += member.T @ pair_dots @ member
            mg["gram"] = gram
        return mg["gram"]

    # ------------------------------------------------------------------ hooks
    def compute_gradients(self, closure: Closure) -> tuple[Losses, PairOutput]:
        self._grads = self.memory_gradients()
        return closure()

    def _current_factors(self, batch: PairedFeatures, out: PairOutput
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """``{m: (Delta, X)}`` with ``grad W_m = Delta^T X`` (before clipping), or None if unavailable.

        Delta is dL/du (dL/dv), which the trainer keeps on ``out`` since ``output_grads`` is set.
        """
        pair = batch.single_pair
        if (pair is None or pair[0] == pair[1] or not (out.u.retains_grad and out.v.retains_grad)
                or out.u.grad is None or out.v.grad is None):
            return None
        return {pair[0]: (out.u.grad, batch.xa), pair[1]: (out.v.grad, batch.xb)}

    def _dots(self, mg: dict[str, Any], batch: PairedFeatures, out: PairOutput) -> tuple[torch.Tensor, float]:
        """``<g, g_k>`` for every k (float64) and ``||g||^2`` over the current pair's parameters."""
        k = mg["k"]
        device = self._mem["u0"].device
        dots = torch.zeros(k, dtype=torch.float64, device=device)
        g_sq = sum(float(torch.linalg.vector_norm(p.grad)) ** 2 for m in self._cur
                   for p in self.learners[m].parameters() if p.grad is not None)
        cur = self._current_factors(batch, out)
        if cur is not None and set(cur) == set(self._cur):
            # The trainer's clipping scales .grad by c <= 1: recover c from the norms.
            struct_sq, raw = 0.0, torch.zeros(k, dtype=torch.float64, device=device)
            for m, (dc, xc) in cur.items():
                struct_sq += float(((dc @ dc.T) * (xc @ xc.T + 1.0)).double().sum())
                if m in mg["factors"]:
                    dm, xm, gm = mg["factors"][m]
                    rows = ((dm @ dc.T) * (xm @ xc.T + 1.0)).double().sum(dim=1)
                    raw.index_add_(0, gm, rows)
            if struct_sq > 0 and g_sq <= struct_sq * (1 + 1e-4):
                return raw * (g_sq / struct_sq) ** 0.5, g_sq
        # Dense route (another hook changed .grad, or no captured factors): O(N d^2) in float64.
        for m, (dm, xm, gm) in mg["factors"].items():
            layer = self.learners[m]
            y = torch.zeros(len(xm), layer.weight.shape[0], dtype=torch.float64, device=xm.device)
            if layer.weight.grad is not None:
                y += xm.double() @ layer.weight.grad.double().T
            if layer.bias.grad is not None:
                y += layer.bias.grad.double()
            dots.index_add_(0, gm, (dm.double() * y).sum(dim=1))
        return dots, g_sq

    def before_update(self, batch: PairedFeatures, out: PairOutput) -> None:
        self._stats["updates"] += 1
        mg, self._grads = self._grads, None
        if mg is None or not mg["factors"]:
            return
        k = mg["k"]
        dots, g_sq = self._dots(mg, batch, out)
        self._stats["constraints"] += k
        self.last_dots = dots
        violated = int((dots < 0).sum())
        # cosine of g with each g_k: how close the update came to a violation. Without a violation
        # every cosine is >= 0 and cannot lower a minimum that is already negative: the Gram is
        # then not needed, and the step's minimum is the same as if it were formed at every update.
        if violated or self._stats["min_cosine"] >= 0:
            norms = self.memory_gram(mg).diagonal().clamp_min(0).sqrt() * g_sq ** 0.5
            cosine = torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots))
            self._stats["min_cosine"] = min(self._stats["min_cosine"], float(cosine.min()))
        if violated == 0:
            return
        self._stats["violations"] += violated
        self._stats["projected"] += 1
        v = gem_multipliers(self.memory_gram(mg).cpu().numpy(), dots.cpu().numpy(), margin=self.margin,
                            ridge=self.ridge, solver=self.solver)
        self._stats["v_sum"] += float(v.sum())
        self._stats["v_count"] += len(v)
        self._stats["v_max"] = max(self._stats["v_max"], float(v.max()))
        coef = torch.as_tensor(v, device=dots.device)
        with torch.no_grad():
            for m, (dm, xm, gm) in mg["factors"].items():
                layer = self.learners[m]
                scaled = dm * coef[gm].to(dm.dtype)[:, None]
                for p, corr in ((layer.weight, lambda: scaled.T @ xm), (layer.bias, lambda: scaled.sum(0))):
                    if p.grad is None:
                        p.grad = corr()
                    else:
                        p.grad.add_(corr())

    def after_step(self, step: StepInfo, data: PairedFeatures) -> None:
        self._mem = None
        super().after_step(step, data)

    # ------------------------------------------------------------------ bookkeeping
    def report(self) -> dict[str, float]:
        s = self._stats
        updates = max(s.get("updates", 0), 1)
        out = {
            "gem/constraints_per_update": s.get("constraints", 0) / updates,
            "gem/violations_per_update": s.get("violations", 0) / updates,
            "gem/projected_fraction": s.get("projected", 0) / updates,
            "gem/multiplier_mean": s["v_sum"] / s["v_count"] if s.get("v_count") else 0.0,
            "gem/multiplier_max": float(s.get("v_max", 0.0)),
        }
        if s.get("constraints"):
            out["gem/min_cosine"] = float(s["min_cosine"])
        return out | super().report()
