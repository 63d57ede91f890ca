"""The ``synthetic`` backbone: a simulated pretrained binding space for the paper's seven datasets.

No weights and no media: embeddings are drawn from a generative model that reproduces what makes
continual multimodal contrastive learning hard (documented in ``docs/synthetic.md``):

* a shared semantic latent space R^K, embedded in R^d by an orthonormal map A;
* each dataset k uses its own r-dimensional subspace B_k of the latent space; subspaces of
  different datasets overlap partially, as related datasets share semantics;
* a sample's semantics s (class centre plus within-class spread for labelled datasets; class-only
  for their texts, which repeat per class) is observed by each modality m with view noise and a
  misalignment ``T_{k,m} = R_m (I + beta E_{k,m})``: a rotation R_m shared by every dataset (which
  linear learners can undo once) and a dataset-specific distortion E_{k,m} (whose corrections
  conflict between datasets that share a modality, hence forgetting);
* every embedding adds a large common direction (the narrow cone of real encoders), a modality
  offset (the modality gap), a dataset offset and isotropic noise, and is L2-normalised.

Everything is a deterministic function of the seed, so two extractions with the same options are
bit-identical.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cmcl.data.catalog import DATASETS, DatasetInfo
from cmcl.data.features import FeatureShard, ShardMeta, FeatureWriter, shard_path
from cmcl.errors import CacheError

BACKBONE = "synthetic"
_CHUNK = 8192


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generative model (the defaults are what ``cmcl extract`` writes).

    Attributes:
        dim: embedding width d.
        scale: multiplies every split size of the paper (minimum 64 rows per split, and at least
            one test row per class).
        seed: master seed.
        latent_dim: K, the shared semantic space.
        dataset_rank: r, the dimension of each dataset's semantic subspace.
        cone: norm of the common direction every embedding shares.
        modality_offset: norm of the per-modality offset (modality gap).
        dataset_offset: norm of the per-dataset offset.
        noise: norm of the isotropic d-dimensional noise.
        view_noise: per-modality noise on the semantics, relative to their unit scale.
        class_spread: within-class spread of labelled datasets' semantics.
        rotation: angle scale of the shared per-modality rotation R_m (radians).
        distortion: beta, the strength of the dataset-specific distortion E_{k,m}.
    """

    dim: int = 1024
    scale: float = 1.0
    seed: int = 0
    latent_dim: int = 48
    dataset_rank: int = 16
    cone: float = 1.0
    modality_offset: float = 0.5
    dataset_offset: float = 0.3
    noise: float = 0.3
    view_noise: float = 1.0
    class_spread: float = 0.6
    rotation: float = 0.5
    distortion: float = 0.6

    def sizes(self, info: DatasetInfo) -> tuple[int, int]:
        """(train, test) rows of a dataset at this scale."""
        train = max(64, int(round(info.train * self.scale)))
        test = max(64, info.n_classes, int(round(info.test * self.scale)))
        return train, test


def _rng(seed: int, *tags: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(t.encode()) for t in tags)])


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def _rotation(rng: np.random.Generator, k: int, angle: float) -> np.ndarray:
    a = rng.standard_normal((k, k))
    skew = (a - a.T) / np.sqrt(2 * k)
    return torch.linalg.matrix_exp(torch.as_tensor(angle * skew, dtype=torch.float64)).numpy()


