"""The CLIP byte-level BPE tokenizer used by ImageBind, UniBind and LanguageBind.

Both vocabularies in circulation describe the same tokenizer: ImageBind ships the merge list
``bpe_simple_vocab_16e6.txt.gz`` (token ids are implied by the merge order) and LanguageBind's
folders carry ``vocab.json`` + ``merges.txt`` (HF ``CLIPTokenizer`` files). :class:`ClipTokenizer`
reads either and produces the same ids: ``[SOT] + bpe[:L-2] + [EOT]``, padded to ``L``.
ImageBind pads with 0, LanguageBind with its pad token (the EOT id); both models pool at the
first EOT, so the padding never changes an embedding.

The two upstream tokenizers clean text differently before BPE, and each backbone gets its own
(``cleaning``):

* ``"openai"`` (ImageBind's and UniBind's ``SimpleTokenizer``, OpenAI CLIP's): ``ftfy.fix_text``,
  HTML unescaped twice, whitespace collapsed, lower case;
* ``"hf"`` (LanguageBind's tokenizers, which are HF ``CLIPTokenizer``): the text is first split at
  the literal special tokens ``<|startoftext|>``/``<|endoftext|>``; each other piece gets
  ``ftfy.fix_text``, whitespace collapsed, lower case, and no HTML unescaping of its own (ftfy
  leaves text that contains ``<`` alone and ignores entities without a ``;``). Without ftfy,
  HF falls back to BERT's basic clean-up (control characters dropped, spaces around CJK
  ideographs, NFC, lower case), which :func:`hf_basic_clean` reproduces.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
import re
import unicodedata
from pathlib import Path

import torch

from cmcl.errors import EncoderError

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_PATTERN_TEXT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
#: merges used by the released CLIP vocabulary (49152 - 256 - 2 lines after the header).
CLIP_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=1)
def _pattern():
    """CLIP's pre-tokenisation pattern; needs the ``regex`` package for ``\\p{L}`` classes."""
    try:
        import regex
    except ImportError:
        raise EncoderError("text tokenisation needs the 'regex' package: pip install 'cmcl[imagebind]' "
                           "(or [languagebind], [unibind])") from None
    return regex.compile(_PATTERN_TEXT, regex.IGNORECASE)


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


CLEANINGS = ("openai", "hf")


def _fix_text(text: str, use_ftfy: bool) -> str:
    if use_ftfy:
        try:
            import ftfy
        except ImportError:
            return text
        return ftfy.fix_text(text)
    return text


def clean_text(text: str, use_ftfy: bool = True) -> str:
    """OpenAI CLIP / ImageBind cleaning: ftfy repair (when installed), double HTML unescape,
    whitespace collapse, lower case."""
    text = html.unescape(html.unescape(_fix_text(text, use_ftfy))).strip()
    return " ".join(text.split()).lower()


def hf_clean_text(text: str, use_ftfy: bool = True) -> str:
    """HF ``CLIPTokenizer`` cleaning of one piece between special tokens: ftfy repair, whitespace
    collapse, lower case; :func:`hf_basic_clean` when ftfy is not installed."""
    if not use_ftfy:
        return hf_basic_clean(text)
    return " ".join(_fix_text(text, True).split()).lower()


