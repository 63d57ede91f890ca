"""Where a run's scoring time goes: replay its per-step scoring from its checkpoints under cProfile.

The scorer is driven as training drives it (step 0, then each step with the step's pair as the
changed modalities), over the run's own feature cache and checkpoints:

    python benchmarks/bench_protocol.py --out /tmp/bench-proto --dim 1024 --strategies dns,vanilla
    python benchmarks/profile_scoring.py /tmp/bench-proto/runs/synthetic/dns/seed-0
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

from cmcl.data import runs as run_files
from cmcl.data.paired import StepData
from cmcl.data.protocol import load_protocol
from cmcl.evaluate.evaluator import EvalSettings, Scorer
from cmcl.pipeline import embedder
from cmcl.train.learners import ModalityLearners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run folder (with every step's learners)")
    ap.add_argument("--top", type=int, default=15, help="rows of the profile to print")
    args = ap.parse_args()
    cfg = run_files.read_json(args.run / "config.json")["config"]
    protocol = load_protocol(cfg["protocol"])
    data = StepData(cfg["features"], cfg["backbone"], protocol)
    scorer = Scorer(data.test_sets(), EvalSettings(cfg["recall_protocol"], cfg["pool_size"], cfg["pool_count"],
                                                   cfg["eval_seed"]))
    scorer(embedder(ModalityLearners(protocol.modalities, data.dim)), 0)
    steps = []
    for i, step in enumerate(protocol.steps, start=1):
        learners = ModalityLearners(protocol.modalities, data.dim)
        run_files.load_learners(run_files.step_dir(args.run, i) / "learners.safetensors", learners,
                                absent_ok=set(protocol.modalities))
        steps.append((i, learners, set(step.modalities)))
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    for i, learners, changed in steps:
        scorer(embedder(learners), i, changed=changed)
    profile.disable()
    print(f"scoring after steps 1-{len(steps)}: {time.perf_counter() - t0:.1f} s under the profiler "
          f"({scorer.computed - len(scorer.test_sets)} splits re-scored, {scorer.reused} reused)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
