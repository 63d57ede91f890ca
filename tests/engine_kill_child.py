"""Child process of the extraction kill tests: an extraction that dies (``os._exit``) at a given point.

Run as a fresh interpreter (``python -m tests.engine_kill_child POINT ROOT OUT [WORKERS]``), never forked
from the test process, whose torch thread pool may be running (a fork then deadlocks in the first matmul).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np

from cmcl.extract import engine, parts
from cmcl.extract.encoders.filehash import FileHashEncoder
from cmcl.extract.engine import extract

RUN = dict(batch_size=4, commit_every=8, progress=False)

def killed_run(point: str, root: str, out: str, workers: int = 0) -> None:
    """Child process: extraction that dies (``os._exit``, no cleanup) at ``point``."""
    from tests.helpers import kill_point

    kind, hit = kill_point(point)

    if kind == "encode":  # mid-batch: the second modality of a batch is never embedded
        orig = FileHashEncoder.encode_batch

        def encode_batch(self, m, b):
            if m == "audio" and hit():
                os._exit(9)
            return orig(self, m, b)
        FileHashEncoder.encode_batch = encode_batch
    elif kind == "part-write":  # mid-write of a part file: a torn temporary file is left
        def savez(fh, **arrays):
            if hit():
                fh.write(b"PK\x03\x04 torn")
                fh.flush()
                os._exit(9)
            return orig_savez(fh, **arrays)
        orig_savez = np.savez
        parts.np.savez = savez
    elif kind == "after-part":  # right after a part was committed
        orig_write = parts.write_part

        def write_part(*a, **k):
            orig_write(*a, **k)
            if hit():
                os._exit(9)
        parts.write_part = write_part
    elif kind == "assemble":  # mid-write of the HDF5 shard itself
        orig_append = engine.FeatureWriter.append

        def append(self, *a, **k):
            orig_append(self, *a, **k)
            if hit():
                self._h5.flush()
                os._exit(9)
        engine.FeatureWriter.append = append
    elif kind == "after-rename":  # the shard is in place but the parts are not cleaned up
        def rmtree(path, *a, **k):
            if str(path).endswith(".h5.parts"):
                os._exit(9)
            return orig_rmtree(path, *a, **k)
        orig_rmtree = shutil.rmtree
        engine.shutil.rmtree = rmtree
    extract(FileHashEncoder(), "clotho", "train", root, out, workers=workers, **RUN)
    os._exit(0)



if __name__ == "__main__":
    killed_run(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0)
