"""The training path runs where its learners are: no tensor depends on torch's default device.

No GPU is available to these tests, so the check is indirect: a run on the CPU is repeated with
torch's default device set to ``meta`` (tensors without data). Any tensor the path creates without
naming its device then lands on ``meta`` and the run fails (mixed devices, or a value read from a
tensor without data), which is what the same code would do on a GPU with a CPU-made tensor. The
learners and features are on the CPU, so the run itself trains for real and must give the same
numbers as without the trap.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmcl.data import runs as ckpt
from cmcl.data.paired import PairedFeatures, iter_batches
from cmcl.pipeline import train_one
from cmcl.train import trainer
from cmcl.train.config import TrainConfig
from cmcl.train.learners import ModalityLearners
from cmcl.train.strategies import resolve_params
from cmcl.train.strategies.projection import projector_from_covariance


@contextlib.contextmanager
def default_device(device: str):
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def run(cache, protocol, root, strategy, params):
    cfg = TrainConfig(features=str(cache), backbone="synthetic", strategy=strategy,
                      params={**resolve_params(strategy, {}, "synthetic"), **params}, label=strategy,
                      protocol=str(protocol), epochs=1, device="cpu")
    path = train_one(cfg, root)
    last = ckpt.finished_steps(path)[-1]
    return load_file(str(ckpt.step_dir(path, last) / "learners.safetensors")), ckpt.read_eval(path)


@pytest.mark.parametrize("strategy,params", [("vanilla", {}), ("dns", {}),
                                             ("dns", {"energy_in": 0.9, "energy_out": 0.99})])
def test_a_run_does_not_depend_on_the_default_device(tiny_cache, short_protocol, tmp_path, strategy, params):
    weights, rows = run(tiny_cache, short_protocol, tmp_path / "plain", strategy, params)
    with default_device("meta"):
        trapped_weights, trapped_rows = run(tiny_cache, short_protocol, tmp_path / "trapped", strategy, params)
    assert all(v.device.type == "cpu" for v in trapped_weights.values())
    assert weights.keys() == trapped_weights.keys()
    assert all(torch.equal(weights[k], trapped_weights[k]) for k in weights)
    np.testing.assert_array_equal(rows["value"].to_numpy(), trapped_rows["value"].to_numpy())


def test_the_trap_catches_a_tensor_made_on_the_default_device():
    """The check above can fail: the energy rule's threshold, made without a device (as it was),
    does not meet a CPU covariance under a ``meta`` default device; made on the covariance's
    device, it does."""
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.standard_normal((50, 6)), dtype=torch.float64)
    cov = x.T @ x / 50
    expected = projector_from_covariance(cov, energy=0.9).rank
    with default_device("meta"):
        assert projector_from_covariance(cov, energy=0.9).rank == expected
        with pytest.raises((RuntimeError, NotImplementedError)):
            cdf = torch.cumsum(torch.linalg.eigvalsh(cov).flip(0), 0)
            int(torch.searchsorted(cdf / cdf[-1], torch.tensor(0.9, dtype=torch.float64)))


def test_learners_and_batches_are_made_on_the_devices_named():
    with default_device("meta"):
        learners = ModalityLearners(["text", "audio"], 4, device="cpu")
        pairs = PairedFeatures.from_arrays(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32),
                                           ("text", "audio"), 1)
        rows = next(iter_batches(4, 2, torch.Generator().manual_seed(0)))
        batch = pairs.select(rows)
    assert {p.device.type for p in learners.parameters()} == {"cpu"}
    assert torch.equal(learners["text"].weight, torch.eye(4))
    assert {t.device.type for t in (pairs.xa, pairs.xb, pairs.step, pairs.labels, rows, batch.xa)} == {"cpu"}


def test_step_times_wait_for_the_gpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    trainer.synchronize(torch.device("cpu"))
    assert calls == []
    trainer.synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]
