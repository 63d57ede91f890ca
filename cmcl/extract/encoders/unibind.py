"""UniBind: the ImageBind network with UniBind's weights, plus its class-centre embeddings.

UniBind's ``pretrained_weights.pt`` is its POINTBIND state dict: ``bind.*`` is an ImageBind-huge
network (loaded strictly after stripping ``bind.``), and the point branch (``bind.modality_head_point``,
``bind.modality_postprocessor_point``, ``point_encoder.*``, ``pc_projection``, ``logit_scale``) and any
fine-tuning ``mlp_for_<m>`` layers are kept aside in :attr:`ImageBindEncoder.extra_state`. Point
clouds are not embedded yet (the point encoder needs a CPU FPS/KNN implementation; see
``docs/encoders.md``).

The LLM-augmented class centres (``<modality>_<dataset>_center_embeddings.pkl``: a pickle of
``{label: Tensor(50, 1024)}``) are read by :func:`load_class_centres` with a restricted unpickler.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmcl.errors import EncoderError
from cmcl.extract.encoders.checkpoints import load_tensor_pickle
from cmcl.extract.encoders.imagebind import ImageBindEncoder

UNIBIND_WEIGHTS_URL = "https://drive.google.com/file/d/1Dgmj7ajdoT8hYHobJQfgIuB4CbVRoKUn (UniBind README)"
UNIBIND_CENTRES_URL = "https://drive.google.com/drive/folders/1aQ654WO9jFuK6bqz2YqhAVrT0vvXPiJW"
#: keys under ``bind.`` that belong to the point branch, not to ImageBind
_POINT_IN_BIND = ("modality_head_point.", "modality_postprocessor_point.")


class UniBindEncoder(ImageBindEncoder):
    """UniBind's frozen ImageBind backbone; ``event`` frames go through the vision tower."""

    name = "unibind"
    TOWER_OF = {**ImageBindEncoder.TOWER_OF, "event": "vision"}
    CHECKPOINT_ENV = "CMCL_UNIBIND_CHECKPOINT"
    CHECKPOINT_FILE = "pretrained_weights.pt"
    CHECKPOINT_SOURCE = UNIBIND_WEIGHTS_URL

    @classmethod
    def split_state(cls, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``bind.`` keys (minus the point head) -> network; everything else -> kept aside."""
        if not any(k.startswith("bind.") for k in state):
            raise EncoderError("unibind: the checkpoint has no 'bind.' keys; is it UniBind's "
                               "pretrained_weights.pt? (for imagebind_huge.pth use --backbone imagebind)")
        net, aside = {}, {}
        for k, v in state.items():
            inner = k[len("bind."):] if k.startswith("bind.") else None
            if inner is not None and not inner.startswith(_POINT_IN_BIND):
                net[inner] = v
            else:
                aside[k] = v
        return net, aside


def load_class_centres(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Read a UniBind centre-embedding file without an unrestricted unpickler.

    Returns:
        names: class labels in file order.
        prototypes: (C, D) float32, per class the L2-normalised mean of its normalised centres
            (the cache holds one prototype per class; UniBind itself scores every centre).
        centres: label -> (K, D) float32 normalised centres.
    """
    path = Path(path)
    obj = load_tensor_pickle(path)
    if not isinstance(obj, dict) or not obj:
        raise EncoderError(f"{path}: expected a dict {{label: (K, D) tensor}}, got {type(obj).__name__}")
    names, protos, centres = [], [], {}
    for label, value in obj.items():
        x = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).float()
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2:
            raise EncoderError(f"{path}: centres of {label!r} have shape {tuple(x.shape)}, expected (K, D)")
        x = F.normalize(x, dim=-1)
        names.append(str(label))
        centres[str(label)] = x.numpy()
        protos.append(F.normalize(x.mean(0), dim=-1))
    dims = {c.shape[1] for c in centres.values()}
    if len(dims) != 1:
        raise EncoderError(f"{path}: class centres have different widths {sorted(dims)}")
    return names, torch.stack(protos).numpy().astype(np.float32), centres


def diff_backbones(unibind_checkpoint: str | os.PathLike, imagebind_checkpoint: str | os.PathLike, *,
                   trust_pickle: bool = False) -> dict[str, object]:
    """Compare UniBind's ``bind.*`` network with ``imagebind_huge.pth`` (an open question of the spec).

    Both files are memory-mapped; tensors are compared one at a time. Returns a summary:
    ``identical`` (bool), ``compared`` (keys in both), ``equal`` (bit-identical keys),
    ``max_abs_diff`` (over all compared tensors), ``differing`` (up to 20 keys with their max
    difference), ``only_unibind`` and ``only_imagebind`` (keys in one file only).
    """
    from cmcl.extract.encoders.imagebind import ImageBindEncoder

    ub, _ = UniBindEncoder.split_state(UniBindEncoder.read_state(Path(unibind_checkpoint), trust_pickle=trust_pickle))
    ib = ImageBindEncoder.read_state(Path(imagebind_checkpoint), trust_pickle=trust_pickle)
    common = [k for k in ub if k in ib]
    equal, worst, differing = 0, 0.0, []
    for k in common:
        a, b = ub[k], ib[k]
        if a.shape != b.shape:
            differing.append((k, float("inf")))
            worst = float("inf")
            continue
        if torch.equal(a, b):  # also equal where both hold inf (the text mask)
            equal += 1
            continue
        fa, fb = a.float(), b.float()
        gap = torch.where(fa == fb, torch.zeros_like(fa), (fa - fb).abs())
        d = float(gap.nan_to_num(nan=float("inf")).max())
        differing.append((k, d))
        worst = max(worst, d)
    differing.sort(key=lambda kd: -kd[1])
    return {
        "identical": equal == len(common) and len(common) == len(ub) == len(ib),
        "compared": len(common), "equal": equal, "max_abs_diff": worst,
        "differing": differing[:20],
        "only_unibind": sorted(k for k in ub if k not in ib),
        "only_imagebind": sorted(k for k in ib if k not in ub),
    }
