"""GEM: the dual QP (both solvers, the cone projection), the rank-one memory gradients, the
constraints after projection, the untouched gradient without violation, and K = 0 = Vanilla."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.objective import info_nce
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.strategies.gem import GEM, equal_blocks, gem_multipliers, grouped_info_nce
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

from tests.helpers import random_pairs

D = 6
HARNESS = Harness(lr=5e-2, weight_decay=0.0, decay_bias=False, linear_decay=False, clip_norm=1.0)
MODALITIES = ["text", "audio", "video", "vision", "depth"]


def pairs(n, seed, pair, step):
    return random_pairs(n, D, seed, pair, step)


def random_problem(seed, k=3, p=50):
    rng = np.random.default_rng(seed)
    g_mem = rng.standard_normal((k, p))
    g = -g_mem.sum(0) + 0.3 * rng.standard_normal(p)       # violates every constraint
    return g_mem, g


@pytest.mark.parametrize("direction", ["a2b", "symmetric"])
@pytest.mark.parametrize("groups", [[0, 2, 1, 0, 2, 2, 1, 0, 0, 2, 1],        # unequal sizes: the masked product
                                    [0, 2, 1, 0, 2, 2, 1, 1, 0, 2, 1, 0]])    # equal sizes: one batch of blocks
def test_grouped_info_nce_equals_the_loss_of_each_group(direction, groups):
    torch.manual_seed(0)
    groups = torch.tensor(groups)
    u = torch.randn(len(groups), 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(len(groups), 4, dtype=torch.float64, requires_grad=True)
    blocks = equal_blocks(groups, 3)
    assert (blocks is None) == (len(groups) == 11)
    got = grouped_info_nce(u, v, groups, 3, temperature=0.7, direction=direction, blocks=blocks)
    want = torch.stack([info_nce(u[groups == k], v[groups == k], temperature=0.7, direction=direction)
                        for k in range(3)])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got @ weights, [u, v]), torch.autograd.grad(want @ weights, [u, v])):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadprog_and_nnls_agree_and_respect_the_margin(seed):
    g_mem, g = random_problem(seed, k=4)
    gram, dots = g_mem @ g_mem.T, g_mem @ g
    vq = gem_multipliers(gram, dots, margin=0.5, ridge=1e-3, solver="quadprog")
    vn = gem_multipliers(gram, dots, margin=0.5, ridge=1e-3, solver="nnls")
    np.testing.assert_allclose(vq, vn, rtol=1e-6, atol=1e-6)
    assert (vq >= 0.5 - 1e-9).all()
    g_tilde = g + g_mem.T @ vq
    # constraints hold up to the ridge: <g~, g_k> >= -ridge * v_k
    assert (g_mem @ g_tilde >= -1e-3 * vq.max() - 1e-9).all()


def cone_projection_by_enumeration(g_mem: np.ndarray, g: np.ndarray) -> np.ndarray:
    """argmin ||x - g|| s.t. g_mem x >= 0, by trying every active set (exact for a few constraints).

    The projection is g + A^T w for the active rows A, with A (g + A^T w) = 0; it is the optimum when it
    is feasible and w >= 0 (KKT). Independent of any QP or SLSQP solver.
    """
    k = len(g_mem)
    best = None
    for mask in range(1 << k):
        rows = [i for i in range(k) if mask >> i & 1]
        if rows:
            a = g_mem[rows]
            w = np.linalg.solve(a @ a.T, -(a @ g))
            if (w < -1e-12).any():
                continue
            x = g + a.T @ w
        else:
            x = g.copy()
        if (g_mem @ x >= -1e-10).all() and (best is None or np.sum((x - g) ** 2) < np.sum((best - g) ** 2)):
            best = x
    return best


def test_without_margin_and_ridge_the_update_is_the_euclidean_projection_onto_the_cone():
    g_mem, g = random_problem(7, k=3, p=50)
    v = gem_multipliers(g_mem @ g_mem.T, g_mem @ g, margin=0.0, ridge=0.0, solver="quadprog")
    g_tilde = g + g_mem.T @ v
    assert (g_mem @ g_tilde >= -1e-8).all()
    np.testing.assert_allclose(g_tilde, cone_projection_by_enumeration(g_mem, g), atol=1e-8)
    # and the KKT conditions of the projection hold: v >= 0, G g~ >= 0, v_k (G g~)_k = 0
    assert (v >= -1e-10).all()
    np.testing.assert_allclose(v * (g_mem @ g_tilde), 0.0, atol=1e-8)
    assert np.linalg.norm(g_tilde - g) > 0.1     # the problem was violated


def setup_three_steps(solver="quadprog"):
    """Steps 1 (text,audio), 2 (text,video), 3 (vision,depth) trained; returns learners and GEM at step 4."""
    torch.manual_seed(0)
    learners = ModalityLearners(MODALITIES, D)
    gem = get_strategy("gem", solver=solver, buffer_size=24)
    gem.setup(learners, Objective())
    for i, pair in enumerate([("text", "audio"), ("text", "video"), ("vision", "depth")], start=1):
        fit_step(learners, gem, StepInfo(i, f"s{i}", pair, 10 + i), pairs(40, i, pair, i), harness=HARNESS,
                 epochs=2, batch_size=16)
    return learners, gem


def flat_grads(learners, modalities):
    out = []
    for m in modalities:
        for p in learners[m].parameters():
            out.append(torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten().clone())
    return torch.cat(out).double()


def dense_memory_gradient(learners, mem, modalities):
    learners.zero_grad(set_to_none=True)
    out = learners.forward_pairs(mem)
    info_nce(out.u, out.v).backward()
    g = flat_grads(learners, modalities)
    learners.zero_grad(set_to_none=True)
    return g


def one_update(learners, gem, batch, clip=1.0, hooks=True):
    """The trainer's update up to before_update; returns raw and projected current gradients."""
    def closure():
        learners.zero_grad(set_to_none=True)
        out = learners.forward_pairs(batch)
        if hooks:  # what the trainer does for a strategy with output_grads: dL/du, dL/dv kept on out
            out.u.retain_grad()
            out.v.retain_grad()
        losses = gem.losses(batch, out) if hooks else {"contrastive_loss": info_nce(out.u, out.v)}
        sum(losses.values()).backward()
        return losses, out

    _, out = gem.compute_gradients(closure)
    torch.nn.utils.clip_grad_norm_([p for p in learners.parameters() if p.grad is not None], clip)
    raw = {n: p.grad.clone() for n, p in learners.named_parameters() if p.grad is not None}
    gem.before_update(batch, out)
    return raw


