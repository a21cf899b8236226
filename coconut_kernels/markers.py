"""The three COCONUT markers as the official code adds them: ``<|start-latent|>``, ``<|end-latent|>``,
``<|latent|>`` appended to the tokenizer in that order (start=V, end=V+1, latent=V+2 on a vocabulary of V),
the embedding and LM head grown to match, and the new rows copied from the row of the token ``<<``.

`LatentLM.__init__` and `LatentLM.from_pretrained` call these; the trainer grows its models with
`add_latent_tokens` too, so every path gives a checkpoint the same ids and the same first rows.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .data.tokenizer import END_LATENT, LATENT, START_LATENT, HFTokenizer, Tokenizer, _config_eos
from .errors import CheckpointError, CoconutError
from .validation import check_special_ids

__all__ = ["LatentIds", "MARKERS", "add_latent_tokens",
           "load_folder_tokenizer", "resolve_ids"]

log = logging.getLogger("coconut_kernels")

# The official order: run.py calls add_tokens for these one after the other.
MARKERS = (START_LATENT, END_LATENT, LATENT)
# The token whose rows the official code copies into the new ones ("it helps stabilize the training").
INIT_TOKEN = "<<"


class LatentIds(NamedTuple):
    start_latent_id: int
    end_latent_id: int
    latent_token_id: int


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


def _raw_from_folder(folder: Path):
    """The folder's `tokenizers.Tokenizer`: tokenizer.json (what transformers' fast tokenizers read first),
    else a GPT-2 style vocab.json + merges.txt (byte-level BPE, as GPT2TokenizerFast converts them) with
    added_tokens.json; None when the folder has neither."""
    from tokenizers import AddedToken, Tokenizer as RawTokenizer, decoders, models, pre_tokenizers

    if (folder / "tokenizer.json").is_file():
        try:
            return RawTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises its own Exception type for malformed files
            raise CheckpointError(f"{folder / 'tokenizer.json'}: unreadable tokenizer ({e})") from None
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return None
    raw = RawTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    added = folder / "added_tokens.json"
    if added.is_file():
        for token, _ in sorted(json.loads(added.read_text(encoding="utf-8")).items(), key=lambda kv: kv[1]):
            raw.add_tokens([AddedToken(token, normalized=False)])
    return raw


def _ensure_markers(raw, where: str) -> tuple[LatentIds, set[int]]:
    """Add the missing markers to a `tokenizers.Tokenizer` in the official order; (their ids, the ids just
    added). Markers already there must sit on three consecutive ids, as the official code leaves them."""
    from tokenizers import AddedToken

    added = set()
    for marker in MARKERS:
        if raw.token_to_id(marker) is None:
            raw.add_special_tokens([AddedToken(marker, special=True, normalized=False)])
            added.add(raw.token_to_id(marker))
    ids = LatentIds(*(raw.token_to_id(m) for m in MARKERS))
    if max(ids) - min(ids) != 2:
        found = ", ".join(f"{m}={i}" for m, i in zip(MARKERS, ids))
        raise CheckpointError(f"{where}: the latent markers exist but are not on consecutive ids ({found}); the "
                              f"official code appends them together at the end of the vocabulary")
    return ids, added


def load_folder_tokenizer(folder, *, required: bool = True) -> HFTokenizer | None:
    """The folder's tokenizer with the three markers (None for a folder without tokenizer files when not
    ``required``). It remembers which markers its files lacked: `add_latent_tokens` initialises their rows
    even where the model already has rows for those ids (a vocabulary padded past the tokenizer's)."""
    folder = Path(folder)
    raw = _raw_from_folder(folder)
    if raw is None:
        if not required:
            return None
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(f"{folder}: no tokenizer (expected tokenizer.json, or vocab.json + merges.txt; found "
                              f"{found}); pass latent_token_id, start_latent_id, end_latent_id and eos_token_id, "
                              f"or tokenizer=")
    _, added = _ensure_markers(raw, str(folder))
    source = folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else folder / "vocab.json"
    tokenizer = HFTokenizer(raw, eos_token=_config_eos(folder), source=str(source))
    tokenizer._new_marker_ids = added
    return tokenizer


def _markers_of(tokenizer, where: str) -> tuple[LatentIds, set[int], int | None, int]:
    """(marker ids, ids added now, id of "<<" or None, vocabulary size) of any supported tokenizer."""
    if isinstance(tokenizer, HFTokenizer):
        raw = tokenizer._tok
        ids = LatentIds(tokenizer.bot_id, tokenizer.eot_id, tokenizer.latent_id)
        # once: the rows are initialised by the first model grown with this tokenizer (idempotence)
        added, tokenizer._new_marker_ids = getattr(tokenizer, "_new_marker_ids", set()), set()
        return ids, added, raw.token_to_id(INIT_TOKEN), tokenizer.vocab_size
    if isinstance(tokenizer, Tokenizer):  # the word tokenizer: markers fixed in its vocabulary
        ids = LatentIds(tokenizer.bot_id, tokenizer.eot_id, tokenizer.latent_id)
        init = getattr(tokenizer, "_ids", {}).get(INIT_TOKEN)
        return ids, set(), init, tokenizer.vocab_size
    if hasattr(tokenizer, "token_to_id") and hasattr(tokenizer, "add_special_tokens"):  # tokenizers.Tokenizer
        ids, added = _ensure_markers(tokenizer, where)
        return ids, added, tokenizer.token_to_id(INIT_TOKEN), tokenizer.get_vocab_size(with_added_tokens=True)
    if hasattr(tokenizer, "convert_tokens_to_ids") and hasattr(tokenizer, "add_tokens"):  # transformers
        vocab = tokenizer.get_vocab()
        added = set()
        for marker in MARKERS:  # run.py's calls, in its order
            if marker not in vocab:
                tokenizer.add_tokens(marker)
                added.add(tokenizer.convert_tokens_to_ids(marker))
        ids = LatentIds(*(tokenizer.convert_tokens_to_ids(m) for m in MARKERS))
        if max(ids) - min(ids) != 2:
            raise CheckpointError(f"{where}: the latent markers exist but are not on consecutive ids {tuple(ids)}")
        return ids, added, tokenizer.get_vocab().get(INIT_TOKEN), len(tokenizer)
    raise CoconutError(f"tokenizer: expected a coconut_kernels.data Tokenizer, a tokenizers.Tokenizer or a "
                       f"transformers tokenizer, got {type(tokenizer).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Models


def _grow_rows(weight: torch.Tensor, n: int) -> torch.Tensor:
    out = weight.new_empty(n, weight.shape[1])
    out[: weight.shape[0]] = weight
    return out


@torch.no_grad()
def _grow(model: nn.Module, n: int, rows: list[int], init: int | None) -> None:
    """Grow `model` (ours or a transformers model) to n rows; rows new in it get the mean row, then the
    marker rows listed in `rows` get the row of `init` (the mean when None), embedding and head alike."""
    if hasattr(model, "get_input_embeddings") and not hasattr(model, "embed_tokens"):  # transformers
        old = model.get_input_embeddings().weight.shape[0]
        if n > old:
            model.resize_token_embeddings(n)
        tables = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not tables[0]:
            tables.append(head.weight)
    else:
        old = model.embed_tokens.num_embeddings
        if n > old:
            emb = model.embed_tokens
            model.embed_tokens = nn.Embedding(n, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
            model.embed_tokens.weight.copy_(_grow_rows(emb.weight, n))
            if not model.config.tie_embeddings:
                head = model.lm_head
                model.lm_head = nn.Linear(head.in_features, n, bias=False, device=head.weight.device,
                                          dtype=head.weight.dtype)
                model.lm_head.weight.copy_(_grow_rows(head.weight, n))
            model.config.vocab_size = n
        tables = [model.embed_tokens.weight] + ([] if model.config.tie_embeddings else [model.lm_head.weight])
    for w in tables:
        mean = w[:old].float().mean(0).to(w.dtype)
        w[old:] = mean
        for r in rows:
            w[r] = w[init] if init is not None else mean


def add_latent_tokens(model: nn.Module, tokenizer) -> LatentIds:
    """Give `tokenizer` and `model` the three COCONUT markers as the official code does; returns their ids
    (start_latent_id, end_latent_id, latent_token_id) = (V, V+1, V+2) on a tokenizer of V tokens.

    model: a `coconut_kernels.models` model, a `LatentLM` (its model) or a transformers causal LM; the
    embedding and the LM head (tied or not) grow to the tokenizer's size. tokenizer: a
    `coconut_kernels.data` tokenizer (which carries the markers already), a `tokenizers.Tokenizer` or a
    transformers tokenizer (the missing markers are added to it). Rows that are new in the model, or
    whose marker is new in the tokenizer, start as the row of ``<<`` (the official initialisation), or as
    the mean row when the tokenizer has no ``<<`` (logged). Calling it again changes nothing.
    """
    ids, added, init, vocab = _markers_of(tokenizer, "tokenizer")
    return _add_rows(model, ids, added, init, vocab)


def _add_rows(model: nn.Module, ids: LatentIds, added: set[int], init: int | None, vocab: int) -> LatentIds:
    from .latent import LatentLM

    if isinstance(model, LatentLM):
        model = model.model
    if hasattr(model, "embed_tokens"):
        old = model.embed_tokens.num_embeddings
    elif hasattr(model, "get_input_embeddings"):
        old = model.get_input_embeddings().weight.shape[0]
    else:
        raise CoconutError(f"model: expected a coconut_kernels model, a LatentLM or a transformers causal LM, got "
                           f"{type(model).__name__}")
    n = max(old, vocab, max(ids) + 1)
    fresh = [i for i in ids if i >= old or i in added]
    if n == old and not fresh:
        return ids
    if init is not None and init >= old:
        init = None
    if fresh:
        how = f"the row of {INIT_TOKEN!r} (id {init})" if init is not None else \
            f"the mean row (the tokenizer has no {INIT_TOKEN!r} token)"
        log.info("add_latent_tokens: rows %s (%s) initialised from %s", fresh,
                 ", ".join(m for m, i in zip(MARKERS, ids) if i in fresh), how)
    _grow(model, n, fresh, init)
    return ids


def resolve_ids(model: nn.Module, tokenizer, latent_token_id, start_latent_id, end_latent_id,
                eos_token_id) -> tuple[int, int, int, int]:
    """LatentLM's ids: the explicit ones, the rest from `tokenizer` (markers added as `add_latent_tokens`
    does); (latent, start, end, eos), validated."""
    given = (latent_token_id, start_latent_id, end_latent_id, eos_token_id)
    if any(v is None for v in given):
        if tokenizer is None:
            missing = [n for n, v in zip(("latent_token_id", "start_latent_id", "end_latent_id", "eos_token_id"),
                                         given) if v is None]
            raise CoconutError(f"{', '.join(missing)}: not given; pass them or tokenizer= (LatentLM.from_pretrained "
                               f"reads them from the folder's tokenizer)")
        ids = add_latent_tokens(model, tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        latent_token_id = ids.latent_token_id if latent_token_id is None else latent_token_id
        start_latent_id = ids.start_latent_id if start_latent_id is None else start_latent_id
        end_latent_id = ids.end_latent_id if end_latent_id is None else end_latent_id
        eos_token_id = eos if eos_token_id is None else eos_token_id
        if eos_token_id is None:
            raise CoconutError("eos_token_id: the tokenizer has none; pass eos_token_id")
    check_special_ids(model.embed_tokens.num_embeddings, latent_token_id, start_latent_id, end_latent_id,
                      eos_token_id)
    return latent_token_id, start_latent_id, end_latent_id, eos_token_id
