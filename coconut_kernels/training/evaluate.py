"""Evaluation of a LatentLM at one curriculum stage: the stage's prompts (`build_prompt`), batched greedy
`LatentLM.generate`, decoding, and exact match on the answer after "###" and on the reasoning (the official
metrics), plus the mean numbers of generated tokens and latents, pass@k over sampled decodings, and the
validation loss of the stage's training layout. Sharded over the processes of a distributed run (each rank takes every
world-th record; the counts are summed).
"""
from __future__ import annotations

import dataclasses
import sys
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..data import StageConfig, TokenizedRecord, build_example, build_prompt, extract_answer, extract_cot, is_correct

if TYPE_CHECKING:
    from .context import RunContext

__all__ = ["evaluate", "evaluate_stage", "validation_loss"]


@torch.no_grad()
def evaluate(lm, records: list[TokenizedRecord], stage: int, stage_config: StageConfig, tokenizer, collator, *,
             batch_size: int, max_new_tokens: int, device: torch.device, autocast: bool = False, rank: int = 0,
             world: int = 1, n_samples: int = 3, outputs: bool = False, samples: int = 0, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
             schedule: dict | None = None) -> dict:
    """Returns {accuracy, cot_accuracy, mean_new_tokens, mean_latents, correct, cot_correct, n, samples}; ``lm``
    is the unwrapped LatentLM (its parameters must be whole on this rank: FSDP callers unshard around the
    call). `autocast`: run under bf16 autocast (a model cast to bf16 needs none). The CoT match compares the
    reasoning the output writes (`extract_cot`) with the record's steps, as the official run does.
    ``outputs``: also "outputs", one dict per example of this rank (prompt excluded). ``samples`` k > 0: k more
    decodings per prompt, drawn at ``temperature`` (top_p, top_k), scored as "pass@k" (an example passes when
    one of its k answers is right) and "sample_accuracy". ``schedule``: generate's latent_schedule /
    jacobi_iters (default sequential)."""
    mine = records[rank::world]
    was_training = lm.training
    lm.eval()
    rows = []
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    requested, capped = max_new_tokens, False
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        prompts = [build_prompt(r, stage, stage_config, tokenizer) for r in chunk]
        batch = collator(prompts)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        max_new_tokens = _room(lm, ids, requested)
        capped |= max_new_tokens < requested
        with amp:
            out = lm.generate(ids, mask, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              **(schedule or {}))
            drawn = None
            if samples:
                drawn = lm.generate(ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0),
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                                    generator=generator, **(schedule or {}))
        gen, lengths, n_lat = out.tokens.cpu(), out.lengths.cpu(), out.n_latents.cpu()
        for b, (rec, prompt) in enumerate(zip(chunk, prompts)):
            drawn_texts = [] if drawn is None else [
                _decode(tokenizer, prompt, drawn.tokens[b * samples + j].cpu(), int(drawn.lengths[b * samples + j]))
                for j in range(samples)]
            text = _decode(tokenizer, prompt, gen[b], int(lengths[b]))
            rows.append(_score(rec, tokenizer, text, int(lengths[b]), int(n_lat[b]), drawn_texts))
    lm.train(was_training)
    if capped and rank == 0:
        print(f"[eval] max_new_tokens {requested}: answers of the longest prompts were cut at the model's "
              f"{lm.model.config.max_position} positions", file=sys.stderr, flush=True)
    return _summary(rows, device, world, n_samples, samples, outputs)


def _room(lm, ids: torch.Tensor, max_new_tokens: int) -> int:
    """max_new_tokens, or fewer where the batch's prompts (latents included) leave fewer positions: the official
    loop decodes until EOS or max_new_tokens and fails only if an answer actually runs past the model's positions,
    so an evaluation stops a row there instead of refusing the whole batch."""
    room = lm.model.config.max_position - ids.shape[1]
    if room < 1:
        raise ValueError(f"an evaluation prompt of {ids.shape[1]} tokens (latents included) leaves no room for an "
                         f"answer in the model's {lm.model.config.max_position} positions")
    return min(max_new_tokens, room)


def _decode(tokenizer, prompt, row: torch.Tensor, n: int) -> str:
    return tokenizer.decode(prompt.input_ids + row[:n].tolist(), skip_special_tokens=True)


def _score(rec: TokenizedRecord, tokenizer, text: str, new_tokens: int, n_latents: int, drawn: list[str]) -> dict:
    """One example's row: its answer and CoT match, counts, and its sampled decodings' answers."""
    reference_cot = tokenizer.decode([t for step in rec.steps for t in step], skip_special_tokens=True).strip()
    cot = extract_cot(text)
    # what follows the question's line: the generated reasoning and answer
    row = {"idx": rec.idx, "answer": rec.answer_text, "output": text.split("\n", 1)[-1],
           "prediction": extract_answer(text), "correct": is_correct(text, rec.answer_text), "cot": cot,
           "cot_correct": cot == reference_cot, "n_latents": n_latents, "new_tokens": new_tokens}
    if drawn:
        row["samples"] = [{"output": t.split("\n", 1)[-1], "prediction": extract_answer(t),
                           "correct": is_correct(t, rec.answer_text)} for t in drawn]
    return row


