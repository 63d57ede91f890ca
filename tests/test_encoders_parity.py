"""Parity with the upstream ImageBind and LanguageBind classes, when they are importable.

``bash scripts/parity.sh`` builds a throw-away venv with both upstream packages and runs this
file (failing if anything is skipped). The test extra installs upstream LanguageBind, so its
tests run in CI too; ImageBind's (and the real-vocabulary tokenizer check, whose merge list comes
from the ImageBind wheel) are skipped where that package is not installed: cmcl itself depends on
neither.

ImageBind (``pip install --no-deps imagebind-unofficial==0.1.1 einops iopath portalocker``) cannot
be imported normally beside a current CPU torch (its ``__init__`` pulls torchaudio/torchvision and
its models need ``timm``), so these tests import ``imagebind.models.imagebind_model`` with the
package ``__init__`` bypassed and a two-function ``timm`` stand-in, as the spec describes.

LanguageBind (``pip install --no-deps languagebind==0.1.0`` plus transformers 4.40.2, tokenizers
0.19.1, huggingface_hub<1, peft 0.11.1, accelerate 0.30.1, einops) is imported the same way: its
package ``__init__`` imports the processors, which need torchvision, so only the
``<tower>.modeling_*``/``configuration_*``/``tokenization_*`` modules are loaded.
"""

from __future__ import annotations

import contextlib
import os

import importlib.machinery
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cmcl.extract.encoders import check_checkpoint, load_encoder
from cmcl.extract.encoders.imagebind_arch import TINY, build_imagebind
from cmcl.extract.encoders.languagebind import read_folder_shapes
from cmcl.extract.encoders.tokenizer import ClipTokenizer
from tests.encoder_fixtures import write_hf_tokenizer


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x  # eval-only stand-in



@contextlib.contextmanager
def shown(capsys):
    """Show the measured differences under ``scripts/parity.sh`` (CMCL_PARITY_REPORT=1); quiet otherwise."""
    if os.environ.get("CMCL_PARITY_REPORT"):
        with capsys.disabled():
            yield
    else:
        yield

def _upstream():
    spec = importlib.util.find_spec("imagebind")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("upstream ImageBind (imagebind-unofficial, --no-deps) is not installed; "
                    "bash scripts/parity.sh runs this file with it")
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


# ------------------------------------------------------------------------------ LanguageBind
LB_KINDS = ("image", "video", "audio", "depth", "thermal")


def _bypass_package_init(name: str) -> list[str]:
    """Register ``name`` as an empty package over its installed folder (its ``__init__`` not run)."""
    spec = importlib.util.find_spec(name)
    roots = list(spec.submodule_search_locations or [])
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = roots
        pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        pkg.__spec__.submodule_search_locations = roots
        sys.modules[name] = pkg
    return roots


def _languagebind():
    """kind -> (model class, config class), and the tokenizer class, from upstream ``languagebind``."""
    spec = importlib.util.find_spec("languagebind")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("upstream LanguageBind (languagebind==0.1.0, in the test extra) is not installed")
    roots = list(spec.submodule_search_locations)
    if not (Path(roots[0]) / "video" / "modeling_video.py").is_file():
        pytest.skip("the installed 'languagebind' package is not LanguageBind")
    _bypass_package_init("languagebind")
    classes = {}
    try:
        for kind in LB_KINDS:
            model = importlib.import_module(f"languagebind.{kind}.modeling_{kind}")
            config = importlib.import_module(f"languagebind.{kind}.configuration_{kind}")
            classes[kind] = (getattr(model, f"LanguageBind{kind.capitalize()}"),
                             getattr(config, f"LanguageBind{kind.capitalize()}Config"))
        tokenizer = importlib.import_module("languagebind.image.tokenization_image").LanguageBindImageTokenizer
    except ImportError as exc:
        pytest.skip(f"upstream LanguageBind does not import here (needs transformers 4.40, peft, einops): {exc}")
    return classes, tokenizer


LB_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu",
               max_position_embeddings=77, vocab_size=49408)
LB_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu",
                 patch_size=14, image_size=56, lora_r=0)
#: name -> (kind, hub folder name, vision_config overrides, input shape)
LB_TOWERS = {
    "image": ("image", "LanguageBind_Image", {}, (2, 3, 56, 56)),
    "video": ("video", "LanguageBind_Video_FT", dict(add_time_attn=True, num_frames=8), (2, 3, 8, 56, 56)),
    "video_lora": ("video", "LanguageBind_Video", dict(add_time_attn=True, num_frames=8, lora_r=2, lora_alpha=4),
                   (2, 3, 8, 56, 56)),
    "video_v1.5": ("video", "LanguageBind_Video_V1.5_FT",
                   dict(add_time_attn=True, num_frames=8, clip_type="vl_new", tube_size=1), (2, 3, 8, 56, 56)),
    "video_v1.5_lora": ("video", "LanguageBind_Video_V1.5_FT",
                        dict(add_time_attn=True, num_frames=8, clip_type="vl_new", tube_size=1, lora_r=2,
                             lora_alpha=4), (2, 3, 8, 56, 56)),
    "audio": ("audio", "LanguageBind_Audio_FT", dict(num_mel_bins=28, target_length=70), (2, 3, 28, 70)),
    "depth_lora": ("depth", "LanguageBind_Depth", dict(lora_r=2, lora_alpha=4), (2, 3, 56, 56)),
    "thermal": ("thermal", "LanguageBind_Thermal", {}, (2, 3, 56, 56)),
}