class SyntheticSpace:
    """The shared parameters of the simulated binding space (everything but the samples)."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        if cfg.dim < cfg.latent_dim + 8:
            raise CacheError(f"synthetic: --dim {cfg.dim} is too small (needs at least {cfg.latent_dim + 8})")
        self.cfg = cfg
        rng = _rng(cfg.seed, "space")
        basis = _orthonormal(rng, cfg.dim, cfg.latent_dim + 1 + 16)
        self.A = basis[:, :cfg.latent_dim]                 # semantic embedding (d, K)
        self.cone = basis[:, cfg.latent_dim]                # common direction
        self.offsets = basis[:, cfg.latent_dim + 1:]        # directions for modality/dataset offsets
        self._rot: dict[str, np.ndarray] = {}

    def rotation(self, modality: str) -> np.ndarray:
        """R_m: the misalignment every dataset shares for ``modality``."""
        if modality not in self._rot:
            self._rot[modality] = _rotation(_rng(self.cfg.seed, "rotation", modality),
                                            self.cfg.latent_dim, self.cfg.rotation)
        return self._rot[modality]

    def offset(self, *tags: str) -> np.ndarray:
        """A fixed unit offset inside the offset subspace."""
        w = _rng(self.cfg.seed, "offset", *tags).standard_normal(self.offsets.shape[1])
        return self.offsets @ (w / np.linalg.norm(w))


class SyntheticDataset:
    """One dataset of the catalog simulated in a :class:`SyntheticSpace`."""

    def __init__(self, space: SyntheticSpace, info: DatasetInfo) -> None:
        cfg = space.cfg
        self.space, self.info, self.cfg = space, info, cfg
        rng = _rng(cfg.seed, "dataset", info.name)
        self.B = _orthonormal(rng, cfg.latent_dim, cfg.dataset_rank)          # (K, r)
        self.centres = rng.standard_normal((max(info.n_classes, 1), cfg.dataset_rank)) / np.sqrt(cfg.dataset_rank)
        self.maps: dict[str, np.ndarray] = {}
        for m in info.modalities:
            e = _rng(cfg.seed, "distortion", info.name, m).standard_normal((cfg.latent_dim, cfg.latent_dim))
            distortion = np.eye(cfg.latent_dim) + cfg.distortion * e / np.sqrt(cfg.latent_dim)
            # latent semantics (r) -> embedding (d): A · R_m · (I + beta E) · B_k
            self.maps[m] = space.A @ space.rotation(m) @ distortion @ self.B
        self.shift = {m: cfg.cone * space.cone + cfg.modality_offset * space.offset("modality", m)
                      + cfg.dataset_offset * space.offset("dataset", info.name) for m in info.modalities}

    def _embed(self, m: str, sem: np.ndarray, rng: np.random.Generator, noisy: bool = True) -> np.ndarray:
        cfg = self.cfg
        x = sem @ self.maps[m].T + self.shift[m]
        if noisy:
            x = x + cfg.noise * rng.standard_normal(x.shape) / np.sqrt(cfg.dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)

    def class_prototypes(self) -> np.ndarray:
        """Text embeddings of the class names (the texts of labelled datasets are their class names)."""
        rng = _rng(self.cfg.seed, "class-text", self.info.name)
        return self._embed("text", self.centres, rng)

    def rows(self, split: str, n: int):
        """Yield ``(ids, labels, {modality: block})`` blocks of the split."""
        cfg, info = self.cfg, self.info
        rng = _rng(cfg.seed, "samples", info.name, split)
        labelled = info.n_classes > 0
        protos = self.class_prototypes() if labelled and "text" in info.modalities else None
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            if labelled:
                labels = np.arange(lo, hi) % info.n_classes  # balanced classes
                base = self.centres[labels] + cfg.class_spread * rng.standard_normal(
                    (hi - lo, cfg.dataset_rank)) / np.sqrt(cfg.dataset_rank)
            else:
                labels = np.full(hi - lo, -1)
                base = rng.standard_normal((hi - lo, cfg.dataset_rank)) / np.sqrt(cfg.dataset_rank)
            emb = {}
            for m in info.modalities:
                if protos is not None and m == "text":
                    emb[m] = protos[labels]  # one text per class, repeated: exact ties, as in the real data
                    continue
                view = base + cfg.view_noise * rng.standard_normal(base.shape) / np.sqrt(cfg.dataset_rank)
                emb[m] = self._embed(m, view, rng)
            ids = [f"{split}-{i:06d}" for i in range(lo, hi)]
            yield ids, labels, emb


def write_synthetic(out: str | Path, cfg: SyntheticConfig = SyntheticConfig(), *,
                    datasets: list[str] | None = None, overwrite: bool = False,
                    progress: bool = False) -> list[Path]:
    """Write the synthetic cache: ``<out>/synthetic/<dataset>/{train,test}.h5`` for each dataset.

    A split that already exists with the same generator settings is kept (so the call is
    idempotent); one with other settings is an error unless ``overwrite``.
    """
    names = datasets or list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise CacheError(f"synthetic: unknown datasets {unknown}; known: {', '.join(DATASETS)}")
    space = SyntheticSpace(cfg)
    stamp = json.dumps(asdict(cfg), sort_keys=True)
    written = []
    jobs = [(n, s) for n in names for s in ("train", "test")]
    for name, split in tqdm(jobs, desc="synthetic", unit="split", disable=not progress):
        info = DATASETS[name]
        path = shard_path(out, BACKBONE, name, split)
        if path.exists() and not overwrite:
            with FeatureShard(path) as shard:
                if shard.meta.extra.get("synthetic_config") == stamp:
                    written.append(path)
                    continue
            raise CacheError(f"{path} exists with other synthetic settings; pass --overwrite to replace it")
        ds = SyntheticDataset(space, info)
        n_train, n_test = cfg.sizes(info)
        meta = ShardMeta(backbone=BACKBONE, dataset=name, split=split, dim=cfg.dim, modalities=info.modalities,
                         normalized=True, checkpoint="", extra={"synthetic_config": stamp})
        with FeatureWriter(path, meta, overwrite=True) as w:
            for ids, labels, emb in ds.rows(split, n_train if split == "train" else n_test):
                w.append(ids, labels, emb)
            if info.n_classes and "text" in info.modalities:
                w.set_classes([f"{name} class {c:03d}" for c in range(info.n_classes)],
                              {"text": ds.class_prototypes()})
        written.append(path)
    return written
