"""Shared fixtures: a tiny synthetic feature cache and a short protocol."""

from __future__ import annotations

import os

# One intra-op thread for the tests and every child process they start (set before torch loads):
# the tests' matrices are tiny, and on a 2-core machine a second thread per process only spins.
# Children inherit it, so a killed-and-resumed child computes exactly as the test process does.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random  # noqa: E402
from pathlib import Path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cmcl.extract.synthetic import SyntheticConfig, write_synthetic  # noqa: E402

TINY = SyntheticConfig(dim=64, scale=0.02, seed=0)

SHORT_PROTOCOL = """
name = "short"
[datasets]
esc50 = { metrics = ["recall", "acc"] }
clotho = { metrics = ["recall"] }
vggsound_s = { metrics = ["recall", "acc"] }

[[step]]
dataset = "esc50"
modalities = ["text", "audio"]

[[step]]
dataset = "clotho"
modalities = ["text", "audio"]

[[step]]
dataset = "vggsound_s"
modalities = ["audio", "video"]
"""


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Seed the global torch, numpy and random generators before every test.

    Tests should draw from their own seeded generators; this makes any draw from a global one
    (``torch.randn``, ``np.random.rand``) repeat the same numbers whatever the test order.
    """
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """The seven synthetic datasets at dim 64 and 2% of the paper's sizes (read-only: do not modify)."""
    root = tmp_path_factory.mktemp("features")
    write_synthetic(root, TINY)
    return root


@pytest.fixture()
def short_protocol(tmp_path) -> Path:
    """A 3-step protocol over esc50, clotho and vggsound_s (sharing text and audio learners)."""
    path = tmp_path / "short.toml"
    path.write_text(SHORT_PROTOCOL)
    return path
