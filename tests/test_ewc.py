"""EWC: the closed-form in-batch Fisher against per-row autograd, F > 0, the penalty's zero at
theta* and quadratic growth, online accumulation, and parameter scope."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmcl.data.paired import PairedFeatures
from cmcl.errors import ConfigError
from cmcl.train.config import Harness
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import get_strategy
from cmcl.train.strategies.base import Objective
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo

D = 5
HARNESS = Harness(lr=5e-2, weight_decay=0.0, decay_bias=False, linear_decay=False, clip_norm=None)


def pairs(n, seed, pair, step=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    y = x @ rng.standard_normal((D, D)) + 0.5 * rng.standard_normal((n, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return PairedFeatures.from_arrays(x.astype(np.float32), y.astype(np.float32), pair, step)


def perturbed_learners(seed=0):
    torch.manual_seed(seed)
    learners = ModalityLearners(["text", "audio", "video"], D)
    with torch.no_grad():
        for p in learners.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return learners


def autograd_fisher(learners, data, batch, temperature, direction):
    """(1/N) sum_i w_i (grad l_i)^2 with one backward per row (float64 copies of the learners)."""
    a, b = data.single_pair
    params = {f"{m}.{k}": p.detach().double().clone().requires_grad_(True)
              for m in (a, b) for k, p in learners[m].named_parameters()}
    out = {k: torch.zeros_like(p) for k, p in params.items()}
    xa, xb = data.xa.double(), data.xb.double()
    n = len(data)
    for lo in range(0, n, batch):
        ra, rb = xa[lo:lo + batch], xb[lo:lo + batch]
        u = ra @ params[f"{a}.weight"].T + params[f"{a}.bias"]
        v = rb @ params[f"{b}.weight"].T + params[f"{b}.bias"]
        logits = u @ v.T / temperature
        directions = [logits] if direction == "a2b" else [logits, logits.T]
        for lg in directions:
            logp = F.log_softmax(lg, dim=1)
            for i in range(len(ra)):
                grads = torch.autograd.grad(-logp[i, i], list(params.values()), retain_graph=True,
                                            allow_unused=True)
                w = logp[i, i].exp().detach()
                for (k, _), g in zip(params.items(), grads):
                    if g is not None:
                        out[k] += w * g.square()
    return {k: v / n for k, v in out.items()}


@pytest.mark.parametrize("direction,temperature", [("a2b", 1.0), ("symmetric", 0.5)])
def test_closed_form_fisher_equals_per_row_autograd(direction, temperature):
    learners = perturbed_learners()
    ewc = get_strategy("ewc", fisher_batch=6)
    ewc.setup(learners, Objective(temperature, direction))
    data = pairs(16, 1, ("text", "audio"))         # batches of 6, 6 and a partial 4
    got = ewc.step_fisher(data)                    # no generator: rows in order
    want = autograd_fisher(learners, data, 6, temperature, direction)
    assert got.keys() == want.keys()
    scale = max(float(w.abs().max()) for w in want.values())
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-7 * scale)
    assert float(got["audio.bias"].abs().max()) == (0.0 if direction == "a2b" else pytest.approx(
        float(want["audio.bias"].abs().max())))


def test_fisher_is_positive_non_negative_and_only_on_trained_learners():
    learners = perturbed_learners()
    ewc = get_strategy("ewc")
    ewc.setup(learners, Objective())
    fit_step(learners, ewc, StepInfo(1, "s1", ("text", "audio"), 5), pairs(40, 1, ("text", "audio")),
             harness=HARNESS, epochs=1, batch_size=16)
    assert set(ewc.fisher) == {"text.weight", "text.bias", "audio.weight", "audio.bias"}
    for k, f in ewc.fisher.items():
        assert (f >= 0).all(), k
    assert float(ewc.fisher["text.weight"].min()) > 0       # the batch-of-one Fisher would be 0
    assert float(ewc.fisher["audio.weight"].max()) > 0
    report = ewc.report()
    assert report["ewc/fisher_norm"] > 0 and report["ewc/penalty_mean"] == 0.0
    for k in ewc.fisher:
        m, kind = k.split(".")
        assert torch.equal(ewc.star[k], getattr(learners[m], kind).detach())


def test_penalty_is_zero_at_theta_star_and_grows_quadratically():
    learners = perturbed_learners()
    ewc = get_strategy("ewc", lambda_ewc=0.5)
    ewc.setup(learners, Objective())
    fit_step(learners, ewc, StepInfo(1, "s1", ("text", "audio"), 5), pairs(40, 1, ("text", "audio")),
             harness=HARNESS, epochs=1, batch_size=16)
    learners.zero_grad(set_to_none=True)
    pen = ewc.penalty(("text", "audio"))
    pen.backward()
    assert float(pen.detach()) == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for m in ("text", "audio") for p in learners[m].parameters())
    learners.zero_grad(set_to_none=True)
    star = {m: [p.detach().clone() for p in learners[m].parameters()] for m in ("text", "audio")}
    torch.manual_seed(3)
    delta = {m: [torch.randn_like(p) for p in learners[m].parameters()] for m in ("text", "audio")}
    values = []
    for c in (1.0, 2.0, 3.0):
        with torch.no_grad():
            for m in delta:
                for p, s, dl in zip(learners[m].parameters(), star[m], delta[m]):
                    p.copy_(s + c * dl)
        learners.zero_grad(set_to_none=True)
        pen = ewc.penalty(("text", "audio"))
        pen.backward()
        values.append(float(pen.detach()))
        for m in delta:
            for (kind, p), dl in zip(learners[m].named_parameters(), delta[m]):
                want = 2 * 0.5 * ewc.fisher[f"{m}.{kind}"] * (p.detach() - star[m][0 if kind == "weight" else 1])
                torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-12)
    assert values[0] > 0
    want = 0.5 * sum(float((ewc.fisher[f"{m}.{kind}"] * dl.square()).sum())
                     for m in delta for kind, dl in zip(("weight", "bias"), delta[m]))
    assert values[0] == pytest.approx(want, rel=1e-5)      # lambda * sum F (theta - theta*)^2, no 1/2
    assert values[1] == pytest.approx(4 * values[0], rel=1e-5)
    assert values[2] == pytest.approx(9 * values[0], rel=1e-5)
    # the penalty is part of the training loss, over the batch's learners only
    batch = pairs(8, 9, ("text", "audio"), 2)
    learners.zero_grad(set_to_none=True)
    losses = ewc.losses(batch, learners.forward_pairs(batch))
    assert float(losses["ewc_loss"].detach()) == pytest.approx(values[2], rel=1e-6)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in learners["video"].parameters())


def test_online_accumulation_sums_decayed_fishers():
    learners = perturbed_learners()
    ewc = get_strategy("ewc", gamma_ewc=0.7)
    ewc.setup(learners, Objective())
    fit_step(learners, ewc, StepInfo(1, "s1", ("text", "audio"), 5), pairs(40, 1, ("text", "audio")),
             harness=HARNESS, epochs=1, batch_size=16)
    first = {k: f.clone() for k, f in ewc.fisher.items()}
    data2 = pairs(30, 2, ("video", "text"), 2)
    step2 = StepInfo(2, "s2", ("video", "text"), 6)
    fit_step(learners, ewc, step2, data2, harness=HARNESS, epochs=1, batch_size=16)
    second = ewc.step_fisher(data2, torch.Generator().manual_seed(step2.seed))
    assert set(ewc.fisher) == set(first) | set(second)
    for k, f in ewc.fisher.items():
        want = 0.7 * first.get(k, torch.zeros_like(f)) + second.get(k, torch.zeros_like(f))
        torch.testing.assert_close(f, want, rtol=1e-6, atol=0.0)
    assert ewc.report()["ewc/penalty_mean"] > 0       # step 2 moved the shared text learner


def test_fisher_batch_of_one_is_refused():
    with pytest.raises(ConfigError, match=r"strategy 'ewc': fisher_batch must be >= 2 .*got 1"):
        get_strategy("ewc", fisher_batch=1)


def test_training_loss_gradient_equals_the_loss_form():
    learners = perturbed_learners()
    ewc = get_strategy("ewc", lambda_ewc=50.0)
    ewc.setup(learners, Objective())
    fit_step(learners, ewc, StepInfo(1, "s1", ("text", "audio"), 5), pairs(40, 1, ("text", "audio")),
             harness=HARNESS, epochs=1, batch_size=16)
    ewc.before_step(StepInfo(2, "s2", ("audio", "text"), 6), pairs(8, 2, ("audio", "text"), 2))
    with torch.no_grad():
        for p in learners.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = pairs(8, 3, ("audio", "text"), 2)
    learners.zero_grad(set_to_none=True)
    losses = ewc.losses(batch, learners.forward_pairs(batch))      # fast path: penalty in the GEMM
    sum(losses.values()).backward()
    fast = {n: p.grad.clone() for n, p in learners.named_parameters() if p.grad is not None}
    learners.zero_grad(set_to_none=True)
    out = learners.forward_pairs(batch)
    plain = ewc.objective(out.u, out.v) + ewc.penalty(("audio", "text"))
    torch.testing.assert_close(sum(losses.values()).detach(), plain.detach(), rtol=1e-6, atol=0.0)
    assert float(losses["ewc_loss"].detach()) > 1e-3 * float(plain.detach())
    plain.backward()
    assert set(fast) == {n for n, p in learners.named_parameters() if p.grad is not None}
    for n, p in learners.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast[n], p.grad, rtol=1e-5, atol=1e-8)
