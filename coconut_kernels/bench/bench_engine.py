"""Continuous batching (`LatentEngine`) vs static batches of `LatentLM.generate` on a mixed workload.

Prompts `question <bot> <latent>*k <eot>` with k drawn from [0, --max-latents] and an answer length drawn from
[4, --max-answer] per prompt (EOS disabled, so every request decodes exactly its answer length). The static
baseline runs `generate` over batches of --max-batch prompts in input order, each batch until its longest
answer (max_new_tokens = the batch's longest); the engine runs all prompts through --max-batch slots, each
request with its own max_tokens. Rate: answer tokens per second (the requested ones; the static batch's extra
tokens past a request's length are not counted). Median of --repeats runs of each, alternated.

    python -m coconut_kernels.bench.bench_engine --size gpt2-4x256 --prompts 32 --max-batch 8 --repeats 3 --threads 2
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from coconut_kernels import LatentLM
from coconut_kernels.engine import LatentEngine, SamplingParams

from .workloads import Special, collate, make_models

NEVER = -1  # an EOS id no token has


def workload(n: int, vocab: int, max_latents: int, max_answer: int, q_len: tuple[int, int], seed: int = 0):
    sp, rng = Special.for_vocab(vocab), random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(0, max_latents)
        q = [rng.randrange(vocab - 4) for _ in range(rng.randint(*q_len))]
        out.append((q + [sp.bot] + [sp.latent] * k + [sp.eot], rng.randint(4, max_answer)))
    return out


def run_static(lm, work, max_batch: int) -> int:
    tokens = 0
    for i in range(0, len(work), max_batch):
        chunk = work[i:i + max_batch]
        batch = collate([{"input_ids": p} for p, _ in chunk], lm.model.config.vocab_size, layout="ragged")
        lm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max(m for _, m in chunk))
        tokens += sum(m for _, m in chunk)
    return tokens


def run_engine(lm, work, max_batch: int, max_tokens: int) -> int:
    eng = LatentEngine(lm, max_batch, max_tokens)
    outs = eng.generate([p for p, _ in work], [SamplingParams(max_tokens=m) for _, m in work])
    assert all(o.error is None for o in outs)
    return sum(len(o.samples[0].token_ids) for o in outs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="gpt2-4x256")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-latents", type=int, default=8)
    ap.add_argument("--max-answer", type=int, default=32)
    ap.add_argument("--q-len", default="40,80", help="question length range min,max")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    _, model = make_models(a.size, a.vocab)
    sp = Special.for_vocab(a.vocab)
    lm = LatentLM(model, sp.latent, sp.bot, sp.eot, NEVER)
    q_len = tuple(int(x) for x in a.q_len.split(","))
    work = workload(a.prompts, a.vocab, a.max_latents, a.max_answer, q_len)
    max_tokens = max(len(p) + m for p, m in work) + 1
    runs = {"static generate": lambda: run_static(lm, work, a.max_batch),
            "engine": lambda: run_engine(lm, work, a.max_batch, max_tokens)}
    with torch.no_grad():
        for f in runs.values():  # warm-up
            f()
        times = {k: [] for k in runs}
        tokens = {}
        for _ in range(a.repeats):
            for k, f in runs.items():
                t0 = time.perf_counter()
                tokens[k] = f()
                times[k].append(time.perf_counter() - t0)
    print(f"# {a.size}, vocab {a.vocab}, {a.prompts} prompts (question {q_len}, latents 0-{a.max_latents}, "
          f"answers 4-{a.max_answer}), max_batch {a.max_batch}, {a.threads} threads, torch {torch.__version__}")
    base = None
    for k in runs:
        med = statistics.median(times[k])
        rate = tokens[k] / med
        base = base or rate
        print(f"{k:16s} {tokens[k]:5d} answer tokens  median {med:7.3f} s  {rate:8.1f} tok/s  "
              f"x{rate / base:.2f}  runs {[round(t, 3) for t in times[k]]}")


if __name__ == "__main__":
    main()
