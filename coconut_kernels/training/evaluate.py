"""Evaluation of a LatentLM at one curriculum stage: the stage's prompts (`build_prompt`), batched greedy
`LatentLM.generate`, decoding, and exact match on the answer after "###" (the official metric), plus the
mean number of generated tokens. Sharded over the processes of a distributed run (each rank takes every
world-th record; the counts are summed).
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..data import StageConfig, TokenizedRecord, build_prompt, is_correct

if TYPE_CHECKING:
    from .context import RunContext

__all__ = ["evaluate", "evaluate_stage"]


@torch.no_grad()
def evaluate(lm, records: list[TokenizedRecord], stage: int, stage_config: StageConfig, tokenizer, collator, *,
             batch_size: int, max_new_tokens: int, device: torch.device, autocast: bool = False, rank: int = 0,
             world: int = 1, n_samples: int = 3, schedule: dict | None = None) -> dict:
    """Returns {accuracy, mean_new_tokens, correct, n, samples}; ``lm`` is the unwrapped LatentLM (its
    parameters must be whole on this rank: FSDP callers unshard around the call). `autocast`: run under bf16
    autocast (a model cast to bf16 needs none). `schedule`: generate's latent_schedule / jacobi_iters (default
    sequential)."""
    mine = records[rank::world]
    was_training = lm.training
    lm.eval()
    correct = tokens = 0
    samples = []
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        prompts = [build_prompt(r, stage, stage_config, tokenizer) for r in chunk]
        batch = collator(prompts)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        with amp:
            out = lm.generate(ids, mask, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              **(schedule or {}))
        gen, lengths = out.tokens.cpu(), out.lengths.cpu()
        for rec, prompt, row, n in zip(chunk, prompts, gen, lengths.tolist()):
            text = tokenizer.decode(prompt.input_ids + row[:n].tolist(), skip_special_tokens=True)
            ok = is_correct(text, rec.answer_text)
            correct += ok
            tokens += n
            if len(samples) < n_samples:
                # what follows the question's line: the generated reasoning and answer
                samples.append({"idx": rec.idx, "answer": rec.answer_text, "output": text.split("\n", 1)[-1],
                                "correct": ok})
    counts = torch.tensor([correct, tokens, len(mine)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    correct, tokens, n = (int(x) for x in counts.tolist())
    lm.train(was_training)
    return {"accuracy": correct / max(n, 1), "mean_new_tokens": tokens / max(n, 1), "correct": correct, "n": n,
            "samples": samples}


def evaluate_stage(ctx: RunContext, step: int, epoch: int, stage: int) -> dict:
    """Evaluate the run's model on the validation split at `stage`, log the row (and print it with a few
    samples on rank 0); every rank calls it."""
    cfg, data = ctx.cfg, ctx.data
    with ctx.par.whole() as lm:
        res = evaluate(lm, data.val, stage, data.stage_config, data.tokenizer, data.collator,
                       batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, device=ctx.device,
                       autocast=cfg.compute_precision == "bf16-autocast", rank=ctx.rank, world=ctx.world,
                       schedule=cfg.schedule)
    row = {"step": step, "epoch": epoch, "stage": stage, "accuracy": res["accuracy"],
           "mean_new_tokens": res["mean_new_tokens"], "correct": res["correct"], "n": res["n"],
           "elapsed_s": ctx.elapsed()}
    ctx.log.eval(row)
    ctx.evals.append(row)
    if ctx.rank == 0:
        print(f"[eval] epoch {epoch} stage {stage}: accuracy {100 * row['accuracy']:.1f}% "
              f"({row['correct']}/{row['n']}), {row['mean_new_tokens']:.1f} new tokens", file=sys.stderr)
        for s in res["samples"]:
            print(f"  [{'ok' if s['correct'] else 'x '}] {s['output']!r}", file=sys.stderr)
    return row
