"""The training loop: epochs of the curriculum, micro-batches accumulated into optimizer steps, the learning
rate schedule, the per-step log row, evaluation after the epochs that ask for it, and checkpoints (every
`save_every_steps`, at every epoch's end, and where `max_steps` stops the run).

At epoch e the stage is `cfg.stage_of_epoch(e)`; with `reset_optimizer` AdamW restarts its moments every
epoch (or, with `reset_optimizer_every: stage`, when the stage changes). A fresh run starts at epoch
`start_epoch` (the official `resume: N`); a resumed run continues from the checkpoint's step, epoch and
micro-batch. With `save_only_improve` the end-of-epoch checkpoint is written only when the epoch's accuracy
beats the best of this process's run so far (as run.py, the best starts at 0 on every launch).
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from contextlib import nullcontext

import torch

from ..errors import CoconutError
from .build import make_optimizer
from .checkpoint import save_run
from .config import TrainConfig
from .context import RunContext
from .evaluate import evaluate_stage

__all__ = ["Loop", "Progress", "lr_at", "dropout_seed"]


def dropout_seed(seed: int, epoch: int, micro_batch: int, rank: int) -> int:
    """The seed torch's generators get before micro-batch `micro_batch` of `epoch` on process `rank`: the dropout
    masks depend on the run's seed and the position in the run only, so a resumed run draws the same ones (and
    the processes of a distributed run draw different ones)."""
    digest = hashlib.sha256(f"dropout-{seed}-{epoch}-{micro_batch}-{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then `lr_schedule`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


class Loop:
    """The curriculum from the start or from `ctx.state` (restored here, before anything is written), up to
    num_epochs or max_steps: `run()` trains."""

    def __init__(self, ctx: RunContext):
        self.ctx, cfg = ctx, ctx.cfg
        self.optimizer = make_optimizer(cfg, ctx.lm)
        self.steps_per_epoch = math.ceil(ctx.data.n_micro / cfg.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * cfg.num_epochs
        self.step, self.start_epoch, self.skip = 0, cfg.start_epoch, 0
        self.best = 0.0  # the best evaluated accuracy (save_only_improve)
        self._group_tokens: tuple[list[int], int, float] | None = None
        autocast = cfg.compute_precision == "bf16-autocast"
        self.autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
        self.params = [p for p in ctx.lm.parameters() if p.requires_grad]
        self._reset_sums()
        if ctx.state is not None:
            self._restore()

    def _reset_sums(self) -> None:
        self.loss_sum = torch.zeros((), device=self.ctx.device)
        self.tokens = 0
        self.t_group = time.perf_counter()  # the start of the next optimizer step's micro-batches

    def _restore(self) -> None:
        st, ctx = self.ctx.state, self.ctx
        if st["batches_done"] and st.get("world_size", 1) != ctx.world:
            raise ValueError(f"{ctx.resume_from}: saved mid-epoch by {st.get('world_size')} processes; resume "
                             f"it with the same number (got {ctx.world})")
        self.step, self.start_epoch, self.skip = st["step"], st["epoch"], st["batches_done"]
        ctx.par.load_optimizer(self.optimizer, st["optimizer"])
        torch.set_rng_state(st["torch_rng"])

    def _done(self) -> bool:
        max_steps = self.ctx.cfg.max_steps
        return max_steps is not None and self.step >= max_steps

    @property
    def finished(self) -> bool:
        """Whether the run has no step left to take (a resume at or past max_steps or the last epoch)."""
        return self._done() or self.start_epoch >= self.ctx.cfg.num_epochs

    def run(self) -> None:
        if self.finished:
            return
        for epoch in range(self.start_epoch, self.ctx.cfg.num_epochs):
            if self._epoch(epoch):
                break

    def _epoch(self, epoch: int) -> bool:
        """Train one epoch (from micro-batch `skip` when resuming); True when the run stops here."""
        ctx, cfg = self.ctx, self.ctx.cfg
        stage = cfg.stage_of_epoch(epoch)
        if self.skip == 0 and epoch > 0 and self._resets(epoch):
            self.optimizer = make_optimizer(cfg, ctx.lm)
        batches = ctx.data.epoch_batches(epoch, stage)
        ctx.par.module.train()  # the model config's dropout (evaluation switches to eval mode and back)
        bar = Progress(cfg.progress and ctx.rank == 0, epoch, stage, self.steps_per_epoch,
                       self.skip // cfg.grad_accum_steps, cfg.log_every)
        self._reset_sums()
        epoch_losses = []
        for b in range(self.skip, ctx.data.n_micro):
            if not self._micro_batch(batches, b, epoch):
                continue
            loss, lr, tokens = self._optimizer_step(epoch, stage)
            epoch_losses.append(loss)
            bar.update(self.step, loss, lr, tokens)
            more = b + 1 < ctx.data.n_micro
            if self._done() and more:
                bar.close()
                save_run(ctx, self.optimizer, self.step, epoch, b + 1)
                return True
            if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 and more:
                save_run(ctx, self.optimizer, self.step, epoch, b + 1)
        bar.close()
        self.skip = 0
        row = None
        if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or epoch == cfg.num_epochs - 1:
            # a resumed epoch's mean covers the steps this process took; a skipped non-finite step is left out
            finite = [x for x in epoch_losses if math.isfinite(x)]
            train_loss = sum(finite) / len(finite) if finite else None
            row = evaluate_stage(ctx, self.step, epoch, stage, train_loss=train_loss)
        if not cfg.save_only_improve or (row is not None and row["accuracy"] > self.best):
            self.best = row["accuracy"] if row is not None else self.best
            save_run(ctx, self.optimizer, self.step, epoch + 1, 0)
        return self._done()

    def _resets(self, epoch: int) -> bool:
        """Whether AdamW restarts at the start of `epoch` (> 0): every epoch, as the official run.py, or only
        when the stage changes."""
        cfg = self.ctx.cfg
        if not cfg.reset_optimizer:
            return False
        return cfg.reset_optimizer_every == "epoch" or cfg.stage_of_epoch(epoch) != cfg.stage_of_epoch(epoch - 1)

    def _micro_batch(self, batches: list[list], b: int, epoch: int) -> bool:
        """Forward and backward of micro-batch `b` of the epoch's `batches`; True when it closes an
        accumulation group."""
        ctx, accum = self.ctx, self.ctx.cfg.grad_accum_steps
        group_start = b - b % accum
        group = min(accum, ctx.data.n_micro - group_start)
        last_in_group = b == group_start + group - 1
        batch = {k: v.to(ctx.device) for k, v in ctx.data.collator(batches[b]).items()}
        torch.manual_seed(dropout_seed(ctx.cfg.seed, epoch, b, ctx.rank))
        with ctx.par.no_sync(last_in_group):
            with self.autocast:
                out = ctx.par.module(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     batch["position_ids"], **ctx.cfg.schedule,
                                     feedback_grad_scale=ctx.cfg.feedback_grad_scale)
            weight = self._loss_weight(batches, b, group_start, group)
            (out.loss * weight).backward()
        self.loss_sum += out.loss.detach() * weight
        self.tokens += int(batch["attention_mask"].sum())
        return last_in_group

    def _loss_weight(self, batches: list[list], b: int, group_start: int, group: int) -> float:
        """The factor of micro-batch b's mean loss in its optimizer step's gradient (see `loss_average`)."""
        ctx = self.ctx
        if ctx.cfg.loss_average == "micro_batch":
            return 1.0 / group
        if b == group_start:  # the group's labelled tokens, all processes (a resume starts at a group's start)
            n = [sum(sum(t != -100 for t in ex.labels[1:]) for ex in batches[i])
                 for i in range(group_start, group_start + group)]
            total = ctx.par.sum(torch.tensor(float(sum(n)), dtype=torch.float64, device=ctx.device))
            self._group_tokens = (n, group_start, float(total))
        n, start, total = self._group_tokens
        # DDP and FSDP average the processes' gradients: the world size undoes that mean
        return n[b - start] / max(total, 1.0) * ctx.world

    def _optimizer_step(self, epoch: int, stage: int) -> tuple[float, float, int]:
        """Apply the accumulated gradients (unless the loss or gradient norm is not finite); log the step.
        Returns (mean loss over the ranks, lr, tokens of every rank)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        lr = lr_at(cfg, self.step, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        # the mean of the ranks' losses, every rank's tokens (the same on every rank, as is the norm)
        totals = ctx.par.sum(torch.stack([self.loss_sum, torch.tensor(float(self.tokens), device=ctx.device)]))
        loss, tokens, norm = float(totals[0]) / ctx.world, int(totals[1]), float(norm)
        skipped = not (math.isfinite(loss) and math.isfinite(norm))
        if skipped and not cfg.skip_nonfinite:
            self._stop_nonfinite(loss, norm, epoch, stage)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        ctx.losses.append((self.step, loss))
        seconds = time.perf_counter() - self.t_group
        ctx.log.train({"step": self.step, "epoch": epoch, "stage": stage, "loss": loss, "lr": lr,
                       "grad_norm": norm, "tokens": tokens, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
                       "skipped": int(skipped), "elapsed_s": ctx.elapsed()})
        self._reset_sums()
        return loss, lr, tokens

    def _stop_nonfinite(self, loss: float, norm: float, epoch: int, stage: int) -> None:
        """Stop before the bad update is applied or checkpointed: the last good checkpoint stays `latest`."""
        last = self.ctx.last_checkpoint or self.ctx.resume_from
        kept = f"the last checkpoint, {last}, is unchanged" if last else "no checkpoint was written"
        raise CoconutError(f"step {self.step + 1} (epoch {epoch}, stage {stage}): the loss is {loss} and the "
                           f"gradient norm {norm}; the run stopped before applying it ({kept}). Lower lr, set "
                           f"max_grad_norm, or set skip_nonfinite: true to skip such steps")


class Progress:
    """What an epoch shows while it trains (rank 0, `progress: true`): stage, epoch, step, loss, lr and
    throughput (tokens per second since the epoch began, every process's tokens). A tqdm bar on a terminal;
    elsewhere (a log file, a pipe) a plain line every `log_every` steps and at the epoch's end, so a log
    gets readable lines instead of carriage-return redraws."""

    def __init__(self, show: bool, epoch: int, stage: int, total: int, initial: int, log_every: int,
                 stream=None):
        self.show, self.epoch, self.stage, self.total, self.log_every = show, epoch, stage, total, log_every
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.tokens, self.t0 = initial, 0, time.perf_counter()
        self.last: tuple[int, float, float] | None = None  # (step, loss, lr) of the newest update
        self.bar = None
        if show and _is_tty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"stage {stage} epoch {epoch}", dynamic_ncols=True,
                            leave=True, file=self.stream, unit="step")

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        self.last = (step, loss, lr)
        if not self.show:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.log_every == 0 or self.done == self.total:
                self.bar.set_postfix(step=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.rate():.0f}")
        elif step % self.log_every == 0:
            self._line()

    def _line(self) -> None:
        step, loss, lr = self.last
        print(f"[train] stage {self.stage} epoch {self.epoch} step {step} ({self.done}/{self.total} of the "
              f"epoch) loss {loss:.4f} lr {lr:.2e} {self.rate():.0f} tokens/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.show and self.last is not None and self.last[0] % self.log_every:
            self._line()  # the epoch's last step, unless its line was just written


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
