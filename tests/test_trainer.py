"""Trainer: hook order, parameter scope, checkpoints, resume and determinism."""

from __future__ import annotations

import json
import numpy as np
import pandas as pd
import pytest
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.errors import RunError
from cmcl.data import runs as ckpt
from cmcl.train.config import Harness, TrainConfig
from cmcl.train.learners import ModalityLearners
from cmcl.train.objective import info_nce
from cmcl.train.strategies import resolve_params
from cmcl.train.strategies.base import Objective, Strategy
from cmcl.pipeline import train_one
from cmcl.train.trainer import fit_step
from cmcl.types import StepInfo


class Recorder(Strategy):
    """Records every hook call."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def setup(self, learners, objective):
        super().setup(learners, objective)
        self.calls.append("setup")

    def before_step(self, step, data):
        self.calls.append("before_step")

    def training_set(self, step, data):
        self.calls.append("training_set")
        return data

    def losses(self, batch, out):
        self.calls.append("losses")
        return super().losses(batch, out)

    def compute_gradients(self, closure):
        self.calls.append("compute_gradients")
        result = closure()
        assert all(p.grad is not None for p in self.learners["text"].parameters())
        return result

    def before_update(self, batch, out):
        self.calls.append("before_update")
        self._w = self.learners["text"].weight.detach().clone()

    def after_update(self, batch, out):
        self.calls.append("after_update")
        assert not torch.equal(self._w, self.learners["text"].weight)  # the optimizer stepped in between

    def after_step(self, step, data):
        self.calls.append("after_step")


def toy_data(n=40, d=8, seed=0, pair=("text", "audio")):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    return PairedFeatures.from_arrays(x / np.linalg.norm(x, axis=1, keepdims=True),
                                      y / np.linalg.norm(y, axis=1, keepdims=True), pair, 1)


ADAM = Harness(lr=1e-2, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)


def test_hooks_fire_in_order_and_all_are_reachable():
    learners = ModalityLearners(["text", "audio"], 8)
    rec = Recorder()
    rec.setup(learners, Objective())
    fit_step(learners, rec, StepInfo(1, "toy", ("text", "audio"), 0), toy_data(), harness=ADAM, epochs=2,
             batch_size=16)
    per_batch = ["compute_gradients", "losses", "before_update", "after_update"]
    assert rec.calls == ["setup", "before_step", "training_set", *per_batch * 6, "after_step"]


class ClipWitness(Strategy):
    """Checks that ``out.grad_scale`` is the factor the trainer's clipping applied."""

    name = "clipwitness"

    def __init__(self) -> None:
        self.scales: list[float] = []

    def compute_gradients(self, closure):
        losses, out = closure()
        self.raw = [p.grad.clone() for p in self.learners.parameters() if p.grad is not None]
        return losses, out

    def before_update(self, batch, out):
        grads = [p.grad for p in self.learners.parameters() if p.grad is not None]
        for g, r in zip(grads, self.raw):
            torch.testing.assert_close(g, r * out.grad_scale, rtol=1e-5, atol=1e-8)
        self.scales.append(out.grad_scale)


@pytest.mark.parametrize("clip, clipped", [(1e-3, True), (None, False)])
def test_grad_scale_reports_the_clipping_factor(clip, clipped):
    learners = ModalityLearners(["text", "audio"], 8)
    s = ClipWitness()
    s.setup(learners, Objective())
    h = Harness(lr=1e-2, weight_decay=0.0, decay_bias=True, linear_decay=False, clip_norm=clip)
    fit_step(learners, s, StepInfo(1, "toy", ("text", "audio"), 0), toy_data(), harness=h, epochs=1, batch_size=16)
    assert len(s.scales) == 3
    assert all(x < 1.0 for x in s.scales) if clipped else all(x == 1.0 for x in s.scales)


def test_loss_matches_hand_computation_and_b_bias_gets_no_gradient():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    v = torch.tensor([[0.5, 0.5], [0.0, 1.0], [2.0, 0.0]])
    s = (u @ v.T).numpy()
    want = np.mean([-(s[i, i] - np.log(np.exp(s[i]).sum())) for i in range(3)])
    assert float(info_nce(u, v)) == pytest.approx(want, rel=1e-6)
    sym = 0.5 * (want + np.mean([-(s[i, i] - np.log(np.exp(s[:, i]).sum())) for i in range(3)]))
    assert float(info_nce(u, v, direction="symmetric")) == pytest.approx(sym, rel=1e-6)
    learners = ModalityLearners(["text", "audio"], 8)
    batch = toy_data()
    out = learners.forward_pairs(batch)
    info_nce(out.u, out.v).backward()
    assert torch.allclose(learners["audio"].bias.grad, torch.zeros(8), atol=1e-7)
    assert learners["text"].bias.grad.abs().sum() > 0


