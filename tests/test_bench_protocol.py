"""The protocol benchmark's schedules, at a tiny size in a fresh interpreter.

``benchmarks/bench_protocol.py`` runs each strategy in its own spawned process and lets the runs
take turns step by step, so that no strategy trains while another does: in one order at every step
(``--schedule interleaved``) or in an order that reverses at every step (``alternating``, the
default). The step folders' files show the order in which the runs wrote them.
"""

from __future__ import annotations

import json

from tests.helpers import run_process


def _run(tmp_path, *schedule: str):
    r = run_process(["benchmarks/bench_protocol.py", "--out", str(tmp_path), "--dim", "64", "--scale", "0.02",
                     "--epochs", "1", "--strategies", "dns,vanilla", *schedule], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {name: tmp_path / "runs" / "synthetic" / name / "seed-0" for name in ("dns", "vanilla")}
    for name, run in runs.items():
        assert f"{name}: " in r.stdout and "peak RSS" in r.stdout
        assert json.loads((run / "summary.json").read_text())
    return r, runs


def _written(runs, order):
    return [(runs[name] / f"step-{k:02d}" / "metrics.json").stat().st_mtime_ns for k, name in order]


def test_runs_take_turns_step_by_step(tmp_path):
    r, runs = _run(tmp_path, "--schedule", "interleaved")
    assert "schedule interleaved" in r.stdout
    # Each run's step k is written after the other run's step k-1 and before its step k+1.
    written = _written(runs, [(k, name) for k in range(1, 12) for name in ("dns", "vanilla")])
    assert written == sorted(written)


def test_the_default_order_of_turns_reverses_at_every_step(tmp_path):
    r, runs = _run(tmp_path)
    assert "schedule alternating" in r.stdout
    order = [(k, name) for k in range(1, 12) for name in (("dns", "vanilla") if k % 2 else ("vanilla", "dns"))]
    written = _written(runs, order)
    assert written == sorted(written)
    # and not the interleaved order: vanilla's step 2 comes before dns's step 2
    assert _written(runs, [(2, "vanilla")]) < _written(runs, [(2, "dns")])
