"""`coconut-train` (also ``python -m coconut_kernels.train``): the COCONUT curriculum trainer.

Reads a YAML config and/or ``--key value`` flags (`training.config.TrainConfig`), builds the data, tokenizer
and `LatentLM` (`training.build`), then runs the official curriculum: at epoch e the stage is
e // epochs_per_stage capped at max_latent_stage, the training set is rebuilt for that stage, AdamW (linear
warm-up, optional decay) restarts its moments at stage changes when reset_optimizer, and the validation
split is evaluated (exact match after "###", mean generated tokens) at the epoch's stage. Under torchrun the
model is wrapped in DDP or FSDP; data and evaluation are sharded by rank and rank 0 writes checkpoints
(`training.checkpoint`) and the metric log (`training.metrics`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .data import AlignedCollator, RaggedCollator, build_example, tokenize_records
from .training.build import build_lm, build_tokenizer, check_stages, device_of, load_data, world_info
from .training.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from .training.config import TrainConfig, parse_args
from .training.evaluate import evaluate, validation_loss
from .training.metrics import MetricsLog, format_eval_table

__all__ = ["main", "run"]


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        run(cfg)
    except ValueError as e:
        print(f"coconut-train: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(cfg: TrainConfig) -> dict:
    """Train (or only evaluate) as `cfg` says; returns {"losses": [(step, loss)], "evals": [rows],
    "checkpoint": path or None, "val_source": str}. Joins torchrun's process group when WORLD_SIZE > 1."""
    rank, world, local_rank = world_info()
    device = device_of(cfg, local_rank)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _Run(cfg, rank, world, device).run()
    finally:
        if own_group:
            dist.destroy_process_group()