def _save_upstream_tower(classes, name, root: Path, seed: int):
    """An upstream tower with perturbed random weights, saved with its own ``save_pretrained``."""
    kind, hub, vision, _ = LB_TOWERS[name]
    model_cls, config_cls = classes[kind]
    cfg = config_cls(text_config=dict(LB_TEXT), vision_config=dict(LB_VISION, **vision), projection_dim=16)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF init leaves LayerNorms at 1/0 and LoRA B at 0: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = root / name / hub
    model.save_pretrained(str(folder))
    write_hf_tokenizer(folder)  # a tiny vocabulary: these tests feed token ids directly
    return model, folder


def _ids_with_eot(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 49406, (n, length), generator=generator)
    ends = torch.randint(2, length, (n,), generator=generator)
    ids[:, 0] = 49406
    mask = torch.zeros_like(ids)
    for i, e in enumerate(ends.tolist()):
        ids[i, e:] = 49407  # EOT, then EOT padding (LanguageBind's pad token)
        mask[i, : e + 1] = 1
    return ids, mask


@pytest.mark.parametrize("name", list(LB_TOWERS))
def test_languagebind_towers_equal_upstream(name, tmp_path, capsys):
    classes, _ = _languagebind()
    model, folder = _save_upstream_tower(classes, name, tmp_path, seed=list(LB_TOWERS).index(name))
    kind, _, vision, shape = LB_TOWERS[name]
    saved = json.loads((folder / "config.json").read_text())["vision_config"]
    assert saved.get("clip_type", "vl") == vision.get("clip_type", "vl")
    report = check_checkpoint("languagebind", folder)
    assert report.ok, report.summary()
    enc = load_encoder("languagebind", checkpoint=folder, device="cpu")
    net = enc.net(kind)
    assert enc.reports[kind].ok
    lora_keys = [k for k in read_folder_shapes(folder) if ".lora_A." in k]
    assert bool(lora_keys) == bool(vision.get("lora_r"))  # LoRA towers are saved peft-wrapped, and merged on load
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*shape, generator=g)
    ids, mask = _ids_with_eot(3, 77, g)
    with torch.no_grad():
        want_v = model.get_image_features(pixel_values=x)
        want_t = model.get_text_features(input_ids=ids, attention_mask=mask)
        got_v, got_t = net.embed_vision(x), net.embed_text(ids)
    dv, dt = (got_v - want_v).abs().max().item(), (got_t - want_t).abs().max().item()
    with shown(capsys):
        print(f"\n  languagebind {name}: max |ours - upstream| vision {dv:.1e}, text {dt:.1e} "
              f"(|upstream| up to {want_v.abs().max().item():.2f})", end="")
    assert got_v.shape == want_v.shape == (shape[0], 16)
    assert dv < 1e-5 and dt < 1e-5
    # the embeddings through the Encoder interface are the normalised upstream features
    assert np.allclose(enc.encode_batch("text", ids), torch.nn.functional.normalize(want_t, dim=-1).numpy(),
                       atol=1e-5)


def test_languagebind_v15_needs_per_frame_class_tokens(tmp_path):
    """Squeezing the Conv3d and keeping frame 0's class token (a 2-D V1 tower) does not give
    upstream's V1.5 outputs, so the layout has to be supported, not converted."""
    classes, _ = _languagebind()
    model, folder = _save_upstream_tower(classes, "video_v1.5", tmp_path, seed=3)
    from cmcl.extract.encoders.languagebind import prepare_state, read_config, read_folder_state
    from cmcl.extract.encoders.languagebind_arch import LanguageBindConfig, build_languagebind

    d = json.loads((folder / "config.json").read_text())
    del d["vision_config"]["clip_type"]
    v1 = build_languagebind(LanguageBindConfig.from_dict(d))
    state, _ = prepare_state(read_folder_state(folder), read_config(folder))
    cls, conv = "vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight"
    state[cls], state[conv] = state[cls][0], state[conv][:, :, 0]
    v1.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 8, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.get_image_features(pixel_values=x)
        assert (v1.embed_vision(x) - want).abs().max() > 1e-2
        assert (load_encoder("languagebind", checkpoint=folder, device="cpu").net("video").embed_vision(x)
                - want).abs().max() < 1e-5


