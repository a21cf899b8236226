"""Does a small model learn to look an edge up in its prompt, on this CPU, in the steps a demo can afford?

Every ProsQA method needs one circuit first: given a node, find the sentence (or pair) that starts with it
in the question and copy what follows (a key-value lookup, the "induction head" of the interpretability
literature). This probe trains that alone: each sequence lists ``--pairs`` random (key, value) pairs over
``--symbols`` symbols, then a query key; the loss is on the value the model must copy. It trains this
library's Llama and transformers' ``LlamaForCausalLM`` of the same shape side by side, on the same batches
from the same seed, so a failure to learn is the task's and the budget's, not the library's.

    OMP_NUM_THREADS=1 python examples/prosqa_cpu/lookup_probe.py --steps 3000

Prints, every ``--every`` steps, each model's loss and accuracy on that step's batch (chance: 1/symbols).
"""
from __future__ import annotations

import argparse
import random
import time

import torch


def batches(seed: int, batch: int, pairs: int, symbols: int):
    """(B, 3 * pairs + 3) sequences: ``k v |`` per pair, then ``? k_i v_i``."""
    rng = random.Random(seed)
    sep, query = symbols, symbols + 1
    while True:
        rows = []
        for _ in range(batch):
            keys = rng.sample(range(symbols), pairs)
            vals = [rng.randrange(symbols) for _ in keys]
            i = rng.randrange(pairs)
            rows.append([t for k, v in zip(keys, vals) for t in (k, v, sep)] + [query, keys[i], vals[i]])
        yield torch.tensor(rows)


def models(args, vocab: int):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from coconut_kernels.models import Llama, LlamaConfig

    torch.manual_seed(args.seed)
    ours = Llama(LlamaConfig(vocab_size=vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                             d_ff=2 * args.d_model, max_position=128))
    torch.manual_seed(args.seed)
    hf = LlamaForCausalLM(HFConfig(vocab_size=vocab, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                                   max_position_embeddings=128, tie_word_embeddings=False))
    return {"coconut_kernels": (ours, lambda x: ours(x)), "transformers": (hf, lambda x: hf(x).logits)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--symbols", type=int, default=100)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pairs", "symbols", "layers", "heads", "d_model", "every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.pairs > args.symbols:
        p.error("--pairs must be <= --symbols (keys are distinct)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.pairs} pairs of {args.symbols} "
          f"symbols, chance {1 / args.symbols:.3f}")
    runs = models(args, args.symbols + 2)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=args.lr) for n, (m, _) in runs.items()}
    spent = dict.fromkeys(runs, 0.0)
    data = batches(args.seed, args.batch, args.pairs, args.symbols)
    for step in range(1, args.steps + 1):
        x = next(data)
        line = []
        for name, (_, fwd) in runs.items():
            t = time.perf_counter()
            logits = fwd(x[:, :-1])[:, -1].float()
            loss = torch.nn.functional.cross_entropy(logits, x[:, -1])
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            spent[name] += time.perf_counter() - t
            acc = (logits.argmax(-1) == x[:, -1]).float().mean().item()
            line.append(f"{name} loss {loss.item():.3f} acc {acc:.3f} ({spent[name]:.0f} s)")
        if step % args.every == 0 or step == args.steps:
            print(f"step {step}: " + "   ".join(line), flush=True)


if __name__ == "__main__":
    main()