def test_identity_init_and_mixed_batches_use_each_rows_learners():
    learners = ModalityLearners(["text", "audio", "video"], 6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen)
    assert torch.equal(learners("text", x), x)
    with torch.no_grad():
        for p in learners.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    a = toy_data(n=6, d=6, pair=("text", "audio"))
    b = toy_data(n=4, d=6, seed=3, pair=("video", "text"))
    mixed = PairedFeatures.concat([a, b])
    out = learners.forward_pairs(mixed)
    torch.testing.assert_close(out.u[:6], learners("text", a.xa))
    torch.testing.assert_close(out.u[6:], learners("video", b.xa))
    torch.testing.assert_close(out.v[6:], learners("text", b.xb))


def test_extra_rows_share_the_batchs_product_and_get_their_outputs_and_gradients():
    learners = ModalityLearners(["text", "audio", "video"], 6)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in learners.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    mixed = PairedFeatures.concat([toy_data(n=6, d=6, pair=("text", "audio")),
                                   toy_data(n=4, d=6, seed=3, pair=("video", "text"))])
    extra = {"text": torch.randn(3, 6, generator=gen), "video": torch.randn(2, 6, generator=gen),
             "audio": torch.randn(4, 6, generator=gen)}
    calls = []
    real = learners._linear
    learners._linear = lambda m, x, *rest: calls.append((m, len(x))) or real(m, x, *rest)
    out = learners.forward_pairs(mixed, extra)
    # text's extra rows ride with its first product (side a's six rows), not a product of their own
    assert sorted(calls) == [("audio", 6 + 4), ("text", 4), ("text", 6 + 3), ("video", 4 + 2)]
    assert set(extra) == {"text", "video", "audio"} and set(out.extra) == set(extra)
    loss = sum((out.u * out.v).sum() + y.pow(2).sum() for y in out.extra.values())
    loss.backward()
    fused = {n: p.grad.clone() for n, p in learners.named_parameters()}
    learners.zero_grad(set_to_none=True)
    plain = learners.forward_pairs(mixed)
    assert plain.extra == {}
    separate = {m: learners(m, x) for m, x in extra.items()}
    for m in extra:
        torch.testing.assert_close(out.extra[m], separate[m])
    torch.testing.assert_close(out.u, plain.u)
    (sum((plain.u * plain.v).sum() + y.pow(2).sum() for y in separate.values())).backward()
    for n, p in learners.named_parameters():
        torch.testing.assert_close(fused[n], p.grad)


def config(cache, protocol, strategy="dns", seed=0, **kw):
    return TrainConfig(features=str(cache), backbone="synthetic", strategy=strategy,
                       params=resolve_params(strategy, {}, "synthetic"), label=strategy, seed=seed,
                       protocol=str(protocol), epochs=2, **kw)


def final_state(run):
    from safetensors.torch import load_file

    last = ckpt.finished_steps(run)[-1]
    return load_file(str(ckpt.step_dir(run, last) / "learners.safetensors")), pd.read_csv(run / "results.csv")


def test_run_layout_and_same_seed_gives_identical_numbers(tiny_cache, short_protocol, tmp_path):
    a = train_one(config(tiny_cache, short_protocol), tmp_path / "a")
    b = train_one(config(tiny_cache, short_protocol), tmp_path / "b")
    assert ckpt.finished_steps(a) == [0, 1, 2, 3]
    for i in (1, 2, 3):
        assert (ckpt.step_dir(a, i) / "eval.csv").is_file() and (ckpt.step_dir(a, i) / "losses.csv").is_file()
    assert (ckpt.step_dir(a, 3) / "strategy.pt").is_file() and not (ckpt.step_dir(a, 2) / "strategy.pt").exists()
    header = json.loads((a / "config.json").read_text())
    assert header["config"]["params"]["lambda_min"] == 1e-3 and header["protocol"]["steps"][0] == "esc50:text-audio"
    metrics = json.loads((ckpt.step_dir(a, 2) / "metrics.json").read_text())
    assert metrics["report"]["dns/rank_in/text"] > 0
    wa, ra = final_state(a)
    wb, rb = final_state(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    np.testing.assert_array_equal(ra["value"].to_numpy(), rb["value"].to_numpy())
    c = train_one(config(tiny_cache, short_protocol, seed=1), tmp_path / "c")
    assert not torch.equal(final_state(c)[0]["layers.text.weight"], wa["layers.text.weight"])


def test_resume_with_a_different_config_is_refused(tiny_cache, short_protocol, tmp_path):
    run = train_one(config(tiny_cache, short_protocol, "vanilla"), tmp_path)
    with pytest.raises(RunError, match="already exists"):
        train_one(config(tiny_cache, short_protocol, "vanilla"), tmp_path)
    with pytest.raises(RunError, match="differs in epochs"):
        cfg = TrainConfig(**{**config(tiny_cache, short_protocol, "vanilla").to_dict(), "epochs": 3})
        train_one(cfg, tmp_path, resume=True)
    before = (run / "results.csv").read_bytes()
    train_one(config(tiny_cache, short_protocol, "vanilla"), tmp_path, resume=True)  # complete: nothing to do
    assert (run / "results.csv").read_bytes() == before