class _Run:
    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.t0 = time.perf_counter()
        self.resume_from = self._resume_path()
        self.state = load_trainer_state(self.resume_from) if self.resume_from and not cfg.only_eval else None
        train, val, self.val_source = load_data(cfg)
        check_stages(cfg, train, val)
        self.tokenizer = build_tokenizer(cfg, train, self.resume_from)
        self.lm = build_lm(cfg, self.tokenizer, self.resume_from).to(device)
        self.stage_config = cfg.stage_config()
        collator_cls = RaggedCollator if cfg.collate == "ragged" else AlignedCollator
        self.collator = collator_cls.from_tokenizer(self.tokenizer)
        self.train = tokenize_records(train, self.tokenizer)
        self.val = tokenize_records(val, self.tokenizer)
        self._check_lengths()
        # every rank takes the same number of examples (a whole multiple of the world size) each epoch
        self.per_rank = len(self.train) // world
        if self.per_rank == 0:
            raise ValueError(f"training data: {len(self.train)} records cannot be shared by {world} processes")
        self.n_micro = math.ceil(self.per_rank / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.n_micro / cfg.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * cfg.num_epochs
        self.log = MetricsLog(cfg.save_dir, rank == 0, cfg.tensorboard,
                              resume_step=self.state["step"] if self.state else None)
        self.losses: list[tuple[int, float]] = []
        self.evals: list[dict] = []
        self.last_checkpoint: Path | None = None

    # --------------------------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        cfg = self.cfg
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

    def _check_lengths(self) -> None:
        """Refuse up front (not mid-run) a record that does not fit the model at some stage."""
        limit = self.lm.model.config.max_position
        # past max_latent_stage every layout is the same (all steps replaced), and uniform_prob may draw any
        last = (self.cfg.max_latent_stage if self.cfg.uses_latents else 0) + 1
        for rec in self.train:
            for stage in range(last + 1):
                n = len(_example(rec, stage, self.stage_config, self.tokenizer).input_ids)
                if n > limit:
                    raise ValueError(f"training record {rec.idx}: {n} tokens at stage {stage}, more than the "
                                     f"model's max_position {limit}")

    def _is_fsdp(self) -> bool:
        return self.world > 1 and self.cfg.dist == "fsdp"

    def _wrap(self):
        """The module the training step calls: the LatentLM itself, in DDP, or sharded by FSDP2."""
        if self.world == 1:
            return self.lm
        if self.cfg.dist == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # a projected feedback is unused at stage 0 (no latents)
            unused = any(True for _ in self.lm.feedback.parameters())
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(self.lm, device_ids=ids, find_unused_parameters=unused)
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit: LatentLM's multi-pass forward reads the embedding, final norm and LM head between
        # the layer stacks of every pass, so the parameters are gathered for the whole forward; gradients
        # and optimizer states stay sharded.
        fully_shard(self.lm)
        return self.lm

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for p in self.lm.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr)

    def _lr(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.lr
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return cfg.lr * (1.0 - frac)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    def _epoch_batches(self, epoch: int, stage: int) -> list[list]:
        """This rank's micro-batches of `epoch`: one global shuffle (the same on every rank), this rank's
        share of it, each example laid out for `stage` (uniform_prob draws from a per-rank stream)."""
        order = list(range(len(self.train)))
        random.Random(f"shuffle-{self.cfg.seed}-{epoch}").shuffle(order)
        mine = order[: self.per_rank * self.world][self.rank::self.world]
        rng = random.Random(f"stages-{self.cfg.seed}-{epoch}-{self.rank}")
        examples = [build_example(self.train[i], stage, self.stage_config, self.tokenizer, rng) for i in mine]
        bs = self.cfg.batch_size
        return [examples[i:i + bs] for i in range(0, len(examples), bs)]

    def _loss_weight(self, batches: list[list], b: int, group_start: int, group: int) -> float:
        """The factor of micro-batch b's mean loss in its optimizer step's gradient (see `loss_average`)."""
        if self.cfg.loss_average == "micro_batch":
            return 1.0 / group
        if b == group_start:  # the group's labelled tokens, all processes (a resume starts at a group's start)
            n = [sum(sum(t != -100 for t in ex.labels[1:]) for ex in batches[i])
                 for i in range(group_start, group_start + group)]
            total = torch.tensor(float(sum(n)), dtype=torch.float64, device=self.device)
            if self.world > 1:
                dist.all_reduce(total)
            self._group_tokens = (n, group_start, float(total))
        n, start, total = self._group_tokens
        # DDP and FSDP average the processes' gradients: the world size undoes that mean
        return n[b - start] / max(total, 1.0) * self.world

    # --------------------------------------------------------------------------------------------------
    def _model_state(self) -> dict:
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.lm.state_dict()

    def _optimizer_state(self, optimizer) -> dict:
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.lm, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def _load_optimizer(self, optimizer, state: dict) -> None:
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.lm, optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

    def _save(self, optimizer, step: int, epoch: int, batches_done: int) -> None:
        model_state = self._model_state()  # collective under FSDP: every rank calls it
        optim_state = self._optimizer_state(optimizer)
        if self.rank == 0:
            trainer_state = {"step": step, "epoch": epoch, "batches_done": batches_done, "world_size": self.world,
                             "optimizer": optim_state, "torch_rng": torch.get_rng_state(),
                             "method": self.cfg.method}
            self.last_checkpoint = save_checkpoint(
                self.cfg.save_dir, step, model_state, self.lm.model.config, _family(self.lm.model), self.tokenizer,
                trainer_state, self.cfg.to_dict(), keep=self.cfg.keep_checkpoints)
        if self.world > 1:
            dist.barrier()

    # --------------------------------------------------------------------------------------------------
    def _evaluate(self, step: int, epoch: int, stage: int) -> dict:
        cfg = self.cfg
        fsdp = self._is_fsdp() and hasattr(self.lm, "unshard")
        if fsdp:
            self.lm.unshard()
        try:
            res = evaluate(self.lm, self.val, stage, self.stage_config, self.tokenizer, self.collator,
                           batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, device=self.device,
                           bf16=cfg.bf16, rank=self.rank, world=self.world)
            # run.py's validation loss: the stage's training layout of the validation records
            loss = validation_loss(self.lm, self.val, stage, self.stage_config, self.tokenizer, self.collator,
                                   batch_size=cfg.eval_batch_size, device=self.device, bf16=cfg.bf16)
        finally:
            if fsdp:
                self.lm.reshard()
        row = {"step": step, "epoch": epoch, "stage": stage, "accuracy": res["accuracy"],
               "cot_accuracy": res["cot_accuracy"], "val_loss": loss["val_loss"], "mean_latents": res["mean_latents"],
               "mean_new_tokens": res["mean_new_tokens"], "correct": res["correct"], "n": res["n"],
               "elapsed_s": round(time.perf_counter() - self.t0, 2)}
        self.log.eval(row)
        self.evals.append(row)
        if self.rank == 0:
            print(f"[eval] epoch {epoch} stage {stage}: accuracy {100 * row['accuracy']:.1f}% "
                  f"({row['correct']}/{row['n']}), CoT match {100 * row['cot_accuracy']:.1f}%, validation loss "
                  f"{row['val_loss']:.4f}, {row['mean_new_tokens']:.1f} new tokens", file=sys.stderr)
            for s in res["samples"]:
                print(f"  [{'ok' if s['correct'] else 'x '}] {s['output']!r}", file=sys.stderr)
        return row

    def _finish(self) -> dict:
        if self.rank == 0 and self.evals:
            print(format_eval_table(self.evals, f"{self.cfg.method} on {self.val_source}"))
        if self.rank == 0:
            summary = {"method": self.cfg.method, "val_source": self.val_source, "evals": self.evals,
                       "final_loss": self.losses[-1][1] if self.losses else None,
                       "wall_s": round(time.perf_counter() - self.t0, 1), "world_size": self.world,
                       "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}
            Path(self.cfg.save_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.cfg.save_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.log.close()
        return {"losses": self.losses, "evals": self.evals, "checkpoint": self.last_checkpoint,
                "val_source": self.val_source}

    def run(self) -> dict:
        cfg = self.cfg
        if cfg.only_eval:
            stage = cfg.eval_stage if cfg.eval_stage is not None else cfg.stage_of_epoch(max(cfg.num_epochs - 1, 0))
            self._evaluate(0, -1, stage)
            return self._finish()

        model = self._wrap()
        optimizer = self._optimizer()
        step, start_epoch, skip = 0, cfg.start_epoch, 0
        if self.state is not None:
            st = self.state
            if st["batches_done"] and st.get("world_size", 1) != self.world:
                raise ValueError(f"{self.resume_from}: saved mid-epoch by {st.get('world_size')} processes; resume "
                                 f"it with the same number (got {self.world})")
            step, start_epoch, skip = st["step"], st["epoch"], st["batches_done"]
            self._load_optimizer(optimizer, st["optimizer"])
            torch.set_rng_state(st["torch_rng"])
        if cfg.max_steps is not None and step >= cfg.max_steps:
            return self._finish()

        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
        params = [p for p in self.lm.parameters() if p.requires_grad]
        show = cfg.progress and self.rank == 0
        best = 0.0
        for epoch in range(start_epoch, cfg.num_epochs):
            stage = cfg.stage_of_epoch(epoch)
            if (skip == 0 and epoch > 0 and cfg.reset_optimizer and stage != cfg.stage_of_epoch(epoch - 1)):
                optimizer = self._optimizer()
            batches = self._epoch_batches(epoch, stage)
            bar = _progress(show, self.steps_per_epoch, skip // cfg.grad_accum_steps, f"epoch {epoch} stage {stage}")
            loss_sum = torch.zeros((), device=self.device)
            tokens = 0
            for b in range(skip, self.n_micro):
                group_start = b - b % cfg.grad_accum_steps
                group = min(cfg.grad_accum_steps, self.n_micro - group_start)
                last_in_group = b == group_start + group - 1
                batch = {k: v.to(self.device) for k, v in self.collator(batches[b]).items()}
                sync = nullcontext() if last_in_group or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with autocast:
                        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                    batch["position_ids"])
                    weight = self._loss_weight(batches, b, group_start, group)
                    (out.loss * weight).backward()
                loss_sum += out.loss.detach() * weight
                tokens += int(batch["attention_mask"].sum())
                if not last_in_group:
                    continue
                lr = self._lr(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                totals = torch.stack([loss_sum, torch.tensor(float(tokens), device=self.device)])
                if self.world > 1:
                    dist.all_reduce(totals)  # the mean of the ranks' losses, every rank's tokens
                if hasattr(norm, "full_tensor"):
                    norm = norm.full_tensor()
                loss, tokens = float(totals[0]) / self.world, int(totals[1])
                self.losses.append((step, loss))
                self.log.train({"step": step, "epoch": epoch, "stage": stage, "loss": loss, "lr": lr,
                                "grad_norm": float(norm), "tokens": tokens,
                                "elapsed_s": round(time.perf_counter() - self.t0, 2)})
                loss_sum = torch.zeros((), device=self.device)
                tokens = 0
                bar.update(1)
                if step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                more = b + 1 < self.n_micro
                if cfg.max_steps is not None and step >= cfg.max_steps and more:
                    bar.close()
                    self._save(optimizer, step, epoch, b + 1)
                    return self._finish()
                if cfg.save_every_steps and step % cfg.save_every_steps == 0 and more:
                    self._save(optimizer, step, epoch, b + 1)
            bar.close()
            skip = 0
            last = epoch == cfg.num_epochs - 1
            row = None
            if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or last:
                row = self._evaluate(step, epoch, stage)
            if not cfg.save_only_improve or (row is not None and row["accuracy"] > best):
                best = row["accuracy"] if row is not None else best
                self._save(optimizer, step, epoch + 1, 0)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        return self._finish()


def _example(rec, stage, stage_config, tokenizer):
    """The layout of `rec` at `stage` without uniform mixing (which only picks among these stages)."""
    return build_example(rec, stage, dataclasses.replace(stage_config, uniform_prob=0.0), tokenizer)


def _family(model) -> str:
    from .models import GPT2

    return "gpt2" if isinstance(model, GPT2) else "llama"


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(show: bool, total: int, initial: int, desc: str):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


if __name__ == "__main__":
    sys.exit(main())