def _summary(rows: list[dict], device: torch.device, world: int, n_samples: int, samples: int,
             outputs: bool) -> dict:
    """The figures over every rank's rows (summed across the processes)."""
    hits = [[s["correct"] for s in r.get("samples", [])] for r in rows]
    counts = torch.tensor([sum(r["correct"] for r in rows), sum(r["cot_correct"] for r in rows),
                           sum(r["new_tokens"] for r in rows), sum(r["n_latents"] for r in rows),
                           sum(any(h) for h in hits), sum(sum(h) for h in hits), len(rows)],
                          dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    correct, cot_correct, tokens, latents, passed, sample_correct, n = (int(x) for x in counts.tolist())
    shown = [{k: r[k] for k in ("idx", "answer", "output", "correct")} for r in rows[:n_samples]]
    res = {"accuracy": correct / max(n, 1), "cot_accuracy": cot_correct / max(n, 1),
           "mean_new_tokens": tokens / max(n, 1), "mean_latents": latents / max(n, 1), "correct": correct,
           "cot_correct": cot_correct, "n": n, "samples": shown}
    if samples:
        res.update({f"pass@{samples}": passed / max(n, 1), "sample_accuracy": sample_correct / max(n * samples, 1)})
    if outputs:
        res["outputs"] = rows
    return res


@torch.no_grad()
def validation_loss(lm, records: list[TokenizedRecord], stage: int, stage_config: StageConfig, tokenizer, collator, *,
                    batch_size: int, device: torch.device, autocast: bool = False,
                    schedule: dict | None = None) -> dict:
    """The loss of the stage's training layout of `records` (no uniform mixing), averaged over every labelled
    token: {"val_loss", "tokens"}. (The official run averages per-batch means; this does not depend on the
    batch size.) `autocast` and `schedule` as in `evaluate`."""
    fixed = dataclasses.replace(stage_config, uniform_prob=0.0)
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    for start in range(0, len(records), batch_size):
        batch = collator([build_example(r, stage, fixed, tokenizer) for r in records[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp:
            out = lm(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"],
                     **(schedule or {}))
        total += float(out.loss) * out.n_tokens
        count += out.n_tokens
    lm.train(was_training)
    return {"val_loss": total / max(count, 1), "tokens": count}


def evaluate_stage(ctx: RunContext, step: int, epoch: int, stage: int, train_loss: float | None = None) -> dict:
    """Evaluate the run's model on the validation split at `stage` (what run.py reports: answer and CoT exact
    match, the validation loss of the stage's training layout, and the latents per example), log the row with
    the epoch's mean `train_loss` (and print it with a few samples on rank 0); every rank calls it."""
    cfg, data = ctx.cfg, ctx.data
    autocast = cfg.compute_precision == "bf16-autocast"
    with ctx.par.whole() as lm:
        res = evaluate(lm, data.val, stage, data.stage_config, data.tokenizer, data.collator,
                       batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, device=ctx.device,
                       autocast=autocast, rank=ctx.rank, world=ctx.world,
                       schedule=cfg.schedule)
        loss = validation_loss(lm, data.val, stage, data.stage_config, data.tokenizer, data.collator,
                               batch_size=cfg.eval_batch_size, device=ctx.device, autocast=autocast,
                               schedule=cfg.schedule)
    row = {"step": step, "epoch": epoch, "stage": stage, "accuracy": res["accuracy"],
           "cot_accuracy": res["cot_accuracy"], "val_loss": loss["val_loss"], "train_loss": train_loss, "mean_latents": res["mean_latents"],
           "mean_new_tokens": res["mean_new_tokens"], "correct": res["correct"], "n": res["n"],
           "elapsed_s": ctx.elapsed()}
    ctx.log.eval(row)
    ctx.evals.append(row)
    if ctx.rank == 0:
        print(f"[eval] epoch {epoch} stage {stage}: accuracy {100 * row['accuracy']:.1f}% "
              f"({row['correct']}/{row['n']}), CoT match {100 * row['cot_accuracy']:.1f}%, validation loss "
              f"{row['val_loss']:.4f}" + ("" if train_loss is None else f" (training loss {train_loss:.4f})") +
              f", {row['mean_new_tokens']:.1f} new tokens", file=sys.stderr)
        for s in res["samples"]:
            print(f"  [{'ok' if s['correct'] else 'x '}] {s['output']!r}", file=sys.stderr)
    return row
