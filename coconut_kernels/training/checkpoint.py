"""Checkpoints of the trainer: weights as safetensors, optimizer and progress as a torch file, written to a
temporary folder and renamed into place, so a partly written checkpoint never replaces a good one.

Layout of ``save_dir/step-000120/``: ``model.safetensors`` (the full LatentLM state dict: model.* and the
feedback's parameters), ``model_config.json`` (family + model config), ``tokenizer.json``,
``trainer_state.pt`` (optimizer state, step, epoch, batches done in the epoch, RNG states), ``config.yaml``
(the run's TrainConfig), ``run.json`` (the id of the run that wrote it). ``save_dir/latest`` names the newest
complete one.
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

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .config import TrainConfig
    from .context import RunContext

__all__ = ["save_checkpoint", "load_weights", "load_trainer_state", "latest_checkpoint", "resolve_source",
           "read_model_config", "is_checkpoint", "resume_path", "save_run", "run_id_of"]

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
STATE = "trainer_state.pt"
RUN_FILE = "run.json"  # {"run_id": ...}: which run wrote the checkpoint (see training.savedir)
_NAME = re.compile(r"^step-(\d+)$")


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a coconut-train checkpoint folder (rather than a Hugging Face one)."""
    return (Path(path) / MODEL_CONFIG).is_file()