@pytest.mark.parametrize("clip,hooks", [(1.0, True), (1e-4, True), (1e-4, False)])
def test_projected_gradient_keeps_every_shared_step_non_negative(clip, hooks):
    # clip 1e-4 scales .grad (recovered from the norms); hooks=False takes the dense O(N d^2) route
    learners, gem = setup_three_steps()
    cur = ("audio", "text")
    # current data built to oppose step 1 (negated b side), so the constraints are violated
    step1 = gem.buffer.features().select(torch.nonzero(gem.buffer.features().step == 1).flatten())
    batch = PairedFeatures.from_arrays(step1.xb, -step1.xa, cur, 4)
    gem.before_step(StepInfo(4, "s4", cur, 14), batch)
    assert gem._mem["steps"] == [1, 2]          # step 3 (vision, depth) shares no learner: dropped
    feats = gem.buffer.features()
    g_mem = torch.stack([dense_memory_gradient(learners, feats.select(torch.nonzero(feats.step == s).flatten()), cur)
                         for s in (1, 2)])
    raw = one_update(learners, gem, batch, clip, hooks)
    g = torch.cat([raw[f"layers.{m}.{k}"].flatten() for m in cur for k in ("weight", "bias")]).double()
    g_tilde = flat_grads(learners, cur)
    assert gem._stats["projected"] == 1 and (g_mem @ g < 0).any()
    # the rank-one route gives the dense <g, g_k>
    torch.testing.assert_close(gem.last_dots, g_mem @ g, rtol=1e-5, atol=1e-9 * float((g_mem @ g).abs().max()))
    # the rank-one route gives the dense Gram matrix
    mg = gem.memory_gradients()
    torch.testing.assert_close(gem.memory_gram(mg), g_mem @ g_mem.T, rtol=1e-5, atol=1e-12)
    # constraints hold up to the ridge tolerance, and g~ - g = G^T v with v >= margin
    v = np.linalg.lstsq(g_mem.T.numpy(), (g_tilde - g).numpy(), rcond=None)[0]
    assert (v >= 0.5 - 1e-4).all()
    torch.testing.assert_close(g_mem.T @ torch.as_tensor(v), g_tilde - g, rtol=1e-4, atol=1e-6 * float(g_tilde.abs().max()))
    # KKT with the ridge: <g_k, g~> = -ridge v_k on active constraints, up to the rounding of
    # float32 products (the gradients' and GEM's, as in the reference codes): 1e-6 |g_k| |g~|
    rounding = 1e-6 * torch.linalg.vector_norm(g_mem, dim=1) * torch.linalg.vector_norm(g_tilde)
    assert (g_mem @ g_tilde >= -1e-3 * v.max() - rounding).all()
    assert (g_mem @ g_tilde).min() > (g_mem @ g).min()
    # learners of the memory outside the current pair got no gradient
    for m in ("video", "vision", "depth"):
        assert all(p.grad is None for p in learners[m].parameters())
    report = gem.report()
    # quadprog meets v >= margin to its rounding (0.49999999999999994 seen on an AMD EPYC machine)
    assert report["gem/projected_fraction"] == 1.0 and report["gem/multiplier_max"] >= 0.5 - 1e-12
    assert report["buffer/step_1"] == 8 and report["gem/constraints_per_update"] == 2
    assert -1.0 <= report["gem/min_cosine"] < 0


