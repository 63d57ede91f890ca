"""The profiling scripts of ``benchmarks/`` at a tiny size, in a fresh interpreter: every phase of a
run is timed, and each as many times as the protocol makes it happen; the micro-benchmarks time
every case they name."""

from __future__ import annotations

import re

from tests.helpers import run_process


def test_the_phases_of_a_run_are_each_timed_as_often_as_they_happen(tiny_cache):
    r = run_process(["benchmarks/profile_run_phases.py", str(tiny_cache), "--strategy", "vanilla"], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    counted = {m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"^  (.+?)\s+[\d.]+ s\s+(\d+) calls$",
                                                                          r.stdout, re.MULTILINE)}
    # paper11: one validation, 11 steps (each loads, fits, writes), 12 scorings (step 0 too), one summary
    assert counted == {"validate (plan_run)": 1, "load a step's train split": 11, "fit a step": 11,
                       "score": 12, "write a step folder": 12, "write the summary": 1}, r.stdout
    total = float(re.search(r"([\d.]+) s for train_one", r.stdout).group(1))
    rest = float(re.search(r"the rest\s+(-?[\d.]+) s", r.stdout).group(1))
    assert 0 <= rest < total, r.stdout


def test_a_missing_cache_is_one_line_and_status_2(tmp_path):
    for script in ("profile_run_phases.py", "profile_dns_steps.py"):
        r = run_process([f"benchmarks/{script}", str(tmp_path / "nothing")], timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith(script[:-3] + ": ") and "no such feature file" in lines[0]


def test_the_thread_pool_benchmark_times_a_torch_product_after_each_kind():
    r = run_process(["benchmarks/bench_thread_pools.py", "--rows", "12", "--dim", "16", "--batch", "8",
                     "--rounds", "8", "--block", "2"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    after = dict(re.findall(r"^  (numpy|torch) product of 12 x 16 \(A Aᵀ\):\s+[\d.]+ ms;  then torch's 8 x 16 "
                            r"by 16 x 16:\s+([\d.]+) ms$", r.stdout, re.MULTILINE))
    assert set(after) == {"numpy", "torch"}, r.stdout
    assert re.search(r"^a turn from numpy to torch costs torch's product [+-][\d.]+ ms \([\d.]+x\)$", r.stdout,
                     re.MULTILINE), r.stdout


def test_the_micro_benchmark_of_dns_inputs_times_every_route():
    r = run_process(["benchmarks/bench_dns_inputs.py", "--micro", "--rows", "300", "--dim", "16", "--rank", "3"],
                    timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    routes = re.findall(r"^(.+?)\s+median [\d.]+ ms per update; paired extra over plain: median -?[\d.]+ ms$",
                        r.stdout, re.MULTILINE)
    assert routes == ["plain", "per batch", "x (I-P) rows", "x U rows"], r.stdout


def test_the_replay_floor_benchmark_prints_the_floor_beside_the_measured_ratio():
    r = run_process(["benchmarks/bench_replay_floor.py", "--dim", "64", "--pairs", "256", "--history", "256",
                     "--blocks", "3", "--reps", "3"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 blocks" in r.stdout.splitlines()[0], r.stdout
    lines = dict(re.findall(r"^(\S.*?\S)\s+median (-?[\d.]+)(?: ms)? \(-?[\d.]+--?[\d.]+\)$", r.stdout, re.MULTILINE))
    assert list(lines) == ["vanilla update", "derpp update", "one learner, 64 rows", "one learner, 192 rows",
                           "derpp / vanilla", "floor 1 + 2 (t192 - t64) / vanilla", "derpp own work per update"], r.stdout
    assert float(lines["derpp update"]) > 0 and float(lines["vanilla update"]) > 0


def test_the_replay_floor_benchmark_needs_a_block_to_keep():
    r = run_process(["benchmarks/bench_replay_floor.py", "--blocks", "1"], timeout=120)
    assert r.returncode == 2 and "--blocks must be at least 2" in r.stderr, r.stderr[-2000:]
