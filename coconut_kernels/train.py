"""`coconut-train` (also ``python -m coconut_kernels.train``): the COCONUT curriculum trainer.

Reads a YAML config and/or ``--key value`` flags (`training.config.TrainConfig`) and runs the official
curriculum. The units, in the order a run uses them: the data (`training.data`: records, stage layouts,
each rank's share), the tokenizer, model and optimizer (`training.build`), the distributed wrapper
(`training.distributed`: DDP or FSDP under torchrun), the loop (`training.loop`: epochs, accumulation,
schedule, `start_epoch`, `save_only_improve`), evaluation (`training.evaluate`: answer and CoT exact match,
validation loss, sharded by rank) and checkpoints (`training.checkpoint`; rank 0 writes them and the metric
log, `training.metrics`). `--official ARGS_YAML` reads run.py's config (`interop.official`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ._cli import run_cli
from .errors import CheckpointError
from .host_memory import keep_unless_disabled
from .training.build import build_lm, build_tokenizer, resolve_init_from
from .training.checkpoint import load_trainer_state, resume_path
from .training.config import TrainConfig, parse_args
from .training.context import RunContext
from .training.data import check_stages, load_data, prepare_data
from .training.distributed import Parallel, device_of, process_group, world_info
from .training.evaluate import evaluate_stage
from .training.loop import Loop
from .training.metrics import MetricsLog, format_eval_table
from .training.savedir import SaveDirPlan, check_resume_config, check_save_dir, claim_save_dir

__all__ = ["main", "run"]


def main(argv: list[str] | None = None) -> int:
    """The console script: a user error prints ``coconut-train: error: ...`` and returns 2 (the traceback
    only with ``--debug``)."""
    return run_cli("coconut-train", _main, argv)


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    keep_unless_disabled()  # a process of its own: large freed blocks stay in the heap (host_memory)
    run(cfg)
    return 0


def run(cfg: TrainConfig) -> dict:
    """Train (or only evaluate) as `cfg` says; returns {"losses": [(step, loss)], "evals": [rows],
    "checkpoint": path or None, "val_source": str}. Joins torchrun's process group when WORLD_SIZE > 1.
    Every check (config, data, model, resume checkpoint, save folder) passes before anything is written."""
    rank, world, local_rank = world_info()
    device = device_of(cfg, local_rank)
    with process_group(world, device):
        return _run(cfg, rank, world, device)


def _run(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    ctx, plan = _prepare(cfg, rank, world, device)
    try:
        loop = None if cfg.only_eval else Loop(ctx)
        if loop is not None and loop.finished:
            return _nothing_to_do(ctx)
        _open(ctx, plan)
        if loop is None:
            stage = cfg.eval_stage if cfg.eval_stage is not None else cfg.stage_of_epoch(max(cfg.num_epochs - 1, 0))
            evaluate_stage(ctx, 0, -1, stage)
        else:
            loop.run()
        return _finish(ctx)
    finally:
        ctx.par.close()


def _prepare(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> tuple[RunContext, SaveDirPlan]:
    """Everything a run needs, built and checked (the resume checkpoint and its config, the data against
    the curriculum and the model, the save folder), reading only."""
    t0 = time.perf_counter()
    resume_from = resume_path(cfg)
    if resume_from is not None:
        check_resume_config(cfg, resume_from)
    state = load_trainer_state(resume_from) if resume_from is not None else None
    train_records, val_records, val_source = load_data(cfg)
    check_stages(cfg, train_records, val_records)
    init = resolve_init_from(cfg)  # once: a save folder's newest checkpoint gives both tokenizer and weights
    tokenizer = build_tokenizer(cfg, train_records, resume_from, init)
    lm = build_lm(cfg, tokenizer, resume_from, init)
    # bf16: the whole model (and so AdamW's state) in bf16, as the official run.py; else fp32 weights
    lm = lm.to(device=device, dtype=torch.bfloat16 if cfg.compute_precision == "bf16" else None)
    data = prepare_data(cfg, train_records, val_records, val_source, tokenizer, lm.model.config.max_position,
                        rank, world)
    plan = check_save_dir(cfg, resume_from)
    par = Parallel(lm, cfg.dist, rank, world, device, wrap=not cfg.only_eval)
    ctx = RunContext(cfg=cfg, device=device, data=data, lm=lm, par=par, resume_from=resume_from, state=state,
                     t0=t0)
    return ctx, plan


def _open(ctx: RunContext, plan: SaveDirPlan) -> None:
    """Take the save folder (every rank has checked it first) and open the metric log."""
    ctx.par.barrier()
    error = None
    if ctx.rank == 0:
        try:
            claim_save_dir(plan)
        except CheckpointError as e:
            error = e
    # every rank learns whether rank 0 took the folder (a bare barrier would leave the others waiting)
    if not ctx.par.all_ok(error is None):
        raise error or CheckpointError(f"config key 'save_dir': rank 0 could not take {plan.save_dir}")
    ctx.run_id = plan.run_id
    ctx.log = MetricsLog(ctx.cfg.save_dir, ctx.rank == 0, ctx.cfg.tensorboard,
                         resume_step=ctx.state["step"] if ctx.state else None,
                         title=f"{ctx.cfg.method} ({ctx.data.val_source}), run {plan.run_id}")


def _nothing_to_do(ctx: RunContext) -> dict:
    """A resume with no step left: say so and leave the folder as it is."""
    if ctx.rank == 0:
        print(f"coconut-train: {ctx.resume_from} is at step {ctx.state['step']}, epoch {ctx.state['epoch']}: "
              f"nothing left to train (max_steps {ctx.cfg.max_steps}, num_epochs {ctx.cfg.num_epochs}); "
              f"{ctx.cfg.save_dir} is unchanged", file=sys.stderr)
    return {"losses": [], "evals": [], "checkpoint": ctx.resume_from, "val_source": ctx.data.val_source}


def _finish(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    if ctx.rank == 0 and ctx.evals:
        print(format_eval_table(ctx.evals, f"{cfg.method} on {ctx.data.val_source}"))
    if ctx.rank == 0:
        summary = {"method": cfg.method, "val_source": ctx.data.val_source, "evals": ctx.evals,
                   "final_loss": ctx.losses[-1][1] if ctx.losses else None,
                   "wall_s": round(ctx.elapsed(), 1), "world_size": ctx.world,
                   "checkpoint": str(ctx.last_checkpoint) if ctx.last_checkpoint else None}
        # written whole, then renamed: a run killed here leaves the earlier summary.json, not half of one
        tmp = Path(cfg.save_dir) / f".summary.json-{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, Path(cfg.save_dir) / "summary.json")
    ctx.log.close()
    return {"losses": ctx.losses, "evals": ctx.evals, "checkpoint": ctx.last_checkpoint,
            "val_source": ctx.data.val_source}


if __name__ == "__main__":
    sys.exit(main())
