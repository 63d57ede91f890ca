"""PNR: the masks of both terms in closed form, vanilla at step 1, gradient scope, permutation invariance."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cmcl.train.config import Harness
from cmcl.train.objective import info_nce
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

from tests.helpers import noisy_pairs, perturbed_learners

D, B = 6, 10
PAIR = ("text", "audio")
ADAM = Harness(lr=1e-2, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)


def batch(seed=0, n=B):
    return noisy_pairs(n, D, noise=0.7, pair=PAIR, step=2, seed=seed)


def setup(step_index=2, objective=None, **params):
    learners = perturbed_learners(["text", "audio", "video"], D, 0.2)
    pnr = get_strategy("pnr", **params)
    pnr.setup(learners, objective or Objective())
    pnr.before_step(StepInfo(step_index, "toy", PAIR, 7), batch())
    return learners, pnr


def cos_matrix(x, y):
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    return x @ y.T


def test_first_step_is_vanilla_bit_for_bit():
    learners, pnr = setup(step_index=1)
    data = batch()
    out = learners.forward_pairs(data)
    losses = pnr.losses(data, out)
    assert list(losses) == ["contrastive_loss"]
    assert torch.equal(losses["contrastive_loss"], info_nce(out.u, out.v))


def test_closed_forms_at_step_start_pin_every_mask():
    # learners == old copies: the old partner duplicates the positive (+ln 2), and in the
    # regulariser z̄_j = z_j doubles every in-modality negative while the positive has cosine 1.
    learners, pnr = setup()
    data = batch()
    out = learners.forward_pairs(data)
    losses = pnr.losses(data, out)
    van = info_nce(out.u, out.v)
    torch.testing.assert_close(losses["contrastive_loss"], van + math.log(2), atol=1e-6, rtol=0)
    tau = 0.2
    eye = torch.eye(B, dtype=torch.bool)
    ells = []
    for z in (out.u, out.v):
        c = (cos_matrix(z, z) / tau).masked_fill(eye, float("-inf"))
        ells.append(-1 / tau + torch.log(2 * torch.exp(c).sum(dim=1)))
    want = 0.5 * (ells[0].mean() + ells[1].mean())
    torch.testing.assert_close(losses["pnr_reg_loss"], want, atol=1e-5, rtol=1e-6)


def test_old_partner_masked_and_pooled_modalities_closed_forms():
    learners, pnr = setup(old_partner_negative=False, reg_pool_modalities=True, reg_weight=0.5)
    data = batch()
    out = learners.forward_pairs(data)
    losses = pnr.losses(data, out)
    s = out.u @ out.v.T
    eye = torch.eye(B, dtype=torch.bool)
    # row i: Σ_j e^{S_ij} + Σ_{j≠i} e^{S_ij}
    main = (-s.diagonal() + torch.log(torch.exp(s).sum(1) + torch.exp(s).masked_fill(eye, 0).sum(1))).mean()
    torch.testing.assert_close(losses["contrastive_loss"], main, atol=1e-6, rtol=1e-6)
    tau = 0.2
    ells = []
    for z, other in ((out.u, out.v), (out.v, out.u)):
        same = torch.exp(cos_matrix(z, z) / tau).masked_fill(eye, 0).sum(1)
        cross = torch.exp(cos_matrix(z, other) / tau).sum(1)          # pooled: the partner's j = i too
        ells.append(-1 / tau + torch.log(2 * same + 2 * cross))
    torch.testing.assert_close(losses["pnr_reg_loss"], 0.5 * 0.5 * (ells[0].mean() + ells[1].mean()),
                               atol=1e-5, rtol=1e-6)


def test_equals_vanilla_without_pseudo_negatives_and_regulariser():
    learners, pnr = setup(pseudo_negatives=False, reg_weight=0.0)
    data = batch()
    out = learners.forward_pairs(data)
    losses = pnr.losses(data, out)
    assert list(losses) == ["contrastive_loss"]
    assert torch.equal(losses["contrastive_loss"], info_nce(out.u, out.v))


def test_pseudo_negatives_only_add_mass_and_symmetric_averages_directions():
    learners, pnr = setup(old_partner_negative=False)
    with torch.no_grad():   # move the current learners away from the frozen copies
        for p in learners.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for seed in range(5):
        data = batch(seed)
        out = learners.forward_pairs(data)
        assert pnr.losses(data, out)["contrastive_loss"] > info_nce(out.u, out.v)
    learners, pnr = setup(objective=Objective(direction="symmetric"))
    data = batch()
    out = learners.forward_pairs(data)
    torch.testing.assert_close(pnr.losses(data, out)["contrastive_loss"],
                               info_nce(out.u, out.v, direction="symmetric") + math.log(2), atol=1e-6, rtol=0)


def test_gradient_scope_old_learners_frozen_current_get_both_terms():
    learners, pnr = setup()
    data = batch()
    out = learners.forward_pairs(data)
    losses = pnr.losses(data, out)
    losses["pnr_reg_loss"].backward(retain_graph=True)
    for m in PAIR:
        assert learners[m].weight.grad.abs().sum() > 0          # the regulariser alone reaches a and b
        assert all(p.grad is None and not p.requires_grad for p in pnr._old[m].parameters())
    learners.zero_grad(set_to_none=True)
    losses["contrastive_loss"].backward()
    assert all(learners[m].weight.grad.abs().sum() > 0 for m in PAIR)
    fit_step(learners, pnr, StepInfo(2, "toy", PAIR, 7), batch(3, 40), harness=ADAM, epochs=1, batch_size=10)
    assert learners["video"].weight.grad is None
    assert pnr._old == {}   # the copies are dropped after the step


def test_old_copies_do_not_move_during_a_step():
    learners, pnr = setup()
    seen = {}
    original = pnr.after_update

    def spy(b, out):
        original(b, out)
        for m in PAIR:
            seen.setdefault(m, [p.detach().clone() for p in pnr._old[m].parameters()])
            assert all(torch.equal(p, q) for p, q in zip(pnr._old[m].parameters(), seen[m]))
            assert not torch.equal(pnr._old[m].weight, learners[m].weight)

    pnr.after_update = spy
    fit_step(learners, pnr, StepInfo(2, "toy", PAIR, 7), batch(3, 40), harness=ADAM, epochs=2, batch_size=10)
    assert seen


def test_batch_permutation_invariance():
    learners, pnr = setup()
    data = batch()
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1))
    a = pnr.losses(data, learners.forward_pairs(data))
    b = pnr.losses(data.select(perm), learners.forward_pairs(data.select(perm)))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("predictor", ["linear", "mlp"])
def test_predictor_is_trained_carried_and_checkpointed(predictor):
    learners, pnr = setup(predictor=predictor, predictor_hidden=16, predictor_lr=1e-2)
    before = {k: v.clone() for k, v in pnr.predictors["text"].state_dict().items()}
    data = batch(3, 40)
    fit_step(learners, pnr, StepInfo(2, "toy", PAIR, 7), data, harness=ADAM, epochs=1, batch_size=10)
    after = pnr.predictors["text"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    buf = io.BytesIO()
    torch.save(pnr.state_dict(), buf)
    buf.seek(0)
    other = get_strategy("pnr", predictor=predictor, predictor_hidden=16)
    other.setup(learners, Objective())
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, D)
    for m in PAIR:
        pnr.predictors[m].eval(), other.predictors[m].eval()
        torch.testing.assert_close(pnr.predictors[m](x), other.predictors[m](x), atol=0, rtol=0)
    if predictor == "linear":   # identity at creation: the first batch's loss is the no-predictor one
        l2, p2 = setup(predictor="linear")
        l1, p1 = setup()
        out1, out2 = l1.forward_pairs(data), l2.forward_pairs(data)
        torch.testing.assert_close(p1.losses(data, out1)["pnr_reg_loss"], p2.losses(data, out2)["pnr_reg_loss"])