def test_nnls_route_gives_the_same_projected_gradient():
    grads = []
    for solver in ("quadprog", "nnls"):
        learners, gem = setup_three_steps(solver)
        step1 = gem.buffer.features().select(torch.nonzero(gem.buffer.features().step == 1).flatten())
        batch = PairedFeatures.from_arrays(step1.xb, -step1.xa, ("audio", "text"), 4)
        gem.before_step(StepInfo(4, "s4", ("audio", "text"), 14), batch)
        one_update(learners, gem, batch)
        grads.append(flat_grads(learners, ("audio", "text")))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-10)


def test_no_violation_leaves_the_gradient_bit_identical():
    learners, gem = setup_three_steps()
    feats = gem.buffer.features()
    step3 = feats.select(torch.nonzero(feats.step == 3).flatten())
    # the current batch is step 3's memory itself: g is a positive multiple of g_3
    batch = PairedFeatures.from_arrays(step3.xa, step3.xb, ("vision", "depth"), 4)
    gem.before_step(StepInfo(4, "s4", ("vision", "depth"), 14), batch)
    assert gem._mem["steps"] == [3]
    raw = one_update(learners, gem, batch)
    for n, p in learners.named_parameters():
        if n in raw:
            assert torch.equal(p.grad, raw[n]), n
    assert gem._stats["projected"] == 0 and gem._stats["constraints"] == 1


def test_a_step_sharing_no_learner_updates_exactly_as_vanilla():
    results = []
    for name in ("gem", "vanilla"):
        torch.manual_seed(0)
        learners = ModalityLearners(MODALITIES, D)
        strategy = get_strategy(name)
        strategy.setup(learners, Objective())
        for i, pair in enumerate([("text", "audio"), ("vision", "depth")], start=1):
            fit_step(learners, strategy, StepInfo(i, f"s{i}", pair, 10 + i), pairs(40, i, pair, i),
                     harness=HARNESS, epochs=2, batch_size=16)
        results.append(torch.cat([p.detach().flatten() for p in learners.parameters()]))
        if name == "gem":
            assert strategy.report()["gem/constraints_per_update"] == 0
    assert torch.equal(results[0], results[1])


class _EagerCosine(GEM):
    """GEM that also forms the Gram at every update: the step's minimum cosine by definition."""

    def before_step(self, step, data):
        super().before_step(step, data)
        self.eager_min, self.grams, self.updates_with_memory = float("inf"), 0, 0

    def _dots(self, *args):
        self._seen = super()._dots(*args)
        return self._seen

    def memory_gram(self, mg):
        self.grams += mg["gram"] is None
        return super().memory_gram(mg)

    def before_update(self, batch, out):
        mg = self._grads
        super().before_update(batch, out)
        if mg is not None and mg["factors"]:
            self.updates_with_memory += 1
            formed = self.grams
            dots, g_sq = self._seen
            norms = self.memory_gram(mg).diagonal().clamp_min(0).sqrt() * g_sq ** 0.5
            self.grams = formed      # count only the Grams GEM itself formed
            cosine = torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots))
            self.eager_min = min(self.eager_min, float(cosine.min()))


def test_the_gram_is_formed_only_where_the_step_needs_it():
    # Without a violation every cosine is >= 0, so once the step's minimum is negative the Gram only
    # matters at violated updates: the diagnostic is the one the Gram at every update gives.
    torch.manual_seed(0)
    learners = ModalityLearners(MODALITIES, D)
    gem = _EagerCosine(buffer_size=24)
    gem.setup(learners, Objective())
    seen = []
    first = pairs(160, 1, ("text", "audio"), 1)
    fit_step(learners, gem, StepInfo(1, "s1", ("text", "audio"), 11), first, harness=HARNESS, epochs=3, batch_size=16)
    memory = gem.buffer.features()
    # step 2 trains on the memory itself, in one batch: g = g_1 up to clipping, never a violation;
    # step 3 on step 1's pairs in batches of 16: some updates violate, most do not
    for i, data, batch in ((2, memory, len(memory)), (3, first, 16)):
        fit_step(learners, gem, StepInfo(i, f"s{i}", ("text", "audio"), 10 + i), data, harness=HARNESS,
                 epochs=8 if i == 2 else 3, batch_size=batch)
        report = gem.report()
        assert report["gem/min_cosine"] == gem.eager_min
        seen.append((report["gem/projected_fraction"], gem.eager_min, gem.grams, gem.updates_with_memory))
    # step 2 never projects: its minimum is >= 0 and needs the Gram at every update
    (frac2, min2, grams2, n2), (frac3, min3, grams3, n3) = seen
    assert frac2 == 0 and min2 >= 0 and grams2 == n2 > 0
    # step 3 projects at some updates: the Gram is formed at those and before the first
    assert 0 < frac3 < 1 and min3 < 0 and frac3 * n3 <= grams3 < n3
