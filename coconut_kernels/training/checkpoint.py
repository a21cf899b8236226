"""Checkpoints of the trainer: weights as safetensors, optimizer and progress as a torch file, written to a
temporary folder and renamed into place, so a partly written checkpoint never replaces a good one.

Layout of ``save_dir/step-000120/``: ``model.safetensors`` (the full LatentLM state dict: model.* and the
feedback's parameters), ``model_config.json`` (family + model config), ``tokenizer.json``,
``trainer_state.pt`` (optimizer state, step, epoch, batches done in the epoch, RNG states), ``config.yaml``
(the run's TrainConfig). ``save_dir/latest`` names the newest complete one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

if TYPE_CHECKING:
    from .config import TrainConfig
    from .context import RunContext

__all__ = ["save_checkpoint", "load_weights", "load_trainer_state", "latest_checkpoint", "read_model_config",
           "is_checkpoint", "resume_path", "save_run"]

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
STATE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a coconut-train checkpoint folder (rather than a Hugging Face one)."""
    return (Path(path) / MODEL_CONFIG).is_file()


def save_checkpoint(save_dir: str | Path, step: int, model_state: dict, model_config, family: str, tokenizer,
                    trainer_state: dict | None, config: dict, keep: int = 2) -> Path:
    """Write ``save_dir/step-{step}`` atomically; keep the newest ``keep`` checkpoints. Returns its path."""
    from safetensors.torch import save_file

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    final = save_dir / f"step-{step:06d}"
    tmp = save_dir / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MODEL_CONFIG).write_text(json.dumps({"family": family, **dataclasses.asdict(model_config)},
                                                   indent=1))
        tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step: move the old one aside only once the new one is complete
        old = save_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    latest_tmp = save_dir / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, save_dir / "latest")
    _prune(save_dir, keep)
    return final


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _prune(save_dir: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in save_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``save_dir`` (the one ``latest`` names, else the highest step)."""
    save_dir = Path(save_dir)
    pointer = save_dir / "latest"
    if pointer.is_file():
        p = save_dir / pointer.read_text().strip()
        if p.is_dir():
            return p
    steps = sorted((int(m.group(1)), p) for p in save_dir.glob("step-*") if (m := _NAME.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def read_model_config(path: str | Path) -> dict:
    file = Path(path) / MODEL_CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable checkpoint model config ({e})") from None
    if not isinstance(cfg, dict) or "family" not in cfg:
        raise ValueError(f"{file}: not a coconut-train model config (no 'family')")
    return cfg


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise ValueError(f"{file}: checkpoint weights not found")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"{file}: unreadable checkpoint weights ({type(e).__name__}: {e})") from None


def load_trainer_state(path: str | Path) -> dict:
    file = Path(path) / STATE
    if not file.is_file():
        raise ValueError(f"{file}: trainer state not found (a weights-only checkpoint cannot be resumed; "
                         f"use init_from)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: unreadable trainer state ({type(e).__name__}: {e})") from None
    for key in ("step", "epoch", "batches_done", "optimizer"):
        if key not in state:
            raise ValueError(f"{file}: trainer state lacks {key!r}")
    return state


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint `cfg.resume` names: None (a fresh run), save_dir's latest, or the given folder."""
    if cfg.resume is False:
        return None
    if cfg.resume is True:
        path = latest_checkpoint(cfg.save_dir)
        if path is None:
            raise ValueError(f"config key 'resume': no checkpoint in save_dir {cfg.save_dir}")
        return path
    path = Path(cfg.resume)
    if not path.is_dir():
        raise ValueError(f"config key 'resume': checkpoint folder {path} not found")
    return path


def save_run(ctx: RunContext, optimizer, step: int, epoch: int, batches_done: int) -> None:
    """Checkpoint the run at optimizer step `step`, `batches_done` micro-batches into `epoch`; every rank
    calls it (the full state dicts are collective under FSDP), rank 0 writes."""
    model_state = ctx.par.model_state()
    optim_state = ctx.par.optimizer_state(optimizer)
    if ctx.rank == 0:
        trainer_state = {"step": step, "epoch": epoch, "batches_done": batches_done, "world_size": ctx.world,
                         "optimizer": optim_state, "torch_rng": torch.get_rng_state(), "method": ctx.cfg.method}
        ctx.last_checkpoint = save_checkpoint(
            ctx.cfg.save_dir, step, model_state, ctx.lm.model.config, _family(ctx.lm.model), ctx.tokenizer,
            trainer_state, ctx.cfg.to_dict(), keep=ctx.cfg.keep_checkpoints)
    ctx.par.barrier()


def _family(model) -> str:
    from ..models import GPT2

    return "gpt2" if isinstance(model, GPT2) else "llama"
