"""Embed a list of records with one encoder into one feature-cache shard (in memory, one pass).

This is the small, non-resumable path used by the encoder tests and by one-off extractions; the
dataset readers' resumable engine builds on the same :class:`~cmcl.extract.encoders.base.Encoder`
calls (``preprocessor`` then ``encode_batch``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmcl.data.features import FeatureWriter, ShardMeta, shard_path
from cmcl.errors import EncoderError
from cmcl.extract.encoders.base import Encoder


def extract_items(encoder: Encoder, dataset: str, split: str, records: Sequence[Mapping[str, Any]],
                  out_root: str | os.PathLike, *, modalities: Sequence[str], batch_size: int = 32,
                  class_names: Sequence[str] | None = None, class_prompts: Sequence[str] | None = None,
                  class_prototypes: np.ndarray | None = None, overwrite: bool = False) -> Path:
    """Write ``<out_root>/<backbone>/<dataset>/<split>.h5``.

    Args:
        encoder: a loaded encoder.
        records: one mapping per sample with ``"id"``, optional ``"label"`` (default -1) and one raw
            item per modality (a path, or a caption string for ``text``).
        modalities: modalities to embed; each record must hold all of them.
        batch_size: items per forward pass.
        class_names: class names for zero-shot prototypes, stored under ``/classes``.
        class_prompts: texts embedded as the prototypes (default: the names themselves).
        class_prototypes: (C, D) prototypes given directly (e.g. UniBind's class centres) instead
            of embedding ``class_prompts``.
        overwrite: replace an existing shard.

    Returns:
        The shard path.
    """
    if batch_size < 1:
        raise EncoderError(f"batch size must be >= 1, got {batch_size}")
    for m in modalities:
        if m not in encoder.modalities:
            raise EncoderError(f"{encoder.name} cannot embed {m!r} (it embeds {list(encoder.modalities)})")
    path = shard_path(out_root, encoder.name, dataset, split)
    meta = ShardMeta(backbone=encoder.name, dataset=dataset, split=split, dim=encoder.dim,
                     modalities=tuple(modalities), normalized=True, checkpoint=encoder.checkpoint,
                     extra=encoder.attributes())
    preps = {m: encoder.preprocessor(m) for m in modalities}
    with FeatureWriter(path, meta, overwrite=overwrite) as writer:
        for lo in range(0, len(records), batch_size):
            block = records[lo:lo + batch_size]
            missing = [(r.get("id"), m) for r in block for m in modalities if m not in r]
            if missing:
                raise EncoderError(f"record {missing[0][0]!r} has no {missing[0][1]!r} item")
            emb = {m: encoder.encode_batch(m, torch.stack([preps[m](r[m]) for r in block])) for m in modalities}
            text = [str(r["text"]) for r in block] if "text" in modalities else None
            writer.append([str(r["id"]) for r in block], [int(r.get("label", -1)) for r in block], emb, text)
        if class_names is not None:
            if class_prototypes is None:
                prompts = list(class_prompts) if class_prompts is not None else list(class_names)
                prep = encoder.preprocessor("text")
                class_prototypes = np.concatenate([
                    encoder.encode_batch("text", torch.stack([prep(p) for p in prompts[i:i + batch_size]]))
                    for i in range(0, len(prompts), batch_size)])
            writer.set_classes(class_names, {"text": np.asarray(class_prototypes, dtype=np.float32)})
    return path
