"""C-Flat: the closed form on a quadratic, its limits, four backward passes, parameters restored."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners, PairOutput
from cmcl.train.strategies import co2l, get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

D = 3


def quadratic_setup(rho, lambda_cf, seed=0):
    """A C-Flat strategy whose closure is J(θ) = ½ θᵀHθ over the text learner (θ = [vec W; b])."""
    torch.manual_seed(seed)
    learners = ModalityLearners(["text", "audio"], D).double()
    with torch.no_grad():
        for p in learners["text"].parameters():
            p.copy_(torch.randn_like(p))
    a = torch.randn(D * D + D, D * D + D, dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(D * D + D, dtype=torch.float64)
    strategy = get_strategy("cflat", rho=rho, lambda_cf=lambda_cf)
    strategy.setup(learners, Objective())
    calls = []

    def theta():
        layer = learners["text"]
        return torch.cat([layer.weight.flatten(), layer.bias])

    def closure():
        learners.zero_grad(set_to_none=True)
        t = theta()
        j = 0.5 * t @ h @ t
        j.backward()
        calls.append(t.detach().clone())
        return {"q_loss": j}, PairOutput(t, t)

    def grad():
        layer = learners["text"]
        return torch.cat([layer.weight.grad.flatten(), layer.bias.grad])

    return strategy, learners, h, theta, closure, grad, calls


def unit(x):
    return x / x.norm()


@pytest.mark.parametrize("rho,lambda_cf", [(0.2, 0.2), (0.5, 1.0), (0.3, 0.0)])
def test_closed_form_on_a_quadratic(rho, lambda_cf):
    strategy, learners, h, theta, closure, grad, calls = quadratic_setup(rho, lambda_cf)
    t0 = theta().detach().clone()
    losses, _ = strategy.compute_gradients(closure)
    g0 = h @ t0
    ghat0 = unit(g0)
    t1 = t0 + rho * unit(h @ ghat0)
    ghat2 = unit(h @ t1)
    expected = h @ t0 + rho * h @ ghat0 + lambda_cf * rho * h @ ghat2
    torch.testing.assert_close(grad(), expected, rtol=1e-6, atol=1e-9)
    if lambda_cf == 0:   # plain SAM
        torch.testing.assert_close(grad(), h @ (t0 + rho * ghat0), rtol=1e-6, atol=1e-9)
    # the evaluation points: θ, θ + ρĝ0, θ', θ' + ρĝ2; the returned loss is the one at θ
    assert len(calls) == 4
    torch.testing.assert_close(calls[1], t0 + rho * ghat0)
    torch.testing.assert_close(calls[2], t1)
    torch.testing.assert_close(calls[3], t1 + rho * ghat2)
    torch.testing.assert_close(losses["q_loss"], 0.5 * t0 @ h @ t0)
    # θ restored exactly, the learner outside the closure untouched
    assert torch.equal(theta(), t0)
    assert all(p.grad is None for p in learners["audio"].parameters())


def test_rho_zero_gives_the_plain_gradient():
    strategy, _, _, theta, closure, grad, _ = quadratic_setup(0.0, 0.2)
    t0 = theta().detach().clone()
    closure()
    plain = grad().clone()
    strategy.compute_gradients(closure)
    assert torch.equal(grad(), plain)
    assert torch.equal(theta(), t0)


def pairs(n, seed, pair, step, d=8, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal((d, d)) * 0.5 + rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    data = PairedFeatures.from_arrays(x.astype(np.float32), y.astype(np.float32), pair, step)
    return dataclasses.replace(data, xa=torch.as_tensor(x, dtype=dtype), xb=torch.as_tensor(y, dtype=dtype))


def test_four_backward_passes_per_update_and_parameters_restored(monkeypatch):
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio", "vision", "depth", "video"], 8)
    strategy = get_strategy("cflat", buffer_size=8)
    strategy.setup(learners, Objective())
    frozen = Harness(lr=0.0, weight_decay=0.0, decay_bias=True, linear_decay=False, clip_norm=1.0)
    moving = Harness(lr=1e-2, weight_decay=1e-2, decay_bias=False, linear_decay=True, clip_norm=1.0)
    backward, teacher_calls, target_calls = [], [], []
    losses = strategy.losses

    def counting(batch, out):
        out.u.register_hook(lambda g: backward.append(1))
        return losses(batch, out)

    strategy.losses = counting
    res = fit_step(learners, strategy, StepInfo(1, "A", ("vision", "depth"), 1), pairs(40, 1, ("vision", "depth"), 1),
                   harness=moving, epochs=1, batch_size=16)
    assert len(backward) == 4 * res.updates == 12
    # step 2 (with IRD) at lr 0: every perturbation undone; the teacher's targets built once per
    # update (they do not depend on θ) and the teacher's outputs once per step
    real_targets = co2l.relation_targets
    monkeypatch.setattr(co2l, "relation_targets", lambda *a: (target_calls.append(1), real_targets(*a))[1])
    real_forward = ModalityLearners.forward_pairs
    monkeypatch.setattr(ModalityLearners, "forward_pairs",
                        lambda self, batch, *extra: (teacher_calls.append(1) if self is strategy.teacher else None,
                                                     real_forward(self, batch, *extra))[1])
    before = [p.detach().clone() for p in learners.parameters()]
    backward.clear()
    res = fit_step(learners, strategy, StepInfo(2, "B", ("text", "audio"), 2), pairs(40, 2, ("text", "audio"), 2),
                   harness=frozen, epochs=1, batch_size=16)
    assert len(backward) == 4 * res.updates and len(target_calls) == res.updates and len(teacher_calls) == 1
    assert all(torch.equal(p, q) for p, q in zip(learners.parameters(), before))
    report = strategy.report()
    assert report["cflat/e0_norm"] == pytest.approx(0.2, rel=1e-4)
    assert report["cflat/e2_norm"] == pytest.approx(0.2, rel=1e-4)
    assert report["cflat/flat_norm"] > 0 and report["cflat/ird_loss"] > 0
    assert report["cflat/outputs_route"] == 1.0     # every update went through the outputs route


MIXED = [("text", "audio"), ("audio", "video"), ("video", "text")]   # buffered rows on either side
HARNESS = Harness(lr=1e-2, weight_decay=1e-2, decay_bias=False, linear_decay=True, clip_norm=1.0)


def test_the_outputs_route_is_the_closure_route_in_exact_arithmetic():
    # float64 throughout: at every update of three steps of mixed batches, g_cf by the outputs route
    # equals the four-closure loop's from the same θ up to float64 rounding
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio", "video", "vision"], 8).double()
    strategy = get_strategy("cflat", buffer_size=16)
    strategy.setup(learners, Objective())
    compute, seen = strategy.compute_gradients, []

    def both(closure):
        strategy.route = "closure"
        compute(closure)
        ref = {n: p.grad.clone() for n, p in learners.named_parameters() if p.grad is not None}
        strategy.route = "outputs"
        result = compute(closure)
        got = {n: p.grad for n, p in learners.named_parameters() if p.grad is not None}
        assert got.keys() == ref.keys() and "layers.vision.weight" not in got
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
        seen.append(sorted({n.split(".")[1] for n in got}))
        return result

    strategy.compute_gradients = both
    for i, pair in enumerate(MIXED, start=1):
        fit_step(learners, strategy, StepInfo(i, f"s{i}", pair, i), pairs(48, i, pair, i, dtype=torch.float64),
                 harness=HARNESS, epochs=2, batch_size=16)
    # the last step's batches mix the buffered pairs' learners with the current ones
    assert ["audio", "text", "video"] in seen
    assert strategy.report()["cflat/outputs_route"] == 0.5     # one call of each route per update


class _Penalised(get_strategy("cflat").__class__):
    """C-Flat with a term on the weights themselves: its gradient does not come from the outputs."""

    def losses(self, batch, out):
        losses = super().losses(batch, out)
        losses["weight_loss"] = 0.5 * self.learners["text"].weight.square().sum()
        return losses


def test_a_gradient_not_from_the_outputs_takes_the_closure_route():
    runs = {}
    for route in ("outputs", "closure"):
        torch.manual_seed(0)
        learners = ModalityLearners(["text", "audio", "video"], 8)
        strategy = _Penalised(buffer_size=16, route=route)
        strategy.setup(learners, Objective())
        for i, pair in enumerate(MIXED[:2], start=1):
            fit_step(learners, strategy, StepInfo(i, f"s{i}", pair, i), pairs(48, i, pair, i), harness=HARNESS,
                     epochs=2, batch_size=16)
        runs[route] = ([p.detach().clone() for p in learners.parameters()], strategy.report())
    (outputs, report), (closure, _) = runs["outputs"], runs["closure"]
    assert all(torch.equal(p, q) for p, q in zip(outputs, closure))   # the same loop, bit for bit
    assert report["cflat/outputs_route"] == 0.0
