"""The protocol benchmark's interleaved schedule, at a tiny size in a fresh interpreter.

``benchmarks/bench_protocol.py`` runs each strategy in its own spawned process and lets the runs
take turns step by step, so that no strategy trains while another does. The step folders' files
show the order in which the runs wrote them.
"""

from __future__ import annotations

import json

from tests.helpers import run_process


def test_runs_take_turns_step_by_step(tmp_path):
    r = run_process(["benchmarks/bench_protocol.py", "--out", str(tmp_path), "--dim", "64", "--scale", "0.02",
                     "--epochs", "1", "--strategies", "dns,vanilla"], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "schedule interleaved" in r.stdout
    runs = {name: tmp_path / "runs" / "synthetic" / name / "seed-0" for name in ("dns", "vanilla")}
    for name, run in runs.items():
        assert f"{name}: " in r.stdout and "peak RSS" in r.stdout
        assert json.loads((run / "summary.json").read_text())
    # Each run's step k is written after the other run's step k-1 and before its step k+1.
    written = [(runs[name] / f"step-{k:02d}" / "metrics.json").stat().st_mtime_ns
               for k in range(1, 12) for name in ("dns", "vanilla")]
    assert written == sorted(written)
