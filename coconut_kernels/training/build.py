"""What a training run is built from: its records (read or generated), its tokenizer and its LatentLM
(a fresh config, a Hugging Face checkpoint folder or a coconut-train checkpoint).

`coconut_kernels.train` calls these once per process; every process builds the same thing from the same
config, so no data or weights have to be broadcast.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..data import (
    WordTokenizer,
    concept_nouns,
    generate_dataset,
    load_records,
    load_tokenizer,
    person_names,
)
from ..interop.markers import add_latent_tokens, load_folder_tokenizer
from ..interop.official import load_official_weights
from ..latent import LatentLM
from .checkpoint import TOKENIZER, is_checkpoint, load_weights, read_model_config
from .config import TrainConfig

__all__ = ["load_data", "build_tokenizer", "build_lm", "check_stages"]


def load_data(cfg: TrainConfig) -> tuple[list[dict], list[dict], str]:
    """(train records, validation records, where the validation records come from)."""
    if cfg.train_path is not None:
        train = _read(cfg.train_path, cfg.max_train_records, "train_path")
    else:
        train = generate_dataset(cfg.generate_train, seed=cfg.data_seed)
    if cfg.val_path is not None and (Path(cfg.val_path).is_file() or cfg.val_if_missing == "error"):
        val, source = _read(cfg.val_path, cfg.max_val_records, "val_path"), cfg.val_path
    else:
        val = generate_dataset(cfg.generate_val, seed=cfg.data_seed + 1)
        source = f"generated ({cfg.generate_val} problems, seed {cfg.data_seed + 1})"
        if cfg.max_val_records is not None:
            val = val[: cfg.max_val_records]
    if not train:
        raise ValueError("training data: no records (train_path empty or generate_train 0)")
    if not val:
        raise ValueError(f"validation data: no records ({source})")
    return train, val, source


def _read(path: str, max_records: int | None, key: str) -> list[dict]:
    if not Path(path).is_file():
        raise ValueError(f"config key {key!r}: data file {path} not found")
    try:
        return load_records(path, max_records)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def build_tokenizer(cfg: TrainConfig, train: list[dict], checkpoint: Path | None):
    """The checkpoint's tokenizer when resuming or starting from one of ours; else `tokenizer`; else the
    Hugging Face checkpoint's; else a word tokenizer of the training data plus every ProsQA concept noun and
    person name (so a generated or published validation split has no unknown words)."""
    source = checkpoint if checkpoint is not None else (
        Path(cfg.init_from) if cfg.init_from and is_checkpoint(cfg.init_from) else None)
    if source is not None:
        return load_tokenizer(source / TOKENIZER)
    if cfg.tokenizer is not None:
        if not Path(cfg.tokenizer).exists():
            raise ValueError(f"config key 'tokenizer': {cfg.tokenizer} not found")
        return load_tokenizer(cfg.tokenizer)
    if cfg.init_from is not None:
        return load_folder_tokenizer(cfg.init_from)
    return WordTokenizer.from_records(train, extra_tokens=concept_nouns() + person_names())


def _model_from_dict(spec: dict, vocab_size: int, where: str):
    from ..models import GPT2, GPT2Config, Llama, LlamaConfig

    spec = dict(spec)
    family = spec.pop("family", "gpt2")
    config_cls, model_cls = {"gpt2": (GPT2Config, GPT2), "llama": (LlamaConfig, Llama)}[family]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(spec.keys() - names)
    if unknown:
        raise ValueError(f"{where}: config key(s) {', '.join('model.' + k for k in unknown)} do not exist for "
                         f"family {family!r}; valid: {', '.join(sorted(names))}")
    spec.setdefault("vocab_size", vocab_size)
    if spec["vocab_size"] < vocab_size:
        raise ValueError(f"{where}: model.vocab_size {spec['vocab_size']} is smaller than the tokenizer's "
                         f"{vocab_size}")
    return model_cls(config_cls(**spec))


def build_lm(cfg: TrainConfig, tokenizer, checkpoint: Path | None) -> LatentLM:
    """The LatentLM to train, in fp32 on the CPU (the caller moves it). Weights: the resume checkpoint's,
    else init_from's (ours or Hugging Face's), else a fresh `model` config initialised from `seed`."""
    from ..models import from_pretrained

    ours = checkpoint if checkpoint is not None else (
        Path(cfg.init_from) if cfg.init_from and is_checkpoint(cfg.init_from) else None)
    torch.manual_seed(cfg.seed)
    if ours is not None:
        spec = read_model_config(ours)
        model = _model_from_dict(spec, tokenizer.vocab_size, f"checkpoint {ours}")
    elif cfg.init_from is not None:
        if not Path(cfg.init_from).is_dir():
            raise ValueError(f"config key 'init_from': {cfg.init_from} is not a folder")
        try:
            model = from_pretrained(cfg.init_from, dtype=torch.float32)
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"init_from {cfg.init_from}: cannot load the checkpoint ({e})") from None
        add_latent_tokens(model, tokenizer)  # the official marker rows: copies of "<<"
    else:
        model = _model_from_dict(cfg.model, tokenizer.vocab_size, "config key 'model'")
    lm = LatentLM(model, tokenizer.latent_id, tokenizer.bot_id, tokenizer.eot_id, tokenizer.eos_token_id,
                  feedback=cfg.feedback_mode)
    if ours is not None:
        state = load_weights(ours)
        try:
            lm.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{ours}: weights do not fit the model ({e})") from None
    elif cfg.load_model_path is not None:
        load_official_weights(lm, cfg.load_model_path, tokenizer)
    return lm


def check_stages(cfg: TrainConfig, train: list[dict], val: list[dict]) -> None:
    """A stage past every record's steps replaces nothing more: refuse a curriculum or an evaluation stage
    that the data cannot give meaning to, naming the stage and the longest record."""
    if not cfg.uses_latents:
        return
    for name, records, stage in (("max_latent_stage", train, cfg.max_latent_stage),
                                 ("eval_stage", val, cfg.eval_stage)):
        if stage is None:
            continue
        longest = max(range(len(records)), key=lambda i: len(records[i]["steps"]))
        n = len(records[longest]["steps"])
        if stage > n:
            which = "training" if records is train else "validation"
            raise ValueError(f"config key {name!r}: stage {stage} is past the data's steps: the longest "
                             f"{which} record (record {longest}) has {n} reasoning steps")


def device_of(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 when not launched by it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))
