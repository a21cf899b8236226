"""What a training run is built from besides its data: its tokenizer, its LatentLM (a fresh config, a Hugging
Face checkpoint folder or a coconut-train checkpoint) and its optimizer.

`coconut_kernels.train` calls these once per process; every process builds the same thing from the same
config, so no data or weights have to be broadcast.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from ..data import (
    WordTokenizer,
    concept_nouns,
    load_tokenizer,
    person_names,
)
from ..errors import CheckpointError, ConfigError
from ..markers import add_latent_tokens, load_folder_tokenizer
from ..interop.official import load_official_weights
from ..latent import LatentLM
from .checkpoint import TOKENIZER, is_checkpoint, load_weights, read_model_config, resolve_source
from .config import TrainConfig

__all__ = ["build_tokenizer", "build_lm", "make_optimizer", "resolve_init_from"]


def build_tokenizer(cfg: TrainConfig, train: list[dict], checkpoint: Path | None, init: Path | None = None):
    """The checkpoint's tokenizer when resuming or starting from one of ours; else `tokenizer`; else the
    Hugging Face checkpoint's; else a word tokenizer of the training data plus every ProsQA concept noun and
    person name (so a generated or published validation split has no unknown words). `init`: the caller's
    `resolve_init_from(cfg)`, so that the tokenizer and the model come from the same checkpoint of a save
    folder; resolved here when not given."""
    init = init if init is not None else resolve_init_from(cfg)
    source = _ours(checkpoint, init)
    if source is not None:
        return load_tokenizer(source / TOKENIZER)
    if cfg.tokenizer is not None:
        if not Path(cfg.tokenizer).exists():
            raise ConfigError(f"config key 'tokenizer': {cfg.tokenizer} not found")
        return load_tokenizer(cfg.tokenizer)
    if init is not None:
        return load_folder_tokenizer(init)
    return WordTokenizer.from_records(train, extra_tokens=concept_nouns() + person_names())


def _model_from_dict(spec: dict, vocab_size: int, where: str):
    from ..models import GPT2, GPT2Config, Llama, LlamaConfig

    spec = dict(spec)
    family = spec.pop("family", "gpt2")
    config_cls, model_cls = {"gpt2": (GPT2Config, GPT2), "llama": (LlamaConfig, Llama)}[family]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(spec.keys() - names)
    if unknown:
        raise ConfigError(f"{where}: config key(s) {', '.join('model.' + k for k in unknown)} do not exist for "
                          f"family {family!r}; valid: {', '.join(sorted(names))}")
    spec.setdefault("vocab_size", vocab_size)
    _check_dims(spec, config_cls, where, model_cls.dropout_fields)
    if spec["vocab_size"] < vocab_size:
        raise ConfigError(f"{where}: model.vocab_size {spec['vocab_size']} is smaller than the tokenizer's "
                          f"{vocab_size}")
    try:
        config = config_cls(**spec)
    except (TypeError, ValueError) as e:  # the model config's own checks (e.g. d_model a multiple of n_head)
        raise ConfigError(f"{where}: {e}") from None
    return model_cls(config)


def build_lm(cfg: TrainConfig, tokenizer, checkpoint: Path | None, init: Path | None = None) -> LatentLM:
    """The LatentLM to train, in fp32 on the CPU (the caller moves it). Weights: the resume checkpoint's,
    else init_from's (ours or Hugging Face's), else a fresh `model` config initialised from `seed`. Dropout: the
    model config's, or `dropout` when set. `init`: as for `build_tokenizer`."""
    init = init if init is not None else resolve_init_from(cfg)
    ours = _ours(checkpoint, init)
    torch.manual_seed(cfg.seed)
    if ours is not None:
        spec = read_model_config(ours)
        model = _model_from_dict(spec, tokenizer.vocab_size, f"checkpoint {ours}")
    elif init is not None:
        model = _load_hf(init)
        add_latent_tokens(model, tokenizer)  # the official marker rows: copies of "<<"
    else:
        model = _model_from_dict(cfg.model, tokenizer.vocab_size, "config key 'model'")
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    lm = LatentLM(model, tokenizer.latent_id, tokenizer.bot_id, tokenizer.eot_id, tokenizer.eos_token_id,
                  feedback=cfg.feedback_mode)
    if ours is not None:
        state = load_weights(ours)
        try:
            lm.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{ours}: weights do not fit the model ({e})") from None
    elif cfg.load_model_path is not None:
        load_official_weights(lm, cfg.load_model_path, tokenizer)
    if checkpoint is None and cfg.marker_init is not None:
        init_marker_rows(lm, tokenizer, cfg.marker_init)
    return lm


