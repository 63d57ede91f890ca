"""Paired features: what the trainer batches and strategies see.

A :class:`PairedFeatures` holds rows ``(x_a, x_b)`` with, per row, the names of the two modalities
and the step the pair came from, so replay buffers can mix pairs of different modalities in one
batch (the learners group rows by modality, :meth:`cmcl.train.learners.ModalityLearners.forward_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from cmcl.data.features import SplitFeatures, check_files, open_split, split_files, where_of
from cmcl.data.protocol import Protocol, ProtocolStep
from cmcl.errors import ProtocolError


@dataclass
class PairedFeatures:
    """Rows of paired embeddings.

    Attributes:
        xa, xb: (N, D) float32 tensors (anchor side ``a`` and other side ``b``).
        ma, mb: (N,) modality names per row (numpy ``str`` arrays).
        step: (N,) int64 tensor, the 1-based step each row comes from.
        labels: (N,) int64 tensor of class indices (-1 when unlabelled).
        ids: (N,) numpy array of sample ids.
    """

    xa: torch.Tensor
    xb: torch.Tensor
    ma: np.ndarray
    mb: np.ndarray
    step: torch.Tensor
    labels: torch.Tensor
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.xa.shape[0])

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return int(self.xa.shape[1])

    @classmethod
    def from_arrays(cls, xa: np.ndarray | torch.Tensor, xb: np.ndarray | torch.Tensor,
                    modalities: tuple[str, str], step: int, labels: np.ndarray | None = None,
                    ids: np.ndarray | None = None, device: torch.device | str = "cpu") -> "PairedFeatures":
        """Build a single-pair set from two (N, D) arrays, on ``device`` (whatever torch's default device)."""
        xa = torch.as_tensor(xa, dtype=torch.float32, device=device)
        xb = torch.as_tensor(xb, dtype=torch.float32, device=device)
        n = xa.shape[0]
        if xb.shape != xa.shape:
            raise ValueError(f"paired arrays differ in shape: {tuple(xa.shape)} vs {tuple(xb.shape)}")
        return cls(
            xa=xa, xb=xb,
            ma=np.full(n, modalities[0], dtype=f"<U{max(len(modalities[0]), 1)}"),
            mb=np.full(n, modalities[1], dtype=f"<U{max(len(modalities[1]), 1)}"),
            step=torch.full((n,), int(step), dtype=torch.int64, device=device),
            labels=torch.as_tensor(labels if labels is not None else np.full(n, -1), dtype=torch.int64, device=device),
            ids=np.asarray(ids if ids is not None else np.arange(n).astype(str), dtype=object),
        )

    def select(self, rows: torch.Tensor | np.ndarray | slice) -> "PairedFeatures":
        """A subset of rows (index tensor, array or slice); tensors stay on their device."""
        np_rows, t_rows = _indices(rows, self.xa.device)
        return PairedFeatures(
            xa=_rows(self.xa, np_rows, t_rows), xb=_rows(self.xb, np_rows, t_rows), ma=self.ma[np_rows],
            mb=self.mb[np_rows], step=self.step[t_rows], labels=self.labels[t_rows], ids=self.ids[np_rows],
        )

    def to(self, device: torch.device | str) -> "PairedFeatures":
        """Move the tensors to ``device``."""
        return replace(self, xa=self.xa.to(device), xb=self.xb.to(device), step=self.step.to(device),
                       labels=self.labels.to(device))

    @property
    def single_pair(self) -> tuple[str, str] | None:
        """``(a, b)`` when every row has the same modality pair, else ``None``."""
        if len(self) == 0:
            return None
        a, b = self.ma[0], self.mb[0]
        if (self.ma == a).all() and (self.mb == b).all():
            return str(a), str(b)
        return None

    @staticmethod
    def concat(parts: Sequence["PairedFeatures"]) -> "PairedFeatures":
        """Concatenate row-wise (e.g. the current step's data and a replay buffer)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        device = parts[0].xa.device
        return PairedFeatures(
            xa=torch.cat([p.xa.to(device) for p in parts]), xb=torch.cat([p.xb.to(device) for p in parts]),
            ma=np.concatenate([p.ma.astype(object) for p in parts]).astype(str),
            mb=np.concatenate([p.mb.astype(object) for p in parts]).astype(str),
            step=torch.cat([p.step.to(device) for p in parts]),
            labels=torch.cat([p.labels.to(device) for p in parts]),
            ids=np.concatenate([p.ids for p in parts]),
        )


def take_rows(x: torch.Tensor, rows: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
    """``x[rows]`` by :meth:`PairedFeatures.select`'s gather, for a tensor aligned with a set's rows."""
    return _rows(x, *_indices(rows, x.device))


def _indices(rows: torch.Tensor | np.ndarray | slice, device: torch.device):
    """``rows`` as a numpy index and as an index tensor on ``device`` (a slice stays a slice)."""
    if isinstance(rows, slice):
        return rows, rows
    t_rows = torch.as_tensor(rows, dtype=torch.int64, device=rows.device if isinstance(rows, torch.Tensor) else "cpu")
    np_rows = t_rows.cpu().numpy()
    if device.type == "cuda" and t_rows.device.type == "cpu":
        # from pinned memory the copy is asynchronous: drawing a batch does not wait for
        # the GPU to finish its queue (a copy from pageable memory would)
        return np_rows, t_rows.pin_memory().to(device, non_blocking=True)
    return np_rows, t_rows.to(device)


def _rows(x: torch.Tensor, np_rows, t_rows) -> torch.Tensor:
    """``x[rows]``. On the CPU through numpy: the same values, but torch's multi-threaded gather of a
    batch's scattered rows waits on its second thread whenever the other core is busy
    (``benchmarks/bench_gather.py``: 0.27 ms against 0.09 ms beside one busy process, 5-16 ms
    against 0.2-0.3 ms at load 5-6; about the same when idle)."""
    if (x.device.type == "cpu" and not isinstance(np_rows, slice) and x.dtype == torch.float32
            and not x.requires_grad):
        return torch.from_numpy(x.numpy()[np_rows])
    return x[t_rows]


def iter_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled row indices in batches of ``batch_size`` (the last partial batch is kept)."""
    order = torch.randperm(n, generator=generator, device=generator.device)  # on the generator's device
    for lo in range(0, n, batch_size):
        yield order[lo:lo + batch_size]


@dataclass
class TestSet:
    """The test split of one protocol step, as the evaluator needs it.

    Attributes:
        step: the protocol step.
        xa, xb: (N, D) float32 test pairs.
        labels: (N,) class indices (-1 when unlabelled).
        class_emb: (C, D) class-name text prototypes when the step scores accuracy, else ``None``.
    """

    __test__ = False  # not a pytest class

    step: ProtocolStep
    xa: np.ndarray
    xb: np.ndarray
    labels: np.ndarray
    class_emb: np.ndarray | None


class StepData:
    """Loads protocol steps from a feature cache, validating them against the protocol.

    Train splits are loaded one dataset at a time (the last one is kept, since consecutive steps
    often share a dataset, and every step of it gets the same tensor per modality); test splits
    are loaded once.
    """

    def __init__(self, root: str | Path, backbone: str, protocol: Protocol) -> None:
        self.root = Path(root)
        self.backbone = backbone
        self.protocol = protocol
        self._train: tuple[str, SplitFeatures, dict[str, torch.Tensor]] | None = None
        self._tests: list[TestSet] | None = None
        self.dim: int | None = None

    def _open(self, dataset: str, split: str) -> SplitFeatures:
        feats = open_split(self.root, self.backbone, dataset, split,
                           modalities=self.protocol.modalities_of(dataset))
        self._same_dim(feats.meta.dim, feats.where)
        return feats

    def _same_dim(self, dim: int, place: str) -> None:
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise ProtocolError(f"{place}: dim {dim} differs from the other splits ({self.dim})")

    def check(self) -> None:
        """Validate every split the protocol needs: modalities, dims and values.

        Runs before training so that a bad file fails the run at once, not hours later. The test
        splits are loaded (and kept); the train splits are checked a block at a time and loaded
        later, each by its first step, so that at most one is held in memory.
        """
        self.test_sets()
        for dataset in self.protocol.datasets:
            paths = split_files(self.root, self.backbone, dataset, "train")
            meta = check_files(paths, modalities=self.protocol.modalities_of(dataset))
            self._same_dim(meta.dim, where_of(paths))

    def train(self, step: ProtocolStep) -> PairedFeatures:
        """The training pairs of ``step``."""
        if self._train is None or self._train[0] != step.dataset:
            self._train = None   # the split held so far goes before the next is read (one at a time)
            feats = self._open(step.dataset, "train")
            # One tensor per modality while the dataset lasts: every step of the dataset hands over
            # the very same tensors (DNS recognises a modality's rows by them and reuses their Gram).
            self._train = (step.dataset, feats, {m: torch.from_numpy(x) for m, x in feats.emb.items()})
        _, feats, tensors = self._train
        a, b = step.modalities
        return PairedFeatures.from_arrays(tensors[a], tensors[b], step.modalities, step.index,
                                          feats.labels, feats.ids)

    def test_sets(self) -> list[TestSet]:
        """Test pairs (and class prototypes where accuracy is scored) of every step (loaded once)."""
        if self._tests is not None:
            return self._tests
        by_dataset: dict[str, SplitFeatures] = {}
        out = []
        for step in self.protocol.steps:
            if step.dataset not in by_dataset:
                by_dataset[step.dataset] = self._open(step.dataset, "test")
            feats = by_dataset[step.dataset]
            a, b = step.modalities
            class_emb = None
            if step.has_acc:
                if feats.class_emb is None:
                    raise ProtocolError(f"{feats.where}: step {step.index} ({step.key}) scores zero-shot "
                                        f"accuracy but the split has no /classes/emb/text prototypes")
                if (feats.labels < 0).any() or (feats.labels >= len(feats.class_emb)).any():
                    raise ProtocolError(f"{feats.where}: labels must lie in [0, {len(feats.class_emb)}) "
                                        f"for zero-shot accuracy")
                class_emb = feats.class_emb
            out.append(TestSet(step, feats.emb[a], feats.emb[b], feats.labels, class_emb))
        self._tests = out
        return out
