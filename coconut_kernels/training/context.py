"""What one process of a run holds while it trains: the config, its place in the world, the data, the model
and its wrapper, the metric log, and what the run has produced so far. Built by `coconut_kernels.train`,
passed to the loop, evaluation and checkpointing units."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..latent import LatentLM
from .config import TrainConfig
from .data import RunData
from .distributed import Parallel
from .metrics import MetricsLog

__all__ = ["RunContext"]


@dataclass
class RunContext:
    cfg: TrainConfig
    device: torch.device
    data: RunData
    lm: LatentLM
    par: Parallel
    resume_from: Path | None = None  # the checkpoint the weights (and, when training, the position) come from
    state: dict | None = None  # its trainer state when training resumes
    run_id: str | None = None  # the save folder's run (training.savedir)
    log: MetricsLog | None = None  # opened once every check has passed (training.savedir.claim_save_dir)
    t0: float = field(default_factory=time.perf_counter)
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None

    @property
    def rank(self) -> int:
        return self.par.rank

    @property
    def world(self) -> int:
        return self.par.world

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 2)
