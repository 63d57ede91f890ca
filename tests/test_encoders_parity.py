"""Parity with the upstream ImageBind classes, when they are importable.

The upstream package (``pip install --no-deps imagebind-unofficial==0.1.1 einops iopath``) cannot
be imported normally beside a current CPU torch (its ``__init__`` pulls torchaudio/torchvision and
its models need ``timm``), so these tests import ``imagebind.models.imagebind_model`` with the
package ``__init__`` bypassed and a two-function ``timm`` stand-in, as the spec describes. Without
the package they are skipped: cmcl does not depend on it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cmcl.extract.encoders.imagebind_arch import TINY, build_imagebind
from cmcl.extract.encoders.tokenizer import ClipTokenizer


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x  # eval-only stand-in


def _upstream():
    spec = importlib.util.find_spec("imagebind")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("upstream ImageBind (imagebind-unofficial) is not installed")
    roots = list(spec.submodule_search_locations)
    if not (Path(roots[0]) / "models" / "imagebind_model.py").is_file():
        pytest.skip("the installed 'imagebind' package is not ImageBind")
    if "imagebind.models.imagebind_model" in sys.modules:
        return sys.modules["imagebind.models.imagebind_model"], Path(roots[0])
    added = []
    if "imagebind" not in sys.modules:
        pkg = types.ModuleType("imagebind")
        pkg.__path__ = roots
        pkg.__spec__ = importlib.machinery.ModuleSpec("imagebind", None, is_package=True)
        pkg.__spec__.submodule_search_locations = roots
        sys.modules["imagebind"] = pkg
    if importlib.util.find_spec("timm") is None:
        for name in ("timm", "timm.layers", "timm.models", "timm.models.layers"):
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            mod.__path__ = []
            mod.DropPath, mod.trunc_normal_ = _DropPath, nn.init.trunc_normal_
            sys.modules[name] = mod
            added.append(name)
    try:
        import imagebind.models.imagebind_model as ibm
    except ImportError as exc:
        pytest.skip(f"upstream ImageBind does not import here: {exc}")
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return ibm, Path(roots[0])


TINY_KW = dict(out_embed_dim=32, **{f"{m}_{k}": v for m in ("vision", "text", "audio", "depth", "thermal", "imu")
                                    for k, v in (("embed_dim", 32), ("num_blocks", 1), ("num_heads", 2))})


def test_same_keys_and_outputs_as_upstream_imagebind():
    ibm, _ = _upstream()
    torch.manual_seed(0)
    ref = ibm.ImageBindModel(**TINY_KW).eval()
    ours = build_imagebind(TINY, device="meta")
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    torch.manual_seed(1)
    text = torch.randint(1, 40000, (2, 77))
    text[0, 9], text[1, 30] = 49407, 49407
    inputs = {
        "vision": torch.randn(2, 3, 224, 224),
        "text": text,
        "audio": torch.randn(2, 3, 1, 128, 204),
        "depth": torch.randn(2, 1, 224, 224),
        "thermal": torch.randn(2, 1, 224, 224),
        "imu": torch.randn(2, 6, 2000),
    }
    with torch.no_grad():
        want = ref(inputs)
        video = torch.randn(2, 3, 3, 2, 224, 224)
        want_video = ref({"vision": video})["vision"]
        for m, x in inputs.items():
            assert torch.allclose(ours.embed(m, x), want[m], atol=1e-5), m
        assert torch.allclose(ours.embed("vision", video), want_video, atol=1e-5)


def test_tokenizer_ids_equal_upstream_on_the_real_vocabulary():
    ibm, root = _upstream()
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    bpe = root / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
    theirs = SimpleTokenizer(bpe_path=str(bpe))
    ours = ClipTokenizer.from_bpe_gz(bpe)
    texts = ["A dog barking.", "Ünïcödé — naïve café, 東京!", "x" * 5 + " word" * 100, "it's 3:45pm &amp; sunny",
             "   many    spaces\tand\nlines  "]
    for t in texts:
        assert ours(t).tolist() == theirs(t).tolist(), t
    assert ours.sot_id == 49406 and ours.eot_id == 49407
    assert np.array_equal(ours("a photo of a dog").numpy()[:7], [49406, 320, 1125, 539, 320, 1929, 49407])
