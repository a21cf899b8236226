"""A save folder belongs to one run.

``save_dir/run.json`` holds the run's id; every checkpoint folder holds a copy, so pruning can tell this
run's checkpoints from any other's. Before anything is written, `check_save_dir` decides what the run may do
with the folder, reading only:

- a fresh run (``resume: false``) needs a folder that holds no run (no run.json, checkpoints, `latest` or
  logs); otherwise it stops, naming both choices: ``resume: true`` to continue the run there, or
  ``overwrite: true`` to move it aside to a sibling folder (nothing is deleted);
- ``resume: true`` continues the run the folder holds;
- ``resume: <checkpoint>`` continues that checkpoint's run, in its own folder or in one that holds no run.

A resumed run's config must equal the checkpoint's in every key that gives the run its meaning (model,
tokenizer, data, method, curriculum, optimisation); `resume_override` lists the keys that may change on
purpose. `claim_save_dir` then does the writing: moving an old run aside and writing run.json.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path


from ..errors import CheckpointError, ConfigError
from ..validation import check_writable
from .checkpoint import RUN_FILE, read_run_config, run_id_of
from .config import RESUME_FIXED, RESUME_FREE, TrainConfig
from .curves import CURVES_FILE

__all__ = ["SaveDirPlan", "check_save_dir", "claim_save_dir", "write_run_id", "check_resume_config"]

# what marks a folder as holding a run (besides step-* checkpoint folders)
_RUN_ENTRIES = (RUN_FILE, "latest", "train_log.csv", "eval_log.csv", "metrics.jsonl", "summary.json", "tensorboard",
                CURVES_FILE)


@dataclass
class SaveDirPlan:
    """What `claim_save_dir` will do: the run id to write, and the folder to move an old run to (or None)."""

    save_dir: Path
    run_id: str
    move_aside_to: Path | None = None


def _held(save_dir: Path) -> list[str]:
    """The entries of `save_dir` that belong to a run (empty: the folder is free)."""
    if not save_dir.is_dir():
        return []
    names = sorted(p.name for p in save_dir.iterdir())
    return [n for n in names if n in _RUN_ENTRIES or n.startswith("step-")]


def _aside(save_dir: Path, old_id: str | None) -> Path:
    """A free sibling name for the old run: ``<save_dir>.old-<run id>`` (numbered if taken)."""
    base = f"{save_dir.name}.old-{old_id or 'unknown'}"
    target, n = save_dir.with_name(base), 1
    while target.exists():
        target, n = save_dir.with_name(f"{base}-{n}"), n + 1
    return target


def check_save_dir(cfg: TrainConfig, checkpoint: Path | None) -> SaveDirPlan:
    """Decide, without writing, what this run does with `cfg.save_dir` (`checkpoint`: the one it resumes
    from, if any); raise naming the choices when the folder belongs to another run."""
    save_dir = Path(cfg.save_dir)
    check_writable(save_dir, "config key 'save_dir'", folder=True, error=CheckpointError)
    held = _held(save_dir)
    folder_id = run_id_of(save_dir) if held else None
    ckpt_id = run_id_of(checkpoint) if checkpoint is not None else None
    if cfg.resume is True:
        return SaveDirPlan(save_dir, folder_id or ckpt_id or _new_id())
    own = checkpoint is not None and held and folder_id is not None and folder_id == ckpt_id
    if not held or own:
        return SaveDirPlan(save_dir, ckpt_id or _new_id())
    if cfg.overwrite:
        return SaveDirPlan(save_dir, ckpt_id or _new_id(), _aside(save_dir, folder_id))
    what = f"run {folder_id}" if folder_id else "a run"
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    resume = "resume: true to continue it" if checkpoint is None else \
        f"resume: true to continue that run instead of {checkpoint}"
    choices = [] if cfg.only_eval else [resume]
    choices.append(f"overwrite: true to move it aside to {_aside(save_dir, folder_id)} (nothing is deleted)")
    raise CheckpointError(f"config key 'save_dir': {save_dir} holds {what} ({shown}); set {', or '.join(choices)}, "
                          f"or choose another save_dir")


def claim_save_dir(plan: SaveDirPlan) -> None:
    """Move an old run aside (when asked) and record this run's id; rank 0 only."""
    try:
        if plan.move_aside_to is not None:
            os.replace(plan.save_dir, plan.move_aside_to)
            print(f"coconut-train: moved the run in {plan.save_dir} aside to {plan.move_aside_to}")
        plan.save_dir.mkdir(parents=True, exist_ok=True)
        if run_id_of(plan.save_dir) != plan.run_id:
            write_run_id(plan.save_dir, plan.run_id)
    except OSError as e:
        raise CheckpointError(f"config key 'save_dir': cannot write to {plan.save_dir} ({e.strerror})") from None


def write_run_id(folder: Path, run_id: str) -> None:
    tmp = folder / f".{RUN_FILE}-{os.getpid()}"
    tmp.write_text(json.dumps({"run_id": run_id}) + "\n")
    os.replace(tmp, folder / RUN_FILE)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def check_resume_config(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` with a config that changes the run's meaning, naming the keys."""
    saved = read_run_config(checkpoint)
    mine = cfg.to_dict()
    allowed = set(RESUME_FREE) | set(cfg.resume_override)
    changed = [k for k in mine if k not in allowed and k in saved and saved[k] != mine[k]]
    if not changed:
        return
    fixed = [k for k in changed if k in RESUME_FIXED]
    detail = "; ".join(f"{k!r}: checkpoint {saved[k]!r}, config {mine[k]!r}" for k in changed)
    hint = ("use the checkpoint's value" if fixed else
            f"use the checkpoint's value, or allow the change with resume_override: {changed}")
    raise ConfigError(f"config key {changed[0]!r}: resuming {checkpoint} with a different run config "
                      f"({detail}); {hint}")
