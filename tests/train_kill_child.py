"""Child process of the training fault tests: ``cmcl train`` that SIGKILLs itself at a given point.

Run as a fresh interpreter: ``python -m tests.train_kill_child POINT -- CMCL-TRAIN-ARGS...``. POINT is
``mid-step:N`` (after the N-th update of the run), ``learners:N`` or ``strategy:N`` (the N-th step
checkpoint, after its learners or its strategy state were written into ``step-NN.tmp`` and before
the folder is renamed into place), or ``eval:N`` (inside the N-th evaluation of test splits).
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    from cmcl import pipeline
    from cmcl.data import runs as checkpoint
    from cmcl.train import trainer

    from tests.helpers import kill_point

    kind, hit = kill_point(point)

    def after(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            if hit():
                _die()
            return out
        return wrapped

    if kind == "mid-step":
        orig = trainer.iter_batches

        def iter_batches(*args, **kwargs):
            for rows in orig(*args, **kwargs):
                yield rows
                if hit():
                    _die()
        trainer.iter_batches = iter_batches
    elif kind == "learners":
        checkpoint.save_file = after(checkpoint.save_file)
    elif kind == "strategy":
        checkpoint.torch.save = after(checkpoint.torch.save)
    elif kind == "eval":
        orig_scorer = pipeline.step_scorer

        def step_scorer(plan):
            score = orig_scorer(plan)

            def killing_score(*args, **kwargs):
                if hit():
                    _die()
                return score(*args, **kwargs)
            return killing_score
        pipeline.step_scorer = step_scorer
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from cmcl.cli import cli

    cli(sys.argv[3:], prog_name="cmcl")
