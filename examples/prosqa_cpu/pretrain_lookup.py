"""Pretrain the example's small model to read a graph, the skill a pretrained GPT-2 brings to the paper's runs.

Every ProsQA method first has to find a node's edges in the question and copy where they lead (a key-value
lookup, an "induction head"). A 2-layer model trained from scratch on the ProsQA examples does not learn it
in 30 CPU minutes (README, "A CPU run that learns"; `lookup_probe.py` shows why: a node with several
children and the newline between two steps each hide the signal). It does learn it from an easy task first:

1. ``--lookup_steps`` steps of dense lookups: ``--keys`` pairs ``k v`` of the generator's concept nouns and
   names, then ``? k v`` for every key in random order (the loss on each ``v``); ``--lookup_direction
   backward`` asks ``? v k`` instead (the loss on each ``k``);
2. ``--walk_steps`` steps of walks: a generated question (``--size``, edges render), then ``--walks`` random
   walks along its edges, one node per line (the loss on every node after a walk's first, and on the
   newlines). A walk starts at a random node and stops at a leaf; it is not asked to reach the answer and
   no answer is ever shown. ``--walk_direction backward`` walks against the edges (to a parent, stopping at a
   person), the lookup of the ``backward`` chain; ``both`` draws the direction per walk.

It writes a coconut-train checkpoint (model and tokenizer) into ``--out``; each method then starts from it:

    OMP_NUM_THREADS=1 python examples/prosqa_cpu/pretrain_lookup.py --out runs/prosqa_cpu_lookup
    OMP_NUM_THREADS=1 coconut-train examples/prosqa_cpu/cot.yaml --init_from runs/prosqa_cpu_lookup ...

The model is the one ``--config`` describes (default: this folder's coconut.yaml, a 2-layer Llama), from its
seed. Every ``--every`` steps it prints the phase, the loss and the accuracy of that batch: a prediction
counts when it is the queried value (lookups) or a child of the node before it (walks; newlines left out).
The tokenizer covers the generator's words in both renders and the published split's, as the trainer's own
does.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from coconut_kernels.data import WordTokenizer, concept_nouns, generate_dataset, person_names
from coconut_kernels.training import load_config, save_checkpoint
from coconut_kernels.training.build import build_lm

HERE = Path(__file__).resolve().parent
WORDS = concept_nouns() + person_names()  # the lookups' keys and values


def tokenizer_for(size: str) -> WordTokenizer:
    """A word tokenizer of the generator's text and edges renders plus every concept noun and person name."""
    records = generate_dataset(50, seed=0, size=size, render="text") + generate_dataset(50, seed=0, size=size,
                                                                                       render="edges")
    return WordTokenizer.from_records(records, extra_tokens=WORDS)


def lookup_example(rng: random.Random, tok: WordTokenizer, keys: int,
                   direction: str = "forward") -> tuple[list[int], list[tuple[int, set]]]:
    """``k v, k v, ... .`` then ``? k v`` per key (forward) or ``? v k`` per pair (backward: a value asks for
    its key, any key of that value counts): (ids, [(position of an answer, {the ids that count})])."""
    ks = rng.sample(WORDS, keys)
    value = {k: rng.choice([w for w in WORDS if w != k]) for k in ks}
    ids = tok.encode(", ".join(f"{k} {value[k]}" for k in ks) + ".", add_special_tokens=True)
    targets = []
    for k in rng.sample(ks, keys):
        if direction == "forward":
            ids += tok.encode(f"? {k} {value[k]}")
            targets.append((len(ids) - 1, {ids[-1]}))
        else:
            ids += tok.encode(f"? {value[k]} {k}")
            targets.append((len(ids) - 1, {tok.encode(j)[0] for j in ks if value[j] == value[k]}))
    return ids, targets


