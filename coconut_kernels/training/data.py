"""The run's data: the records (read or generated), checked against the curriculum and the model, tokenized,
and dealt to the processes: one shuffle per epoch shared by every rank, each rank its share, each example laid
out for the epoch's stage.

Every process builds the same thing from the same config, so no data has to be broadcast.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

from ..data import (
    AlignedCollator,
    RaggedCollator,
    StageConfig,
    TokenizedRecord,
    build_example,
    generate_dataset,
    load_records,
    tokenize_records,
)
from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["load_data", "check_stages", "RunData", "prepare_data"]


def load_data(cfg: TrainConfig) -> tuple[list[dict], list[dict], str]:
    """(train records, validation records, where the validation records come from)."""
    if cfg.train_path is not None:
        train = _read(cfg.train_path, cfg.max_train_records, "train_path")
    else:
        train = generate_dataset(cfg.generate_train, seed=cfg.data_seed, size=cfg.generate_size,
                                 render=cfg.generate_render, chain=cfg.generate_chain)
    if cfg.val_path is not None and (Path(cfg.val_path).is_file() or cfg.val_if_missing == "error"):
        val, source = _read(cfg.val_path, cfg.max_val_records, "val_path"), cfg.val_path
    else:
        val = generate_dataset(cfg.generate_val, seed=cfg.data_seed + 1, size=cfg.generate_size,
                               render=cfg.generate_render, chain=cfg.generate_chain)
        source = (f"generated ({cfg.generate_val} {cfg.generate_size} problems, {cfg.generate_render} render, "
                  f"{cfg.generate_chain} chain, seed {cfg.data_seed + 1})")
        if cfg.max_val_records is not None:
            val = val[: cfg.max_val_records]
    if not train:
        raise ConfigError("training data: no records (train_path empty or generate_train 0)")
    if not val:
        raise ConfigError(f"validation data: no records ({source})")
    return train, val, source


def _read(path: str, max_records: int | None, key: str) -> list[dict]:
    if not Path(path).is_file():
        raise ConfigError(f"config key {key!r}: data file {path} not found")
    try:
        return load_records(path, max_records)
    except ValueError as e:  # its message names the file
        raise ConfigError(str(e)) from None


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
            raise ConfigError(f"config key {name!r}: stage {stage} is past the data's steps: the longest "
                             f"{which} record (record {longest}) has {n} reasoning steps")


@dataclass
class RunData:
    """The tokenized splits and how this rank walks the training split: ``n_micro`` micro-batches of
    ``batch_size`` per epoch, every rank the same number (``per_rank`` examples, a whole share of the
    world)."""

    train: list[TokenizedRecord]
    val: list[TokenizedRecord]
    val_source: str
    tokenizer: object
    stage_config: StageConfig
    collator: object
    batch_size: int
    seed: int
    rank: int
    world: int
    per_rank: int
    n_micro: int

    def epoch_batches(self, epoch: int, stage: int) -> list[list]:
        """This rank's micro-batches of `epoch`: one global shuffle (the same on every rank), this rank's
        share of it, each example laid out for `stage` (uniform_prob draws from a per-rank stream)."""
        order = list(range(len(self.train)))
        random.Random(f"shuffle-{self.seed}-{epoch}").shuffle(order)
        mine = order[: self.per_rank * self.world][self.rank::self.world]
        rng = random.Random(f"stages-{self.seed}-{epoch}-{self.rank}")
        examples = [build_example(self.train[i], stage, self.stage_config, self.tokenizer, rng) for i in mine]
        bs = self.batch_size
        return [examples[i:i + bs] for i in range(0, len(examples), bs)]


def prepare_data(cfg: TrainConfig, train: list[dict], val: list[dict], val_source: str, tokenizer,
                 max_position: int, rank: int, world: int) -> RunData:
    """Tokenize both splits and check that every training record fits the model at every stage."""
    stage_config = cfg.stage_config()
    collator_cls = RaggedCollator if cfg.collate == "ragged" else AlignedCollator
    train_tok, val_tok = tokenize_records(train, tokenizer), tokenize_records(val, tokenizer)
    _check_lengths(cfg, train_tok, stage_config, tokenizer, max_position)
    # every rank takes the same number of examples (a whole multiple of the world size) each epoch
    per_rank = len(train_tok) // world
    if per_rank == 0:
        raise ConfigError(f"training data: {len(train_tok)} records cannot be shared by {world} processes")
    return RunData(train=train_tok, val=val_tok, val_source=val_source,
                   tokenizer=tokenizer, stage_config=stage_config, collator=collator_cls.from_tokenizer(tokenizer),
                   batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world=world, per_rank=per_rank,
                   n_micro=math.ceil(per_rank / cfg.batch_size))


def _check_lengths(cfg: TrainConfig, train: list[TokenizedRecord], stage_config: StageConfig, tokenizer,
                   limit: int) -> None:
    """Refuse up front (not mid-run) a record that does not fit the model at some stage."""
    # past max_latent_stage every layout is the same (all steps replaced), and uniform_prob may draw any;
    # uniform mixing only picks among these layouts, so it is left out here
    last = (cfg.max_latent_stage if cfg.uses_latents else 0) + 1
    plain = dataclasses.replace(stage_config, uniform_prob=0.0)
    for rec in train:
        for stage in range(last + 1):
            n = len(build_example(rec, stage, plain, tokenizer).input_ids)
            if n > limit:
                raise ConfigError(f"training record {rec.idx}: {n} tokens at stage {stage}, more than the "
                                 f"model's max_position {limit}")