def _is_cjk(cp: int) -> bool:
    """CJK ideograph blocks (unified, extensions A-E, compatibility), as BERT's tokenizer defines them."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def hf_basic_clean(text: str) -> str:
    """HF ``CLIPTokenizer`` without ftfy (its ``BasicTokenizer`` with no accent stripping and no
    punctuation split): NUL, U+FFFD and control characters other than tab/newline/CR dropped,
    whitespace characters made spaces, spaces around CJK ideographs, NFC, lower case, words
    joined by single spaces."""
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return " ".join(unicodedata.normalize("NFC", "".join(out)).split()).lower()


_SPECIAL_SPLIT = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


def ftfy_available() -> bool:
    try:
        import ftfy  # noqa: F401
    except ImportError:
        return False
    return True


class ClipTokenizer:
    """Byte-level BPE with CLIP's ``</w>`` end-of-word marker.

    Args:
        encoder: token string -> id (must contain ``<|startoftext|>`` and ``<|endoftext|>``).
        merges: ranked merge pairs.
        context_length: output length L.
        pad_id: padding id (0 for ImageBind; the EOT id for LanguageBind).
        source: the vocabulary file(s), for the shard attributes.
        cleaning: ``"openai"`` (ImageBind, UniBind) or ``"hf"`` (LanguageBind); see the module doc.
    """

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], *, context_length: int = 77,
                 pad_id: int = 0, source: str = "", cleaning: str = "openai") -> None:
        if cleaning not in CLEANINGS:
            raise EncoderError(f"unknown tokenizer cleaning {cleaning!r} (choose from {list(CLEANINGS)})")
        for special in (SOT, EOT):
            if special not in encoder:
                raise EncoderError(f"{source or 'vocabulary'}: lacks the special token {special}")
        self.encoder = encoder
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.context_length = context_length
        self.pad_id = pad_id
        self.source = source
        self.cleaning = cleaning
        self.use_ftfy = ftfy_available()
        self._cache: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_bpe_gz(cls, path: str | os.PathLike, **kw) -> ClipTokenizer:
        """Read an OpenAI/ImageBind merge list (``bpe_simple_vocab_16e6.txt.gz`` or plain text).

        The first line is a header; at most :data:`CLIP_MERGES` merges are used, as upstream does.
        """
        path = Path(path)
        try:
            if path.suffix == ".gz":
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    raw = f.read()
            else:
                raw = path.read_text(encoding="utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise EncoderError(f"{path}: cannot read the BPE merge list ({exc})") from None
        lines = raw.split("\n")[1:CLIP_MERGES + 1]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        if any(len(m) != 2 for m in merges):
            raise EncoderError(f"{path}: not a BPE merge list (lines must hold two symbols)")
        chars = list(byte_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        return cls({tok: i for i, tok in enumerate(vocab)}, merges, source=str(path), **kw)

    @classmethod
    def from_hf_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike,
                      **kw) -> ClipTokenizer:
        """Read HF ``CLIPTokenizer`` files (``vocab.json`` and ``merges.txt``); HF cleaning and EOT
        padding unless told otherwise."""
        try:
            encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot read tokenizer files {vocab_json}, {merges_txt}: {exc}") from None
        if lines and lines[0].startswith("#"):
            lines = lines[1:]
        # HF's CLIPTokenizer, like OpenAI's, uses at most CLIP_MERGES merges (the released file has exactly that many)
        merges = [tuple(line.split()) for line in lines if line.strip()][:CLIP_MERGES]
        kw.setdefault("pad_id", encoder.get(EOT, 0))
        kw.setdefault("cleaning", "hf")
        return cls(encoder, merges, source=f"{vocab_json},{merges_txt}", **kw)

    # ------------------------------------------------------------------ encoding
    @property
    def sot_id(self) -> int:
        return self.encoder[SOT]

    @property
    def eot_id(self) -> int:
        return self.encoder[EOT]

    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    def _pieces(self, text: str) -> list[str]:
        """Pre-tokenised pieces of ``text`` after the backbone's cleaning."""
        if self.cleaning == "openai":
            return _pattern().findall(clean_text(text, self.use_ftfy))
        pieces: list[str] = []
        for part in _SPECIAL_SPLIT.split(text):  # HF splits at special tokens before cleaning
            if part in (SOT, EOT):
                pieces.append(part)
            elif part:
                pieces += _pattern().findall(hf_clean_text(part, self.use_ftfy))
        return pieces

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT."""
        table = byte_to_unicode()
        ids = []
        for piece in self._pieces(text):
            if piece in (SOT, EOT):
                ids.append(self.encoder[piece])
                continue
            mapped = "".join(table[b] for b in piece.encode("utf-8"))
            for sym in self._bpe(mapped):
                if sym not in self.encoder:
                    raise EncoderError(f"{self.source}: symbol {sym!r} is not in the vocabulary")
                ids.append(self.encoder[sym])
        return ids

    def __call__(self, text: str) -> torch.Tensor:
        """(L,) int64: ``[SOT] + ids[:L-2] + [EOT]`` then padding (EOT is always kept)."""
        ids = [self.sot_id] + self.encode(text)[: self.context_length - 2] + [self.eot_id]
        out = torch.full((self.context_length,), self.pad_id, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state
