"""Evaluation of a LatentLM at one curriculum stage: the stage's prompts (`build_prompt`), batched greedy
`LatentLM.generate`, decoding, and exact match on the answer after "###" and on the reasoning (the official
metrics), plus the mean numbers of generated tokens and latents, pass@k over sampled decodings, and the
validation loss of the stage's training layout. Sharded over the processes of a distributed run (each rank takes every
world-th record; the counts are summed).
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch
import torch.distributed as dist

from ..data import StageConfig, TokenizedRecord, build_example, build_prompt, extract_answer, extract_cot, is_correct

__all__ = ["evaluate", "validation_loss"]


@torch.no_grad()
def evaluate(lm, records: list[TokenizedRecord], stage: int, stage_config: StageConfig, tokenizer, collator, *,
             batch_size: int, max_new_tokens: int, device: torch.device, bf16: bool = False, rank: int = 0,
             world: int = 1, n_samples: int = 3, outputs: bool = False, samples: int = 0, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None) -> dict:
    """Returns {accuracy, cot_accuracy, mean_new_tokens, mean_latents, correct, cot_correct, n, samples}; ``lm``
    is the unwrapped LatentLM (its parameters must be whole on this rank: FSDP callers unshard around the
    call). The CoT match compares the reasoning the output writes (`extract_cot`) with the record's steps, as
    the official run does. ``outputs``: also "outputs", one dict per example of this rank (prompt excluded).
    ``samples`` k > 0: k more decodings per prompt, drawn at ``temperature`` (top_p, top_k), scored as
    "pass@k" (an example passes when one of its k answers is right) and "sample_accuracy"."""
    mine = records[rank::world]
    was_training = lm.training
    lm.eval()
    correct = cot_correct = tokens = latents = passed = sample_correct = 0
    shown, per_example = [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def decode(prompt, row, n):
        return tokenizer.decode(prompt.input_ids + row[:n].tolist(), skip_special_tokens=True)

    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        prompts = [build_prompt(r, stage, stage_config, tokenizer) for r in chunk]
        batch = collator(prompts)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        with autocast:
            out = lm.generate(ids, mask, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            drawn = None
            if samples:
                drawn = lm.generate(ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0),
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                                    generator=generator)
        gen, lengths, n_lat = out.tokens.cpu(), out.lengths.cpu(), out.n_latents.cpu()
        for b, (rec, prompt) in enumerate(zip(chunk, prompts)):
            n = int(lengths[b])
            text = decode(prompt, gen[b], n)
            ok = is_correct(text, rec.answer_text)
            reference_cot = tokenizer.decode([t for step in rec.steps for t in step], skip_special_tokens=True).strip()
            cot_ok = extract_cot(text) == reference_cot
            correct += ok
            cot_correct += cot_ok
            tokens += n
            latents += int(n_lat[b])
            if len(shown) < n_samples:
                # what follows the question's line: the generated reasoning and answer
                shown.append({"idx": rec.idx, "answer": rec.answer_text, "output": text.split("\n", 1)[-1],
                              "correct": ok})
            row = {"idx": rec.idx, "answer": rec.answer_text, "output": text.split("\n", 1)[-1],
                   "prediction": extract_answer(text), "correct": ok, "cot": extract_cot(text), "cot_correct": cot_ok,
                   "n_latents": int(n_lat[b]), "new_tokens": n}
            if drawn is not None:
                texts = [decode(prompt, drawn.tokens[b * samples + j].cpu(), int(drawn.lengths[b * samples + j]))
                         for j in range(samples)]
                hits = [is_correct(t, rec.answer_text) for t in texts]
                passed += any(hits)
                sample_correct += sum(hits)
                row["samples"] = [{"output": t.split("\n", 1)[-1], "prediction": extract_answer(t), "correct": h}
                                  for t, h in zip(texts, hits)]
            if outputs:
                per_example.append(row)
    counts = torch.tensor([correct, cot_correct, tokens, latents, passed, sample_correct, len(mine)],
                          dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    correct, cot_correct, tokens, latents, passed, sample_correct, n = (int(x) for x in counts.tolist())
    lm.train(was_training)
    res = {"accuracy": correct / max(n, 1), "cot_accuracy": cot_correct / max(n, 1),
           "mean_new_tokens": tokens / max(n, 1), "mean_latents": latents / max(n, 1), "correct": correct,
           "cot_correct": cot_correct, "n": n, "samples": shown}
    if samples:
        res.update({f"pass@{samples}": passed / max(n, 1), "sample_accuracy": sample_correct / max(n * samples, 1)})
    if outputs:
        res["outputs"] = per_example
    return res


@torch.no_grad()
def validation_loss(lm, records: list[TokenizedRecord], stage: int, stage_config: StageConfig, tokenizer, collator, *,
                    batch_size: int, device: torch.device, bf16: bool = False) -> dict:
    """The loss of the stage's training layout of `records` (no uniform mixing), averaged over every labelled
    token: {"val_loss", "tokens"}. (The official run averages per-batch means; this does not depend on the
    batch size.)"""
    fixed = dataclasses.replace(stage_config, uniform_prob=0.0)
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    for start in range(0, len(records), batch_size):
        batch = collator([build_example(r, stage, fixed, tokenizer) for r in records[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            out = lm(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
        total += float(out.loss) * out.n_tokens
        count += out.n_tokens
    lm.train(was_training)
    return {"val_loss": total / max(count, 1), "tokens": count}
