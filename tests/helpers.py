"""Small builders shared by the tests: random pairs, and child processes that cannot outlive a test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmcl.data.paired import PairedFeatures


def random_pairs(n: int, d: int, seed: int, pair: tuple[str, str], step: int = 0, *, coupling: float = 0.5,
                 labels: np.ndarray | None = None) -> PairedFeatures:
    """Unit-norm pairs whose b side is a noisy linear map of the a side (so they can be aligned)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal((d, d)) * coupling + rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return PairedFeatures.from_arrays(x.astype(np.float32), y.astype(np.float32), pair, step, labels=labels)


REPO = Path(__file__).resolve().parents[1]


def kill_point(point: str) -> tuple[str, Any]:
    """``"kind:N"`` of the kill children: the kind, and ``hit()``, true on its N-th call (N = 1 when absent)."""
    kind, _, nth = point.partition(":")
    nth = int(nth or 1)
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == nth
    return kind, hit


@contextlib.contextmanager
def process_group(args: list[str], *, env: dict | None = None, cwd: str | Path | None = None,
                  **popen: Any) -> Iterator[subprocess.Popen]:
    """``python ARGS...`` as a fresh interpreter in its own process group, killed with the block.

    A fresh interpreter (never a fork of the test process, whose torch thread pool may be running),
    and its whole group SIGKILLed on the way out whatever happens: no child or grandchild
    (DataLoader or sweep workers, say) outlives the test.
    """
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, *args], env=full_env, cwd=cwd or REPO, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_process(args: list[str], *, timeout: float = 120, env: dict | None = None,
                cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python ARGS...`` in its own process group (:func:`process_group`) to completion; a hang
    becomes ``subprocess.TimeoutExpired`` after ``timeout``."""
    with process_group(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def noisy_pairs(n: int, d: int, *, noise: float, pair: tuple[str, str], step: int, seed: int = 0) -> PairedFeatures:
    """Unit-norm pairs whose b side is the a side plus Gaussian noise of scale ``noise`` (before normalising)."""
    rng = np.random.default_rng(seed)
    xa = rng.standard_normal((n, d))
    xb = xa + noise * rng.standard_normal((n, d))
    xa /= np.linalg.norm(xa, axis=1, keepdims=True)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    return PairedFeatures.from_arrays(xa.astype(np.float32), xb.astype(np.float32), pair, step)


def perturbed_learners(modalities: list[str], d: int, scale: float, dtype: torch.dtype = torch.float32):
    """Learners moved off the identity by ``scale`` x N(0, 1) (seeded), so gradients are generic."""
    from cmcl.train.learners import ModalityLearners

    torch.manual_seed(0)
    learners = ModalityLearners(modalities, d).to(dtype)
    with torch.no_grad():
        for p in learners.parameters():
            p.add_(scale * torch.randn_like(p))
    return learners