def walk_example(rng: random.Random, tok: WordTokenizer, size: str, walks: int, direction: str = "forward"):
    """A generated question (edges render), a newline, then `walks` random walks one node per line, along the
    edges (forward: to a child) or against them (backward: to a parent); "both" draws each walk's direction:
    (ids, [(position, the ids that would be right there)])."""
    rec = generate_dataset(1, seed=rng.randrange(1 << 30), size=size, render="edges")[0]
    names = [tok.encode(s)[0] for s in rec["idx_to_symbol"]]
    nexts: dict[str, dict[int, list[int]]] = {"forward": {}, "backward": {}}
    for a, b in rec["edges"]:
        nexts["forward"].setdefault(a, []).append(b)
        nexts["backward"].setdefault(b, []).append(a)
    (nl,) = tok.encode("\n")
    ids = tok.encode(rec["question"] + "\n", add_special_tokens=True)
    targets = []
    for _ in range(walks):
        step = nexts[rng.choice(["forward", "backward"]) if direction == "both" else direction]
        node = rng.choice(sorted(step))
        ids += [names[node], nl]
        targets.append((len(ids) - 1, {nl}))
        while node in step:
            here = {names[c] for c in step[node]}
            node = rng.choice(step[node])
            ids += [names[node], nl]
            targets += [(len(ids) - 2, here), (len(ids) - 1, {nl})]
    return ids, targets


def batch_of(examples, pad: int):
    """(ids (B, T), the loss positions as (rows, cols), their right answers) of a list of examples."""
    width = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), width), pad, dtype=torch.long)
    rows, cols, right = [], [], []
    for i, (ids, targets) in enumerate(examples):
        x[i, :len(ids)] = torch.tensor(ids)
        for pos, ok in targets:
            rows.append(i)
            cols.append(pos)
            right.append(ok)
    return x, (torch.tensor(rows), torch.tensor(cols)), right


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE / "coconut.yaml"), help="a coconut-train config: its model, seed")
    p.add_argument("--out", default="runs/prosqa_cpu_lookup")
    p.add_argument("--lookup_steps", type=int, default=700)
    p.add_argument("--walk_steps", type=int, default=800)
    p.add_argument("--keys", type=int, default=12)
    p.add_argument("--walks", type=int, default=4)
    p.add_argument("--lookup_direction", choices=("forward", "backward"), default="forward",
                   help="a lookup asks a key's value (forward) or a value's key (backward)")
    p.add_argument("--walk_direction", choices=("forward", "backward", "both"), default="forward",
                   help="walk along the edges (to children), against them (to parents) or either, drawn per walk")
    p.add_argument("--size", default="small", help="the generator's size for the walks' graphs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="the data's seed (the weights': the config's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--every", type=int, default=100)
    args = p.parse_args(argv)
    for name in ("keys", "walks", "batch", "threads", "every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    for name in ("lookup_steps", "walk_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if args.keys > len(WORDS) - 1:
        p.error(f"--keys must be < {len(WORDS)} (keys are distinct words)")
    torch.set_num_threads(args.threads)
    tok = tokenizer_for(args.size)
    cfg = load_config(args.config, {"init_from": None, "tokenizer": None})
    lm = build_lm(cfg, tok, None)
    model = lm.model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model of {args.config}, "
          f"{sum(t.numel() for t in model.parameters()):,} parameters; vocabulary {tok.vocab_size}")
    t0, total = time.perf_counter(), args.lookup_steps + args.walk_steps
    (newline,) = tok.encode("\n")
    for step in range(1, total + 1):
        phase = "lookup" if step <= args.lookup_steps else "walks"
        examples = [lookup_example(rng, tok, args.keys, args.lookup_direction) if phase == "lookup" else
                    walk_example(rng, tok, args.size, args.walks, args.walk_direction) for _ in range(args.batch)]
        x, (rows, cols), right = batch_of(examples, tok.pad_token_id)
        logits = model(x[:, :-1])[rows, cols - 1].float()  # the logits at t predict the token at t + 1
        loss = torch.nn.functional.cross_entropy(logits, x[rows, cols])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0 or step == total:  # newlines, trivially right, are left out of the accuracy
            scored = [(int(t), ok) for t, ok in zip(logits.argmax(-1).tolist(), right) if newline not in ok]
            acc = sum(t in ok for t, ok in scored) / len(scored)
            print(f"step {step} ({phase}): loss {loss.item():.3f}, accuracy {acc:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    family = "gpt2" if type(model).__name__ == "GPT2" else "llama"
    folder = save_checkpoint(args.out, total, lm.state_dict(), model.config, family, tok, None,
                             {"pretrain_lookup": vars(args), "model": cfg.model}, keep=1)
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
