"""Does a small model learn to look an edge up in its prompt, on this CPU, in the steps a demo can afford?

Every ProsQA method needs one circuit first: given a node, find the sentence (or pair) that starts with it
in the question and copy what follows (a key-value lookup, the "induction head" of the interpretability
literature). This probe trains that alone: each sequence lists ``--pairs`` random (key, value) pairs over
``--symbols`` symbols as ``k v |``, then queries ``? k v``; the loss is on the values the model must copy.
It trains this library's Llama and transformers' ``LlamaForCausalLM`` of the same shape side by side, on the
same batches from the same seed, so a failure to learn is the task's and the budget's, not the library's.

The knobs move the task towards what a ProsQA chain of thought asks for:
``--queries all`` asks for every key once (in random order) instead of one key at the end (a denser signal);
``--values keys`` draws the values from the keys, so a symbol is a key in one pair and a value in others (as
a node is the source of some edges and the target of others); ``--children K`` gives each key K values (as
a node has several children; any of them counts as right); ``--gap`` puts a separator between the queried
key and its value (as the ``"\n"`` after each step of a chain does).

    OMP_NUM_THREADS=1 python examples/prosqa_cpu/lookup_probe.py --steps 3000

Prints, every ``--every`` steps, each model's loss and accuracy (the predicted value is one of the key's
values) on that step's batch (chance: 1/symbols).
"""
from __future__ import annotations

import argparse
import random
import time

import torch


def batches(seed: int, batch: int, pairs: int, symbols: int, queries: str = "one", values: str = "any",
            children: int = 1, gap: bool = False):
    """Yields (x, targets): x (B, T) token ids, targets (B, T) bool, True where x holds a queried value.

    Each row: ``k v |`` per pair (keys shuffled), then ``? k [|] v`` per query. Symbols are 0..symbols-1,
    ``|`` is ``symbols`` and ``?`` is ``symbols + 1``. ``pairs`` is the number of pairs; with ``children``
    K, ceil(pairs / K) distinct keys hold them, K each (the last fewer)."""
    rng = random.Random(seed)
    sep, query = symbols, symbols + 1
    while True:
        rows, marks = [], []
        for _ in range(batch):
            keys = rng.sample(range(symbols), -(-pairs // children))
            pool = keys if values == "keys" else range(symbols)
            edges = [(k, rng.choice([s for s in pool if s != k])) for k in (keys[i // children] for i in range(pairs))]
            rng.shuffle(edges)
            row = [t for k, v in edges for t in (k, v, sep)]
            mark = [False] * len(row)
            asked = list(dict.fromkeys(k for k, _ in edges))
            asked = rng.sample(asked, len(asked)) if queries == "all" else [rng.choice(asked)]
            for k in asked:
                v = rng.choice([v for kk, v in edges if kk == k])
                row += [query, k] + ([sep] if gap else []) + [v]
                mark += [False, False] + ([False] if gap else []) + [True]
            rows.append(row)
            marks.append(mark)
        yield torch.tensor(rows), torch.tensor(marks)


def accuracy(x: torch.Tensor, marks: torch.Tensor, pred: list[int], pairs: int, gap: bool) -> float:
    """Fraction of the queried values (``marks``, in row-major order) whose prediction ``pred`` is one of the
    queried key's values in that row's pair list."""
    rows, cols = marks.nonzero(as_tuple=True)
    keys = x[rows, cols - (2 if gap else 1)].tolist()
    tables = values_of(x, pairs)
    return sum(v in tables[r][k] for r, k, v in zip(rows.tolist(), keys, pred)) / len(pred)


def values_of(x: torch.Tensor, pairs: int) -> list[dict[int, set[int]]]:
    """Per row of x: key -> the set of its values in the row's pair list."""
    out = []
    for row in x.tolist():
        table: dict[int, set[int]] = {}
        for i in range(0, 3 * pairs, 3):
            table.setdefault(row[i], set()).add(row[i + 1])
        out.append(table)
    return out


def models(args, vocab: int):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from coconut_kernels.models import Llama, LlamaConfig

    asked = -(-args.pairs // args.children) if args.queries == "all" else 1
    positions = max(128, 3 * args.pairs + asked * (4 if args.gap else 3))
    torch.manual_seed(args.seed)
    ours = Llama(LlamaConfig(vocab_size=vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                             d_ff=2 * args.d_model, max_position=positions))
    torch.manual_seed(args.seed)
    hf = LlamaForCausalLM(HFConfig(vocab_size=vocab, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                                   max_position_embeddings=positions, tie_word_embeddings=False))
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
    p.add_argument("--queries", choices=("one", "all"), default="one")
    p.add_argument("--values", choices=("any", "keys"), default="any")
    p.add_argument("--children", type=int, default=1)
    p.add_argument("--gap", action="store_true")
    p.add_argument("--easy_first", type=int, default=0,
                   help="train the first N steps on the easy task (every key asked, one value each, no gap)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pairs", "symbols", "layers", "heads", "d_model", "every", "threads", "children"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.pairs > args.symbols:
        p.error("--pairs must be <= --symbols (keys are distinct)")
    if args.easy_first < 0:
        p.error("--easy_first must be >= 0")
    if args.children > args.pairs:
        p.error("--children must be <= --pairs")
    if args.symbols < 2:
        p.error("--symbols must be >= 2 (a value differs from its key)")
    if args.values == "keys" and -(-args.pairs // args.children) < 2:
        p.error("--values keys needs at least 2 keys (a value differs from its key): lower --children")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.pairs} pairs of {args.symbols} "
          f"symbols, chance {1 / args.symbols:.3f}")
    runs = models(args, args.symbols + 2)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=args.lr) for n, (m, _) in runs.items()}
    spent = dict.fromkeys(runs, 0.0)
    data = batches(args.seed, args.batch, args.pairs, args.symbols, args.queries, args.values, args.children,
                   args.gap)
    easy = batches(args.seed + 1, args.batch, args.pairs, args.symbols, "all")
    for step in range(1, args.steps + 1):
        warm = step <= args.easy_first
        x, marks = next(easy if warm else data)
        target = marks[:, 1:]  # logits at t predict x[t + 1]
        line = []
        for name, (_, fwd) in runs.items():
            t = time.perf_counter()
            logits = fwd(x[:, :-1])[target].float()
            loss = torch.nn.functional.cross_entropy(logits, x[:, 1:][target])
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            spent[name] += time.perf_counter() - t
            acc = accuracy(x, marks, logits.argmax(-1).tolist(), args.pairs, args.gap and not warm)
            line.append(f"{name} loss {loss.item():.3f} acc {acc:.3f} ({spent[name]:.0f} s)")
        if step % args.every == 0 or step == args.steps:
            print(f"step {step}{' (easy)' if warm else ''}: " + "   ".join(line), flush=True)


if __name__ == "__main__":
    main()