def save_checkpoint(save_dir: str | Path, step: int, model_state: dict, model_config, family: str, tokenizer,
                    trainer_state: dict | None, config: dict, keep: int = 2, run_id: str | None = None) -> Path:
    """Write ``save_dir/step-{step}`` atomically, point ``latest`` at it, and keep the newest ``keep``
    checkpoints of run `run_id` (another run's checkpoints are never removed). Returns its path."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    final = save_dir / f"step-{step:06d}"
    tmp = save_dir / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_folder(tmp, model_state, model_config, family, tokenizer, trainer_state, config, run_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        _replace_named(save_dir, tmp, final)
    else:
        os.replace(tmp, final)
        _point_latest(save_dir, final.name)
    _clean_leftovers(save_dir)
    _prune(save_dir, keep, run_id)
    return final


def _clean_leftovers(save_dir: Path) -> None:
    """Remove the temporary folders of saves that died half-way (now that `latest` names a newer one)."""
    for p in save_dir.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-step-", ".bridge-step-", ".old-step-")):
            shutil.rmtree(p, ignore_errors=True)


def _write_folder(folder: Path, model_state: dict, model_config, family: str, tokenizer,
                  trainer_state: dict | None, config: dict, run_id: str | None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / MODEL_CONFIG).write_text(json.dumps({"family": family, **dataclasses.asdict(model_config)}, indent=1))
    tokenizer.save(folder / TOKENIZER)
    if trainer_state is not None:
        torch.save(trainer_state, folder / STATE)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if run_id is not None:
        (folder / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")
    _fsync_dir(folder)


def _replace_named(save_dir: Path, tmp: Path, final: Path) -> None:
    """Re-saving a step that exists (a resume from an earlier checkpoint): swap the complete new folder in
    so that ``latest`` names a complete folder at every moment, even if the process dies mid-swap."""
    bridge = save_dir / f".bridge-{final.name}-{os.getpid()}"
    if bridge.exists():
        shutil.rmtree(bridge)
    shutil.copytree(tmp, bridge, copy_function=os.link)  # hard links: no data copied
    _point_latest(save_dir, bridge.name)
    old = save_dir / f".old-{final.name}-{os.getpid()}"
    os.replace(final, old)
    os.replace(tmp, final)
    _point_latest(save_dir, final.name)
    shutil.rmtree(bridge, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _point_latest(save_dir: Path, name: str) -> None:
    latest_tmp = save_dir / f".latest-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, save_dir / "latest")


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _prune(save_dir: Path, keep: int, run_id: str | None) -> None:
    """Remove this run's checkpoints beyond the newest `keep`, never the one ``latest`` names."""
    if run_id is None:
        return
    latest = (save_dir / "latest").read_text().strip()
    steps = sorted((int(m.group(1)), p) for p in save_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())
    mine = [p for _, p in steps if run_id_of(p) == run_id]
    for p in mine[:-keep]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def run_id_of(folder: str | Path) -> str | None:
    """The id in ``folder/run.json`` (a save folder or a checkpoint), None when absent or unreadable."""
    try:
        return str(json.loads((Path(folder) / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written by a run that records its id: never this run's to prune


def _pointer(save_dir: Path) -> Path | None:
    """The folder a save folder's ``latest`` file names, None when there is no such small text file naming an
    existing folder (an official checkpoint file may also be called ``latest``)."""
    pointer = save_dir / "latest"
    try:
        if not pointer.is_file() or pointer.stat().st_size > 256:
            return None
        p = save_dir / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return p if p.is_dir() else None  # a step folder, or the bridge folder of a step being re-saved


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``save_dir`` (the one ``latest`` names, else the highest step)."""
    save_dir = Path(save_dir)
    named = _pointer(save_dir)
    if named is not None:
        return named
    steps = sorted((int(m.group(1)), p) for p in save_dir.glob("step-*") if (m := _NAME.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def resolve_source(source: str | Path) -> str:
    """A model source as given to coconut-eval / coconut-export, with a coconut-train save folder (or its
    ``latest`` pointer file) replaced by its newest checkpoint; anything else is returned unchanged. A save
    folder without a complete checkpoint (a run that stopped before its first save) is an error."""
    path = Path(source)
    if path.is_file() and path.name == "latest" and _pointer(path.parent) is not None:
        path = path.parent
    if path.is_dir() and not is_checkpoint(path) and not (path / "config.json").is_file():
        newest = latest_checkpoint(path)
        if newest is not None:
            return str(newest)
        if (path / "latest").exists() or (path / RUN_FILE).is_file() or any(path.glob("step-*")):
            raise CheckpointError(f"{source}: a coconut-train save folder without a complete checkpoint (the run "
                                  f"stopped before its first save?)")
    return str(source)


def read_model_config(path: str | Path) -> dict:
    file = Path(path) / MODEL_CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable checkpoint model config ({e})") from None
    if not isinstance(cfg, dict) or "family" not in cfg:
        raise CheckpointError(f"{file}: not a coconut-train model config (no 'family')")
    return cfg


def read_run_config(path: str | Path) -> dict:
    """The run config (config.yaml) a checkpoint was written with, as a mapping; CheckpointError naming the file."""
    file = Path(path) / "config.yaml"
    try:
        cfg = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{file}: unreadable run config ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: not a run config (expected a mapping of config keys)")
    return cfg


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file}: checkpoint weights not found")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise CheckpointError(f"{file}: unreadable checkpoint weights ({type(e).__name__}: {e})") from None


def load_trainer_state(path: str | Path) -> dict:
    file = Path(path) / STATE
    if not file.is_file():
        raise CheckpointError(f"{file}: trainer state not found (a weights-only checkpoint cannot be resumed; "
                         f"use init_from)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: unreadable trainer state ({type(e).__name__}: {e})") from None
    for key in ("step", "epoch", "batches_done", "optimizer"):
        if key not in state:
            raise CheckpointError(f"{file}: trainer state lacks {key!r}")
    return state


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint `cfg.resume` names: None (a fresh run), save_dir's latest, or the given folder."""
    if cfg.resume is False:
        return None
    if cfg.resume is True:
        path = latest_checkpoint(cfg.save_dir)
        if path is None:
            raise CheckpointError(f"config key 'resume': no checkpoint in save_dir {cfg.save_dir}")
        return path
    path = Path(cfg.resume)
    if not path.is_dir():
        raise CheckpointError(f"config key 'resume': checkpoint folder {path} not found")
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
            trainer_state, ctx.cfg.to_dict(), keep=ctx.cfg.keep_checkpoints, run_id=ctx.run_id)
    ctx.par.barrier()


def _family(model) -> str:
    from ..models import GPT2

    return "gpt2" if isinstance(model, GPT2) else "llama"