def _fuzz_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        ["dog", "Tom", "Jerry", "R&D", "café", "naïve", "東京", "Ünïcödé", "it's", "x2", "A", "DOG's", "3:45pm",
         "ﬁne"],
        ["&amp;", "&amp", "&lt;", "&gt;", "&lt", "&times", "&times;", "&copy", "&copy;", "&notes", "&#39;", "&#x27;",
         "&nbsp;", "&quot;", "&amp;amp;", "&eacute;", "&", ";"],
        ["<b>", "</b>", "<i>", "<br/>", "<", ">", "<p class='x'>"],
        [",", ".", "!", "—", "...", "'", "\"", "(", ")", "🙂"],
        [" ", "  ", "\t", "\n", "\u00a0", "\u3000"],
        ["Ã©", "â€™", "\x07", "\u200b", "e\u0301", "\ufffd"],
        ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>"],
    ]
    weights = [6, 5, 2, 2, 3, 1, 0.3]
    texts = []
    for _ in range(n):
        k = rng.randint(1, 14)
        parts = [rng.choice(rng.choices(pools, weights)[0]) for _ in range(k)]
        texts.append(rng.choice(["", " "]).join(parts))
    texts.append("word " * 120)  # truncation keeps EOT
    return texts


LB_EXAMPLES = ["<b>Tom &amp; Jerry</b>", "R&D &notes", "5 &times 3", "&copy 2020", "A dog barking.",
               "Ünïcödé — naïve café, 東京!", "it's 3:45pm &amp; sunny", "   many    spaces\tand\nlines  ",
               "hello<|endoftext|>dog", "<b>x</b> &amp;<|endoftext|>&amp;"]


def _real_vocabulary(tmp_path: Path) -> tuple[Path, Path]:
    """The released CLIP vocabulary as HF files (vocab.json + merges.txt), from ImageBind's merge list."""
    spec = importlib.util.find_spec("imagebind")
    bpe = next((Path(r) / "bpe" / "bpe_simple_vocab_16e6.txt.gz" for r in (spec.submodule_search_locations or [])
                if (Path(r) / "bpe" / "bpe_simple_vocab_16e6.txt.gz").is_file()), None) if spec else None
    if bpe is None:
        pytest.skip("the CLIP merge list (shipped in imagebind-unofficial) is not installed; "
                    "bash scripts/parity.sh runs this file with it")
    tok = ClipTokenizer.from_bpe_gz(bpe)
    merges = sorted(tok.ranks, key=tok.ranks.get)
    vocab, merges_txt = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps(tok.encoder), encoding="utf-8")
    merges_txt.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return vocab, merges_txt


@pytest.mark.parametrize("vocabulary", ["clip", "tiny"])
@pytest.mark.parametrize("use_ftfy", [True, False], ids=["ftfy", "no-ftfy"])
def test_languagebind_tokenizer_ids_equal_upstream(use_ftfy, vocabulary, tmp_path, capsys):
    """Same ids as LanguageBind's tokenizer (HF CLIPTokenizer) on the issue's examples and 600
    seeded random strings of words, HTML entities (with and without ';'), tags, unicode, mojibake,
    control characters and special tokens; with ftfy and with HF's no-ftfy fallback. The real
    CLIP vocabulary checks BPE too; the tiny one (all byte symbols, a few merges) checks cleaning."""
    _, upstream_cls = _languagebind()
    if use_ftfy:
        pytest.importorskip("ftfy", reason="ftfy (in cmcl[languagebind]) is needed for this comparison")
    if vocabulary == "clip":
        vocab, merges = _real_vocabulary(tmp_path)
    else:
        folder = write_hf_tokenizer(tmp_path / "tiny")
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
    theirs = upstream_cls(str(vocab), str(merges))
    if not use_ftfy:  # what HF's CLIPTokenizer does when ftfy is not installed
        from transformers.models.bert.tokenization_bert import BasicTokenizer

        theirs.fix_text, theirs.nlp = None, BasicTokenizer(strip_accents=False, do_split_on_punc=False)
    else:
        assert theirs.fix_text is not None
    ours = ClipTokenizer.from_hf_files(vocab, merges)
    ours.use_ftfy = use_ftfy
    openai = ClipTokenizer.from_hf_files(vocab, merges, cleaning="openai")
    openai.use_ftfy = use_ftfy
    texts = LB_EXAMPLES + _fuzz_texts(600, seed=0)
    want = theirs(texts, max_length=77, padding="max_length", truncation=True)["input_ids"]
    differ = 0
    for text, w in zip(texts, want):
        assert ours(text).tolist() == w, repr(text)
        differ += openai(text).tolist() != w
    with shown(capsys):
        print(f"\n  languagebind tokenizer ({vocabulary} vocabulary, {'ftfy' if use_ftfy else 'no ftfy'}): "
              f"{len(texts)} texts equal upstream; "
              f"ImageBind's cleaning would change {differ}", end="")
    assert ours.pad_id == theirs.pad_token_id == ours.eot_id
    if use_ftfy:  # the examples are where the two cleanings part
        assert all(openai(t).tolist() != ours(t).tolist() for t in LB_EXAMPLES[:4])
    assert differ > 0