@torch.no_grad()
def init_marker_rows(lm: LatentLM, tokenizer, text: str) -> int:
    """The embedding rows of <bot>, <eot> and <latent> become the row of the one token `text` encodes to (its id
    is returned). An untied LM head keeps its rows, so the model does not start writing markers where it wrote
    that token; a tied head shares the embedding's rows (as with the official initialisation).

    A CoT checkpoint never read the markers, so its marker rows are untrained; the official run.py gives the rows
    it adds the row of "<<". With "\n", the line break that ends every question, <bot> first reads like the line
    break after which a CoT model writes its first step, and the thoughts start from the chain's tokens
    (README, "Walking back from the options")."""
    ids = tokenizer.encode(text)
    if len(ids) != 1 or ids[0] in (lm.latent_token_id, lm.start_latent_id, lm.end_latent_id):
        raise ConfigError(f"config key 'marker_init': expected the text of one token other than a marker, got "
                          f"{text!r} (the tokenizer encodes it as {ids})")
    weight = lm.model.embed_tokens.weight
    for marker in (lm.start_latent_id, lm.end_latent_id, lm.latent_token_id):
        weight[marker] = weight[ids[0]]
    return ids[0]


def _ours(checkpoint: Path | None, init: Path | None) -> Path | None:
    """The coconut-train checkpoint the model and tokenizer come from: the resume checkpoint, else init_from's
    when it is one of ours (not a Hugging Face folder)."""
    if checkpoint is not None:
        return checkpoint
    return init if init is not None and is_checkpoint(init) else None


def resolve_init_from(cfg: TrainConfig) -> Path | None:
    """The folder `init_from` names: a checkpoint (ours or Hugging Face's), or a coconut-train save folder's
    newest checkpoint; None when unset."""
    if cfg.init_from is None:
        return None
    if not Path(cfg.init_from).is_dir():
        what = "is not a folder" if Path(cfg.init_from).exists() else "does not exist"
        raise CheckpointError(f"config key 'init_from': the folder {cfg.init_from} {what}")
    try:
        return Path(resolve_source(cfg.init_from))
    except CheckpointError as e:
        raise CheckpointError(f"config key 'init_from': {e}") from None


def _load_hf(folder: Path):
    """The model of the Hugging Face folder `init_from` in fp32; an unreadable file is named."""
    from ..models import from_pretrained

    config = folder / "config.json"
    try:
        json.loads(config.read_text())
    except OSError as e:
        raise CheckpointError(f"config key 'init_from': {config}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise CheckpointError(f"config key 'init_from': {config}: not valid JSON ({e})") from None
    try:
        return from_pretrained(folder, dtype=torch.float32)
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"config key 'init_from': {folder}: cannot load the checkpoint ({e})") from None
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupt file
        weights = [p.name for p in sorted(folder.glob("*.safetensors"))] or ["model.safetensors"]
        raise CheckpointError(f"config key 'init_from': {folder / weights[0]}: unreadable weights "
                              f"({type(e).__name__}: {e})") from None


# integer fields of a model config that are sizes (>= 1 when given); float fields must be finite and > 0
_SIZES = ("vocab_size", "n_layer", "n_head", "d_model", "max_position", "d_ff", "n_kv_head", "head_dim",
          "sliding_window")


def _check_dims(spec: dict, config_cls, where: str, probabilities: tuple[str, ...] = ()) -> None:
    """Sizes >= 1, other floats > 0; `probabilities` (dropout, may be 0) are left to the config's own check."""
    floats = {f.name for f in dataclasses.fields(config_cls) if str(f.type).startswith("float")} - set(probabilities)
    for key, value in spec.items():
        if key in _SIZES and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}: model.{key}: expected an int >= 1, got {value!r}")
        if key in floats and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"{where}: model.{key}: expected a finite number > 0, got {value!r}")


def make_optimizer(cfg: TrainConfig, lm: LatentLM) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with `weight_decay` on all of them (the official run.py), or
    with `weight_decay_scope: matrices` only on matrices and embeddings (none on biases and norm weights)."""
    params = [p for p in lm.parameters() if p.requires_grad]
    if cfg.weight_decay_scope == "all":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas))
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))
