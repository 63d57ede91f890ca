"""CPU time per update of strategies at d = 1024 on one 10,000-pair step (rough, one thread).

A six-step history of 300 random unit pairs per step shares learners with the timed step
(audio, video) the way the paper's step 7 does, so buffers, memories and Fishers are populated;
the timed step runs one epoch of batch 64 under the paper harness. The strategy's ``after_step``
(Fisher pass, buffer fill) is timed separately.

    python benchmarks/strategy_step_time.py vanilla,ewc,der,derpp,gem [dim] [rows]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmcl.data.paired import PairedFeatures  # noqa: E402
from cmcl.train.config import Harness  # noqa: E402
from cmcl.train.learners import ModalityLearners  # noqa: E402
from cmcl.train.strategies import get_strategy  # noqa: E402
from cmcl.train.strategies.base import Objective  # noqa: E402
from cmcl.train.trainer import fit_step  # noqa: E402
from cmcl.types import StepInfo  # noqa: E402

HISTORY = [("text", "video"), ("text", "audio"), ("vision", "depth"), ("text", "audio"), ("text", "audio"),
           ("text", "video")]
HARNESS = Harness(lr=1e-4, weight_decay=1e-3, decay_bias=True, linear_decay=False, clip_norm=None)


def unit_pairs(n: int, dim: int, seed: int, pair: tuple[str, str], step: int) -> PairedFeatures:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x + torch.randn(n, dim, generator=g)
    return PairedFeatures.from_arrays(x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True), pair, step)


def time_strategy(name: str, dim: int, big: PairedFeatures) -> tuple[float, float, int]:
    torch.manual_seed(0)
    learners = ModalityLearners(["text", "audio", "video", "vision", "depth"], dim)
    strategy = get_strategy(name)
    strategy.setup(learners, Objective())
    for i, pair in enumerate(HISTORY, start=1):
        fit_step(learners, strategy, StepInfo(i, f"s{i}", pair, i), unit_pairs(300, dim, i, pair, i),
                 harness=HARNESS, epochs=1, batch_size=64)
    after, spent = strategy.after_step, {}

    def timed_after(step, data):
        t = time.process_time()
        after(step, data)
        spent["after"] = time.process_time() - t

    strategy.after_step = timed_after
    t = time.process_time()
    result = fit_step(learners, strategy, StepInfo(7, "big", ("audio", "video"), 7), big, harness=HARNESS,
                      epochs=1, batch_size=64)
    loop = time.process_time() - t - spent["after"]
    return loop / result.updates, spent["after"], result.updates


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["vanilla", "ewc", "der", "derpp", "gem"]
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    big = unit_pairs(rows, dim, 99, ("audio", "video"), 7)
    for name in names:
        per, after, updates = time_strategy(name, dim, big)
        print(f"{name:8s} {per * 1e3:7.2f} ms/update (CPU time, {updates} updates)  after_step {after:.3f} s",
              flush=True)


if __name__ == "__main__":
    main()
