"""The trained space, used: open a run, embed with its learners, export them, index and search.

``cmcl.open_run(RUN_DIR)`` gives a :class:`Run`; ``run.embed("text", x)`` maps embeddings of the
frozen encoder through the run's learner of that modality (``step=`` picks a finished step,
default the last). :func:`export_run` writes the learners of one step as a plain safetensors file
plus ``adapter.json``, usable with torch and safetensors alone; :func:`build_index` and
:func:`search_index` run retrieval in the adapted space with FAISS (``cmcl index build/search``).

This is application code (like :mod:`cmcl.pipeline`): it reads run folders through
:mod:`cmcl.data.runs`, features through :mod:`cmcl.data.features` and searches with
:mod:`cmcl.evaluate.index`.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from cmcl import __version__
from cmcl.data import locks
from cmcl.data import runs as run_files
from cmcl.data.features import open_split
from cmcl.errors import ConfigError, IndexFileError, RunError

Array = TypeVar("Array", np.ndarray, torch.Tensor)


class Run:
    """A run folder opened for use (read-only). Made by :func:`open_run`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise RunError(f"{self.path}: not a run folder (no config.json)")
        self._header = run_files.read_json(self.path / "config.json")
        self.steps = [i for i in run_files.finished_steps(self.path) if i >= 1]
        self._weights: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved training configuration (``config.json``'s ``config``)."""
        return dict(self._header["config"])

    @property
    def protocol_steps(self) -> list[str]:
        """The protocol's steps (``dataset:a-b``), in order."""
        return list(self._header["protocol"]["steps"])

    @cached_property
    def modalities(self) -> tuple[str, ...]:
        """Every modality the run's protocol trains, in order of first use."""
        return tuple(dict.fromkeys(m for key in self.protocol_steps for m in key.rsplit(":", 1)[1].split("-")))

    @property
    def last_step(self) -> int:
        """The last finished step (0 when no step finished: every learner is the identity)."""
        return self.steps[-1] if self.steps else 0

    @cached_property
    def dim(self) -> int:
        """Embedding width D of the learners."""
        w = self.weights(self.last_step) if self.steps else {}
        return next((int(v.shape[1]) for k, v in w.items() if k.endswith(".weight")), 0)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """Every finished step's evaluation rows, long format with run columns (as ``results.csv``)."""
        frame = run_files.read_eval(self.path)
        cfg = self.config
        frame.insert(0, "seed", cfg["seed"])
        frame.insert(0, "strategy", cfg.get("label") or cfg["strategy"])
        frame.insert(0, "backbone", cfg["backbone"])
        frame.insert(0, "run", str(self.path))
        return frame

    def _step(self, step: int | None) -> int:
        if step is None:
            return self.last_step
        if step != 0 and step not in self.steps:
            raise RunError(f"{self.path}: step {step} is not a finished step (finished: {self.steps or 'none'})")
        return int(step)

    def weights(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """``{"<modality>.weight": (D, D), "<modality>.bias": (D,)}`` of one step (float32, CPU).

        A modality the run had not trained by that step (one a grown protocol added later) is the
        identity, as the learners are created.
        """
        step = self._step(step)
        if step not in self._weights:
            state = {}
            if step >= 1:
                path = run_files.step_dir(self.path, step) / "learners.safetensors"
                try:
                    raw = load_file(str(path))
                except (OSError, RuntimeError, ValueError) as exc:
                    raise RunError(f"{path}: cannot read learners ({exc})") from None
                state = {k.removeprefix("layers."): v.float() for k, v in raw.items()}
            dim = next((v.shape[1] for k, v in state.items() if k.endswith(".weight")), None)
            for m in self.modalities:
                if f"{m}.weight" not in state and dim is not None:
                    state[f"{m}.weight"] = torch.eye(dim)
                    state[f"{m}.bias"] = torch.zeros(dim)
            self._weights[step] = state
        return self._weights[step]

    def embed(self, modality: str, x: Array, step: int | None = None) -> Array:
        """Map frozen-encoder embeddings ``x`` ((N, D) or (D,)) through the learner of ``modality``.

        Numpy in, float32 numpy out; a torch tensor in, a tensor of its dtype on its device out.
        ``step`` picks a finished step (default: the last; 0: before training, the identity).
        """
        if modality not in self.modalities:
            raise ConfigError(f"{self.path}: modality {modality!r} is not in the run "
                              f"(it has {', '.join(self.modalities)})")
        step = self._step(step)
        is_torch = isinstance(x, torch.Tensor)
        t = x.detach() if is_torch else torch.as_tensor(np.asarray(x, dtype=np.float32))
        if step == 0:
            out = t.clone()
        else:
            w = self.weights(step)
            weight, bias = w[f"{modality}.weight"], w[f"{modality}.bias"]
            if t.shape[-1] != weight.shape[1]:
                raise ConfigError(f"{self.path}: inputs have dim {t.shape[-1]}, the run's learners {weight.shape[1]}")
            dtype = t.dtype if t.is_floating_point() else torch.float32
            out = torch.nn.functional.linear(t.to(dtype), weight.to(t.device, dtype), bias.to(t.device, dtype))
        return out if is_torch else out.numpy().astype(np.float32, copy=False)

    def learners_sha256(self, step: int | None = None) -> str:
        """Content hash of a step's learners file ("" for step 0): identifies the adapted space."""
        step = self._step(step)
        if step == 0:
            return ""
        return hashlib.sha256((run_files.step_dir(self.path, step) / "learners.safetensors").read_bytes()).hexdigest()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps {self.last_step}/{len(self.protocol_steps)})"


def open_run(path: str | os.PathLike) -> Run:
    """Open a run folder (``RUNS/<backbone>/<label>/seed-<seed>``) for embedding, export and search."""
    return Run(path)


# ------------------------------------------------------------------------------------------ export
def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> Path:
    """Write ``out/learners.safetensors`` (``<modality>.weight``, ``<modality>.bias``) and ``out/adapter.json``.

    Apply without cmcl: ``z = x @ W.T + b`` with ``W, b`` the modality's tensors.
    """
    run = open_run(run_dir)
    step = run._step(step)
    if step == 0:
        raise RunError(f"{run.path}: no finished training step to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in run.weights(step).items()}
    rows = run.metrics[run.metrics["trained_through"] == step]
    cfg = run.config
    adapter = {
        "format": "cmcl.adapter/1", "modalities": list(run.modalities), "dim": int(run.dim),
        "backbone": cfg["backbone"], "step": step, "steps": run.protocol_steps[:step],
        "protocol": {"name": cfg["protocol"], "sha256": cfg["protocol_sha256"], "steps": run.protocol_steps},
        "strategy": cfg.get("label") or cfg["strategy"], "seed": cfg["seed"], "run": str(run.path),
        "learners_sha256": run.learners_sha256(step),
        "metrics": json.loads(rows[run_files.EVAL_COLUMNS[1:]].to_json(orient="records")),
        "cmcl_version": __version__,
        "apply": "z = x @ weight.T + bias, with weight = tensors['<modality>.weight'], bias = tensors['<modality>.bias']",
    }
    with locks.exclusive(out, "export folder"):
        save_file(weights, str(out / "learners.safetensors.tmp"), metadata={"format": "cmcl.adapter/1"})
        os.replace(out / "learners.safetensors.tmp", out / "learners.safetensors")
        run_files.write_json(out / "adapter.json", adapter)
    return out


# ------------------------------------------------------------------------------------------- index
def _split_vectors(run: Run, features: str | os.PathLike, dataset: str, split: str, modality: str,
                   step: int) -> tuple[np.ndarray, np.ndarray]:
    """A split's rows of ``modality`` through the run's learner: (adapted vectors, ids)."""
    if modality not in run.modalities:
        raise ConfigError(f"{run.path}: modality {modality!r} is not in the run (it has {', '.join(run.modalities)})")
    feats = open_split(features, run.config["backbone"], dataset, split, modalities=[modality])
    x = feats.emb[modality]
    if run.dim and x.shape[1] != run.dim:
        raise ConfigError(f"{feats.where}: /emb/{modality} has dim {x.shape[1]}, the run's learners {run.dim}")
    return run.embed(modality, x, step=step), feats.ids


def build_index(run_dir: str | os.PathLike, features: str | os.PathLike, dataset: str, split: str, modality: str,
                out: str | os.PathLike, *, kind: str = "flat", step: int | None = None, nlist: int | None = None,
                hnsw_m: int = 32) -> Path:
    """Index a split's ``modality`` rows in the run's adapted space (``cmcl index build``)."""
    from cmcl.evaluate import index as faiss_index

    run = open_run(run_dir)
    step = run._step(step)
    vectors, ids = _split_vectors(run, features, dataset, split, modality, step)
    idx = faiss_index.build(vectors, ids, kind=kind, nlist=nlist, hnsw_m=hnsw_m)
    meta = {"format": "cmcl.index/1", "kind": kind, "run": str(run.path.resolve()), "step": step,
            "learners_sha256": run.learners_sha256(step), "backbone": run.config["backbone"],
            "features": str(features), "dataset": dataset, "split": split, "modality": modality,
            "cmcl_version": __version__}
    out = Path(out)
    with locks.exclusive(out, "index folder"):
        return faiss_index.save(out, idx, ids, meta)


def search_index(index_dir: str | os.PathLike, run_dir: str | os.PathLike, features: str | os.PathLike,
                 dataset: str, split: str, modality: str, *, k: int = 10) -> pd.DataFrame:
    """Query an index with a split's ``modality`` rows through the same run (``cmcl index search``).

    The queries go through the step the index was built with; an index built from another run (or
    another step's learners) is refused.
    """
    from cmcl.evaluate import index as faiss_index

    idx = faiss_index.load(Path(index_dir))
    run = open_run(run_dir)
    step = int(idx.meta.get("step", -1))
    if step not in run.steps and step != 0:
        raise IndexFileError(f"{index_dir}: built from step {step} of {idx.meta.get('run')}, which {run.path} "
                             f"does not have; build the index with this run")
    if idx.meta.get("learners_sha256") != run.learners_sha256(step):
        raise IndexFileError(f"{index_dir}: built from another run ({idx.meta.get('run')}, step {step}); "
                             f"its learners differ from {run.path}'s")
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    queries, ids = _split_vectors(run, features, dataset, split, modality, step)
    if queries.shape[1] != idx.dim:
        raise IndexFileError(f"{index_dir}: index dim {idx.dim}, queries {queries.shape[1]}")
    return faiss_index.search(idx, queries, ids, k)


def write_hits(hits: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write search hits as CSV atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run_files.write_csv(out, hits)
    return out
