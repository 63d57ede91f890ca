"""MNL: the confidence margin and dominance masks, the guidance term's stationary point, routing of
its gradient to the weak direction's learner only, the λ = μ = 0 control and the warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cmcl.train.strategies.mnl as mnl_module
from cmcl.train.config import Harness
from cmcl.train.objective import info_nce
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.strategies.mnl import guidance_masks, guided_loss
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

from tests.helpers import noisy_pairs, perturbed_learners

D, B = 6, 12
PAIR = ("text", "audio")


def batch(seed=0, n=B):
    return noisy_pairs(n, D, noise=0.8, pair=PAIR, step=1, seed=seed)


def make(**params):
    learners = perturbed_learners(["text", "audio", "video"], D, 0.5)
    s = get_strategy("mnl", **params)
    s.setup(learners, Objective())
    s.before_step(StepInfo(1, "toy", PAIR, 1), batch())
    return learners, s


def test_margin_competitor_and_masks_match_a_loop():
    s = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    a2b, b2a, q = guidance_masks(s)
    for i in range(9):
        fused = [(0.5 * (s[i, j] + s[j, i])).item() if j != i else -np.inf for j in range(9)]
        j = int(np.argmax(fused))
        assert int(q["j"][i]) == j
        xi_a, xi_b = s[i, i] - s[i, j], s[i, i] - s[j, i]
        pi_a = torch.softmax(s[i], 0)[i]
        pi_b = torch.softmax(s[:, i], 0)[i]
        assert float(q["xi_a"][i]) == pytest.approx(float(xi_a)) and float(q["pi_b"][i]) == pytest.approx(float(pi_b))
        # the target logit is shared: ξ^a - ξ^b = S_{j* i} - S_{i j*}
        assert float(q["xi_a"][i] - q["xi_b"][i]) == pytest.approx(float(s[j, i] - s[i, j]), abs=1e-12)
        assert bool(a2b[i]) == bool(xi_a > xi_b and pi_a > pi_b)
        assert bool(b2a[i]) == bool(xi_a <= xi_b and pi_a <= pi_b)
    assert not (a2b & b2a).any()
    assert (a2b | b2a).any() and not (a2b | b2a).all()   # this draw has mixed samples: no guidance


def test_guided_term_is_stationary_at_the_derived_optimum():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 5, dtype=torch.float64, generator=g), dim=1)
    mu, lam = 1 / 3, 0.7 / 3
    eye = torch.eye(5, dtype=torch.float64)
    q_star = (mu * eye + lam * p * (1 - eye)) / (mu + lam * (1 - p.diagonal()))[:, None]
    logits = torch.log(q_star).requires_grad_(True)
    guided_loss(logits, p, ce_weight=mu, weight=lam).sum().backward()
    assert float(logits.grad.abs().max()) < 1e-10
    base = float(guided_loss(logits.detach(), p, ce_weight=mu, weight=lam).sum())
    for _ in range(5):
        bumped = logits.detach() + 0.05 * torch.randn(5, 5, dtype=torch.float64, generator=g)
        assert float(guided_loss(bumped, p, ce_weight=mu, weight=lam).sum()) > base


@pytest.mark.parametrize("guide, weak, dominant", [("a2b", "audio", "text"), ("b2a", "text", "audio")])
def test_guidance_gradient_reaches_only_the_weak_learner(monkeypatch, guide, weak, dominant):
    def forced(s):
        ones = torch.ones(len(s), dtype=torch.bool)
        return (ones, ~ones, {}) if guide == "a2b" else (~ones, ones, {})

    monkeypatch.setattr(mnl_module, "guidance_masks", forced)
    learners, s = make()
    data = batch()
    out = learners.forward_pairs(data)
    s.losses(data, out)["mnl_loss"].backward()
    assert learners[weak].weight.grad.abs().sum() > 0 and learners[weak].bias.grad.abs().sum() > 0
    for p in learners[dominant].parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_per_sample_and_code_reductions_against_a_direct_computation():
    learners, s = make()
    data = batch()
    out = learners.forward_pairs(data)
    term = s.losses(data, out)["mnl_loss"]
    S = (out.u @ out.v.T).detach()
    a2b, b2a, _ = guidance_masks(S)
    logq_b = torch.log_softmax(S.T, dim=1)      # v_i over the u's
    logq_a = torch.log_softmax(S, dim=1)
    pa, pb = logq_a.exp(), logq_b.exp()
    total = 0.0
    for i in range(B):
        for guided, logq, p in ((a2b[i], logq_b, pa), (b2a[i], logq_a, pb)):
            if guided:
                total += -logq[i, i] / 3 - 0.7 / 3 * sum(p[i, j] * logq[i, j] for j in range(B) if j != i)
    torch.testing.assert_close(term.detach(), torch.as_tensor(total / B), atol=1e-5, rtol=1e-5)
    _, code = make(reduction="code", weight=0.7 / 3, ce_weight=1 / 3)
    torch.testing.assert_close(code.losses(data, out)["mnl_loss"] * B, term, atol=1e-6, rtol=1e-5)


def test_zero_weights_give_the_base_loss_bit_for_bit_and_permutation_invariance():
    learners, s = make(weight=0.0, ce_weight=0.0)
    data = batch()
    out = learners.forward_pairs(data)
    losses = s.losses(data, out)
    assert list(losses) == ["contrastive_loss"] and torch.equal(losses["contrastive_loss"], info_nce(out.u, out.v))
    learners, s = make(base="paper", weight=0.0, ce_weight=0.0)
    S = out.u @ out.v.T
    t = torch.arange(B)
    paper = F.cross_entropy(S, t) + F.cross_entropy(S.T, t) + F.cross_entropy(0.5 * (S + S.T), t)
    torch.testing.assert_close(s.losses(data, out)["contrastive_loss"], paper, atol=0, rtol=0)
    learners, s = make()
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(2))
    a = s.losses(data, learners.forward_pairs(data))["mnl_loss"]
    b = s.losses(data.select(perm), learners.forward_pairs(data.select(perm)))["mnl_loss"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_warmup_epochs_delay_the_guidance():
    learners, s = make(warmup_epochs=1)
    harness = Harness(lr=1e-2, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)
    result = fit_step(learners, s, StepInfo(1, "toy", PAIR, 1), batch(1, 30), harness=harness, epochs=2,
                      batch_size=8)
    frame = result.losses
    assert frame.loc[frame.epoch == 0, "mnl_loss"].isna().all()
    assert frame.loc[frame.epoch == 1, "mnl_loss"].notna().all()
    report = s.report()
    assert 0 <= report["mnl/guided_a2b"] <= 1 and report["mnl/guided_a2b"] + report["mnl/guided_b2a"] <= 1
