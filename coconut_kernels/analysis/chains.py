"""What a written chain of thought does on ProsQA-style problems, and what simple strategies would score: the
yardsticks that say why a CoT model sits below a guess between the two options.

``python -m coconut_kernels.analysis.chains --data valid.json [--outputs coconut_eval.json]``

Baselines of a data file (from the graphs alone): a chain that follows a uniformly drawn edge out of its current
node for as many steps as the shortest path to the target (the published chain's length; a CoT that can read
edges but cannot plan) ends at the target with probability `random_walk`; answering the option that fewer edges
point to scores `fewer_parents` (a shortcut the published split allows); `root_children` is the mean number of
edges out of the root (the first choice a chain must make). With ``--outputs`` (coconut-eval's per-example
file), the written chains are read back: the share of their steps that are edges of the question's graph, of
steps that name a word which is no node of the question, of steps that name one node twice ("Every X is a X."),
of chains whose first step leaves the root along an edge, of chains that are a walk from the root, and where the
chains end. Records of the generator's edges render (steps are node names, one per line) are read as walks from
the root. Records of its backward chain (steps ``x y``, see ``generate_dataset``) are read by
``read_backward_chains``: chains whose two walks go against edges only, chains where the right option's walk and
only it ends at the asked person, and how often the answer then names that option.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from .._cli import run_cli
from ..errors import CoconutError
from .graph import GraphInfo, graph_info

__all__ = ["baselines", "chain_steps", "read_chains", "read_backward_chains", "main"]

# one written step: "Tom is a wumpus." or "Every wumpus is a yumpus."
_STEP = re.compile(r"(?:Every )?(\S+) is an? (\S+?)\.")


def _walk_success(info: GraphInfo, n_steps: int) -> float:
    """Probability that a walk from the root taking a uniformly drawn out-edge at each of `n_steps` steps
    ends at the target (a walk stuck at a leaf stays there)."""
    succ: dict[int, list[int]] = defaultdict(list)
    for a, b in info.edges:
        succ[a].append(b)
    dist = {info.root: 1.0}
    for _ in range(n_steps):
        nxt: dict[int, float] = defaultdict(float)
        for v, p in dist.items():
            for w in succ[v] or [v]:
                nxt[w] += p / max(len(succ[v]), 1)
        dist = nxt
    return dist.get(info.target, 0.0)


def baselines(records: list[dict], where: str) -> dict:
    """{n, random_walk, fewer_parents, root_children} over `records` (see the module's docstring); a tie in
    the number of parents counts as a coin flip."""
    walk = fewer = children = 0.0
    for i, r in enumerate(records):
        info = graph_info(r, f"{where}: record {i}")
        if not isinstance(r.get("steps"), list):
            raise CoconutError(f"{where}: record {i}: field 'steps': expected a list of reasoning steps")
        walk += _walk_success(info, info.depth.get(info.target, 0))  # unreachable: no walk gets there
        parents = defaultdict(int)
        for _, b in info.edges:
            parents[b] += 1
        t, nt = parents[info.target], parents[info.neg_target]
        fewer += 1.0 if t < nt else 0.5 if t == nt else 0.0
        children += sum(a == info.root for a, _ in info.edges)
    n = max(len(records), 1)
    return {"n": len(records), "random_walk": walk / n, "fewer_parents": fewer / n, "root_children": children / n}


def chain_steps(text: str, info: GraphInfo, render: str = "text") -> list[tuple[int | None, int | None]]:
    """The (subject, object) node indices of each step written before "###" (None: not a node name).
    ``render="edges"`` (the generator's compact records): one node name per line, each step going from the
    node before it (the root for the first)."""
    index = info.index
    chain = text.split("###")[0]
    if render == "edges":
        names = [line.strip() for line in chain.split("\n") if line.strip()]
        nodes = [info.root] + [index.get(name) for name in names]
        return list(zip(nodes, nodes[1:]))
    return [(index.get(a), index.get(b)) for a, b in _STEP.findall(chain)]


def _render(record: dict) -> str:
    """"text" when the record's steps are sentences (``Every X is a Y.``), "edges" when they are node names."""
    steps = record.get("steps") or []
    return "edges" if steps and all(isinstance(x, str) and not _STEP.search(x) for x in steps) else "text"


def _graph_of(records: list[dict], example: dict, j: int, where: str) -> tuple[dict, GraphInfo]:
    """The data record that coconut-eval's example `j` names by its 'idx', and its graph."""
    i = example.get("idx")
    if not isinstance(i, int) or not 0 <= i < len(records):
        raise CoconutError(f"{where}: example {j}: field 'idx': expected a record index of the data file "
                           f"(0..{len(records) - 1}), got {i!r}")
    return records[i], graph_info(records[i], f"data record {i}")


def read_chains(records: list[dict], outputs: list[dict], where: str) -> dict:
    """How the written chains of `outputs` (coconut-eval's examples: idx, output) relate to the graphs of
    `records`: {n, steps, edge_steps, foreign_steps, self_loops, root_first, walks, end_target,
    end_wrong_option}, shares of steps (edge_steps, foreign_steps, self_loops) or of chains (the rest)."""
    n_steps = edge_steps = foreign = loops = root_first = walks = end_t = end_nt = 0
    for j, ex in enumerate(outputs):
        record, info = _graph_of(records, ex, j, where)
        edges = set(info.edges)
        steps = chain_steps(str(ex.get("output", "")), info, _render(record))
        on_edge = [s in edges for s in steps]
        n_steps += len(steps)
        edge_steps += sum(on_edge)
        foreign += sum(a is None or b is None for a, b in steps)
        loops += sum(a is not None and a == b for a, b in steps)
        root_first += bool(steps) and on_edge[0] and steps[0][0] == info.root
        walks += (bool(steps) and all(on_edge) and steps[0][0] == info.root
                  and all(steps[k][1] == steps[k + 1][0] for k in range(len(steps) - 1)))
        end = steps[-1][1] if steps else None
        end_t += end == info.target
        end_nt += end == info.neg_target
    n = max(len(outputs), 1)
    return {"n": len(outputs), "steps": n_steps, "edge_steps": edge_steps / max(n_steps, 1),
            "foreign_steps": foreign / max(n_steps, 1), "self_loops": loops / max(n_steps, 1), "root_first": root_first / n, "walks": walks / n,
            "end_target": end_t / n, "end_wrong_option": end_nt / n}


def _options(record: dict) -> list[str]:
    """The two options as the edges render's question names them (``... A or B? Tom``)."""
    tail = str(record.get("question", "")).rsplit(". ", 1)[-1]
    return tail.split("? ")[0].split(" or ")


def _is_backward(record: dict) -> bool:
    steps = record.get("steps") or []
    return bool(steps) and all(isinstance(x, str) and len(x.split()) == 2 for x in steps) \
        and steps[0].split() == _options(record)


def read_backward_chains(records: list[dict], outputs: list[dict], where: str) -> dict:
    """Written backward chains (``x y`` per line, the options first) against the graphs of `records`:
    {n, on_edges (both walks step against edges only, or repeat a person), target_walk (the right option's
    walk, and only it, ends at the asked person), answer_follows (of those, the answer names the right
    option)}, each a share of the chains (answer_follows: of the target_walk chains)."""
    on_edges = target_walk = follows = 0
    for j, ex in enumerate(outputs):
        _, info = _graph_of(records, ex, j, where)
        chain, _, answer = str(ex.get("output", "")).partition("###")
        lines = [line.split() for line in chain.split("\n") if line.strip()]
        if not lines or any(len(line) != 2 for line in lines):
            continue
        walks = [[info.index.get(line[k]) for line in lines] for k in (0, 1)]
        edges = set(info.edges)
        has_parent = {b for _, b in edges}  # a person has none: its walk may only repeat it
        on_edges += all((b, a) in edges or (a == b and a is not None and a not in has_parent)
                        for w in walks for a, b in zip(w, w[1:]))
        ends = [w[-1] == info.root for w in walks]
        right = [w[0] == info.target for w in walks]
        if ends.count(True) == 1 and right[ends.index(True)]:
            target_walk += 1
            follows += answer.strip() == info.symbols[info.target]
    n = max(len(outputs), 1)
    return {"n": len(outputs), "on_edges": on_edges / n, "target_walk": target_walk / n,
            "answer_follows": follows / max(target_walk, 1)}


def _load(path: str, what: str):
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise CoconutError(f"{what} {path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CoconutError(f"{what} {path}: not JSON ({e})") from None
    return data


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m coconut_kernels.analysis.chains", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ProsQA-style JSON records (with idx_to_symbol, edges, root, ...)")
    p.add_argument("--outputs", help="coconut-eval's per-example JSON of a CoT model on --data")
    p.add_argument("--max-records", type=int, default=None, help="only the first N records")
    args = p.parse_args(argv)
    records = _load(args.data, "data file")
    if not isinstance(records, list):
        raise CoconutError(f"data file {args.data}: expected a JSON list of records")
    records = records[: args.max_records]
    b = baselines(records, args.data)
    print(f"{args.data} ({b['n']} problems): a chain of uniformly drawn edges ends at the target "
          f"{100 * b['random_walk']:.1f}%; answering the option with fewer parents {100 * b['fewer_parents']:.1f}%; "
          f"edges out of the root {b['root_children']:.2f} on average")
    if args.outputs:
        out = _load(args.outputs, "outputs file")
        examples = out.get("examples") if isinstance(out, dict) else None
        if not isinstance(examples, list):
            raise CoconutError(f"outputs file {args.outputs}: expected coconut-eval's JSON (an 'examples' list)")
        if records and all(_is_backward(r) for r in records):
            c = read_backward_chains(records, examples, args.outputs)
            print(f"{args.outputs} ({c['n']} backward chains): both walks against edges only "
                  f"{100 * c['on_edges']:.1f}%; the right option's walk alone ends at the asked person "
                  f"{100 * c['target_walk']:.1f}%, and the answer then names it {100 * c['answer_follows']:.1f}%")
            return 0
        c = read_chains(records, examples, args.outputs)
        print(f"{args.outputs} ({c['n']} chains, {c['steps']} steps): steps that are edges of the graph "
              f"{100 * c['edge_steps']:.1f}%, that name a word which is no node of the question "
              f"{100 * c['foreign_steps']:.1f}%, that name one node twice {100 * c['self_loops']:.1f}%; first step "
              f"along a root edge {100 * c['root_first']:.1f}%; chains that are a walk from the root "
              f"{100 * c['walks']:.1f}%; ending at the target {100 * c['end_target']:.1f}%, at the wrong option "
              f"{100 * c['end_wrong_option']:.1f}%")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("coconut_kernels.analysis.chains", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
