"""Tokenizers for the data pipeline: one small interface, two implementations.

`WordTokenizer` (words, punctuation, "\n" and "###" as tokens; built from the data) serves synthetic tasks
such as ProsQA; `HFTokenizer` wraps a Hugging Face `tokenizers` file for real checkpoints. Both carry the
three COCONUT markers (⟨bot⟩ ⟨latent⟩ ⟨eot⟩) under the official spellings, which `stages` relies on.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import CoconutError

__all__ = [
    "START_LATENT",
    "LATENT",
    "END_LATENT",
    "Tokenizer",
    "WordTokenizer",
    "HFTokenizer",
    "load_tokenizer",
]

# The official spellings (facebookresearch/coconut adds these three to the base tokenizer).
START_LATENT = "<|start-latent|>"
LATENT = "<|latent|>"
END_LATENT = "<|end-latent|>"


class Tokenizer(ABC):
    """What `stages`, the collators and evaluation need from a tokenizer.

    ``encode`` never adds ⟨eos⟩; with ``add_special_tokens=True`` it applies the tokenizer's own template
    (e.g. a Llama BOS), as the official code does for the question only.
    """

    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    bot_id: int  # <|start-latent|>
    latent_id: int  # <|latent|>
    eot_id: int  # <|end-latent|>

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    @abstractmethod
    def save(self, path: str | Path) -> None: ...

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path) -> "Tokenizer": ...

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
        return frozenset({self.pad_token_id, self.eos_token_id, self.bot_id, self.latent_id, self.eot_id})


# ---------------------------------------------------------------------------------------------------------
# Word-level tokenizer

_WORD_KIND = "coconut-word-tokenizer"
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
_SPECIALS = (PAD, UNK, EOS, START_LATENT, LATENT, END_LATENT)
_FIXED = _SPECIALS + ("\n", "###")
_WORD_RE = re.compile("|".join(re.escape(s) for s in _SPECIALS) + r"|\n|###|\w+|[^\w\s]")
# Decoding re-inserts one space between tokens except around these (the spacing of natural English text).
_NO_SPACE_BEFORE = frozenset(".,?!;:)]}%\n")
_NO_SPACE_AFTER = frozenset("([{$\n")


def _split(text: str) -> list[str]:
    return _WORD_RE.findall(text)


class WordTokenizer(Tokenizer):
    """Word-level tokenizer for synthetic data.

    Tokens are words (``\\w+``), single punctuation marks, ``"\\n"``, ``"###"`` and the specials; other
    whitespace only separates tokens. Unknown words map to ``<unk>``. The vocabulary order is fixed:
    ``<pad> <unk> <eos> <|start-latent|> <|latent|> <|end-latent|> \\n ###`` then the remaining tokens
    sorted, so the same data always gives the same ids. ``decode(encode(t)) == t`` holds for text in
    canonical spacing: single spaces between words, none before ``.,?!;:`` or around ``"\\n"`` (every
    ProsQA record is such text).
    """

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if tuple(vocab[: len(_FIXED)]) != _FIXED:
            raise ValueError(f"vocab: must start with {list(_FIXED)}, got {vocab[:len(_FIXED)]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab: tokens must be unique")
        self.vocab = vocab
        self._ids = {t: i for i, t in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self.pad_token_id = self._ids[PAD]
        self.unk_token_id = self._ids[UNK]
        self.eos_token_id = self._ids[EOS]
        self.bot_id = self._ids[START_LATENT]
        self.latent_id = self._ids[LATENT]
        self.eot_id = self._ids[END_LATENT]

    @classmethod
    def from_texts(cls, texts: Iterable[str], extra_tokens: Iterable[str] = ()) -> "WordTokenizer":
        """Vocabulary = every token of ``texts`` plus ``extra_tokens`` (each split like text)."""
        words: set[str] = set()
        for t in texts:
            words.update(_split(t))
        for t in extra_tokens:
            words.update(_split(t))
        return cls(list(_FIXED) + sorted(words - set(_FIXED)))

    @classmethod
    def from_records(cls, records: Iterable[dict], extra_tokens: Iterable[str] = ()) -> "WordTokenizer":
        """Vocabulary of the questions, steps and answers of records in the official format."""

        def texts():
            for r in records:
                yield r["question"]
                yield from r["steps"]
                yield r["answer"]

        return cls.from_texts(texts(), extra_tokens)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # add_special_tokens is accepted for interface parity: this tokenizer has no BOS template.
        unk = self.unk_token_id
        return [self._ids.get(t, unk) for t in _split(text)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        special = self.special_ids
        out: list[str] = []
        prev = None
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: token id {i} outside the vocabulary [0, {self.vocab_size})")
            if skip_special_tokens and i in special:
                continue
            tok = self.vocab[i]
            glued = i in special or prev is None or prev in special
            if not glued and tok not in _NO_SPACE_BEFORE and self.vocab[prev] not in _NO_SPACE_AFTER:
                out.append(" ")
            out.append(tok)
            prev = i
        return "".join(out)

    def save(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"kind": _WORD_KIND, "version": 1, "vocab": self.vocab}, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if not isinstance(obj, dict) or obj.get("kind") != _WORD_KIND:
            raise ValueError(f"{path}: not a WordTokenizer file (expected kind {_WORD_KIND!r})")
        return cls(obj["vocab"])


# ---------------------------------------------------------------------------------------------------------
# Hugging Face `tokenizers` wrapper

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def _config_eos(folder: Path) -> str | None:
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CoconutError(f"{cfg}: not valid JSON ({e})") from None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    return eos.get("content") if isinstance(eos, dict) else eos


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (a ``tokenizer.json``) with the three latent markers.

    Missing markers are added as special tokens in the official order (start, end, latent), so on GPT-2
    they get the ids the official checkpoints use (50257, 50258, 50259). ⟨eos⟩ is ``eos_token`` or, when
    not given, the ``eos_token`` of a ``tokenizer_config.json`` next to the file, else the first of
    ``<|endoftext|> </s> <|end_of_text|> <eos> <|im_end|>`` in the vocabulary. The pad token defaults to
    ⟨eos⟩ (as the official code sets it); pads are masked out, so their id never matters.
    """

    def __init__(self, tokenizer, eos_token: str | None = None, pad_token: str | None = None, *,
                 source: str | None = None):
        """source: the file the tokenizer was read from, named in the errors."""
        from tokenizers import AddedToken

        self._source = source
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        for marker in (START_LATENT, END_LATENT, LATENT):
            if self._tok.token_to_id(marker) is None:
                self._tok.add_special_tokens([AddedToken(marker, special=True, normalized=False)])
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
            if eos_token is None:
                raise CoconutError(f"{self._where()}eos_token: none of {list(_EOS_CANDIDATES)} is in the vocabulary "
                                   "and no tokenizer_config.json beside it names one; pass eos_token")
        self.eos_token_id = self._id(eos_token, "eos_token")
        self.pad_token_id = self.eos_token_id if pad_token is None else self._id(pad_token, "pad_token")
        self.bot_id = self._tok.token_to_id(START_LATENT)
        self.latent_id = self._tok.token_to_id(LATENT)
        self.eot_id = self._tok.token_to_id(END_LATENT)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _where(self) -> str:
        return "" if self._source is None else f"{self._source}: "

    def _id(self, token: str, name: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CoconutError(f"{self._where()}{name}: {token!r} is not in the vocabulary")
        return i

    @classmethod
    def load(cls, path: str | Path, eos_token: str | None = None, pad_token: str | None = None) -> "HFTokenizer":
        """``path``: a ``tokenizer.json`` or a folder holding one (a Hugging Face checkpoint folder)."""
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"path: no tokenizer.json at {path}")
        if eos_token is None:
            eos_token = _config_eos(file.parent)
        try:
            raw = _HFTok.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception type for malformed files
            raise CoconutError(f"{file}: unreadable tokenizer ({e})") from None
        return cls(raw, eos_token=eos_token, pad_token=pad_token, source=str(file))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # pad = eos may be an ordinary token of the base vocabulary, so drop the ids ourselves
            special = self.special_ids
            ids = [i for i in ids if i not in special]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Writes the ``tokenizer.json`` (markers included); ⟨eos⟩/pad are found again by ``load``."""
        self._tok.save(str(path))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load whichever tokenizer ``path`` holds: a WordTokenizer JSON, a ``tokenizer.json`` or a folder."""
    path = Path(path)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            try:
                kind = json.load(f).get("kind")
            except (json.JSONDecodeError, AttributeError):
                kind = None
        if kind == _WORD_KIND:
            return WordTokenizer.load(path)
    return HFTokenizer.load(path)
