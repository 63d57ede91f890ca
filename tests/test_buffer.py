"""Replay buffer: reservoir and step-balanced policies, sampling and state round trips."""

from __future__ import annotations

import numpy as np
import torch

from cmcl.data.paired import PairedFeatures
from cmcl.train.strategies.buffer import ReplayBuffer


def rows(n, step, pair=("text", "audio"), start=0):
    x = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 4)
    return PairedFeatures.from_arrays(x, -x, pair, step, ids=np.array([f"{step}-{i}" for i in range(start, start + n)]))


def test_reservoir_matches_the_sequential_algorithm():
    buf = ReplayBuffer(5, extras={"score": ()})
    g = torch.Generator().manual_seed(3)
    ref_g = torch.Generator().manual_seed(3)
    ref: list[int] = []
    offers = 0
    for b in range(6):
        batch = rows(4, 1, start=4 * b)
        buf.add_reservoir(batch, g, {"score": batch.xa[:, 0] * 10})
        for i in range(4):
            item = 4 * b + i
            if len(ref) < 5:
                ref.append(item)
            else:
                r = int(torch.randint(0, offers + 1, (1,), generator=ref_g))
                if r < 5:
                    ref[r] = item
            offers += 1
    assert buf.offers == 24 and len(buf) == 5
    assert buf.features().xa[:, 0].tolist() == [float(i) for i in ref]
    assert torch.equal(buf.extras["score"], buf.features().xa[:, 0] * 10)


def test_reservoir_keeps_each_offer_with_probability_m_over_n():
    counts = np.zeros(200)
    for seed in range(300):
        buf = ReplayBuffer(20)
        g = torch.Generator().manual_seed(seed)
        for b in range(10):
            buf.add_reservoir(rows(20, 1, start=20 * b), g)
        kept = buf.features().xa[:, 0].long().numpy()
        assert len(set(kept.tolist())) == 20 and buf.offers == 200    # 20 distinct offers, none twice
        counts[kept] += 1
    # each of the 200 offers is kept with probability 20/200 = 0.1: 300 trials give each a
    # Binomial(300, 0.1) count (mean 30, sd 5.2); a mean over 20 offers has sd 1.16.
    blocks = counts.reshape(10, 20).mean(axis=1)                       # offers 0-19, 20-39, ... 180-199
    assert (np.abs(blocks - 30) < 5).all(), blocks                     # > 4 sd: early and late offers alike
    assert counts.min() > 10 and counts.max() < 55, (counts.min(), counts.max())   # no offer ignored or pinned


def test_step_balanced_fill():
    buf = ReplayBuffer(12)
    g = torch.Generator().manual_seed(0)
    buf.fill_balanced(rows(50, 1), 1, g)
    assert buf.composition() == {1: 12}
    first = set(buf.features().ids.tolist())
    buf.fill_balanced(rows(30, 2, pair=("vision", "depth")), 2, g)
    assert buf.composition() == {1: 6, 2: 6}
    assert set(buf.features().ids[buf.features().step.numpy() == 1].tolist()) <= first
    buf.fill_balanced(rows(3, 3), 3, g)
    assert buf.composition() == {1: 4, 2: 4, 3: 3}   # a step smaller than its share gives all it has
    feats = buf.features()
    assert set(feats.ma[feats.step.numpy() == 2]) == {"vision"}


def test_sample_and_state_round_trip():
    buf = ReplayBuffer(8, extras={"score": ()})
    g = torch.Generator().manual_seed(1)
    batch = rows(6, 2)
    buf.add_reservoir(batch, g, {"score": torch.arange(6.0)})
    sample, extras = buf.sample(4, torch.Generator().manual_seed(5))
    assert len(sample) == 4 and torch.equal(extras["score"], sample.xa[:, 0])
    other = ReplayBuffer(8, extras={"score": ()})
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.features().xa, buf.features().xa) and other.offers == 6
    s2, e2 = other.sample(4, torch.Generator().manual_seed(5))
    assert torch.equal(s2.xa, sample.xa) and list(s2.ma) == list(sample.ma)
    empty = ReplayBuffer(3)
    empty.load_state_dict(ReplayBuffer(3).state_dict())
    assert empty.is_empty
