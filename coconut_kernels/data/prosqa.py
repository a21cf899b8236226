"""ProsQA-style problem generator (training data for the curriculum; the published split is for evaluation).

Follows the paper's recipe: a random DAG of fictional "-pus" concepts whose roots are people; the question
lists every edge as a sentence, shuffled, and asks whether the root person is one of two leaf concepts, of
which exactly one is reachable from that person; the steps walk one shortest path to it. The size knobs
are tuned so the means match the validation split (≈23 nodes, ≈36 edges, 3.75 steps, ≈180 words): the
``"prosqa"`` size. The ``"small"`` size draws the same kind of graph with fewer people, concepts per level and
extra parents (≈13 nodes, ≈14 edges, 3.4 steps, ≈70 words): shorter sequences for experiments on a CPU, not
for comparing with the paper (a small model trained from scratch has not learnt even these in 30 CPU
minutes; see the README).
"""
from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["CHAINS", "concept_nouns", "person_names", "generate_problem", "generate_dataset", "reachable", "GraphSize",
           "SIZES", "RENDERS"]

# Nouns are onset + vowel + (m|r|l) + "pus", the pattern of the split's vocabulary; the onsets cover every
# noun the split uses, so a word tokenizer built from generated data also covers the split.
_ONSETS = ("", "b", "br", "ch", "d", "f", "g", "gr", "gw", "h", "j", "k", "l", "n", "qu", "r", "scr",
           "sh", "st", "t", "v", "w", "y", "z", "zh")
_VOWELS = ("e", "i", "o", "oo", "u")
_CODAS = ("m", "r", "l")
_NAMES = ("Alex", "Amy", "Ben", "Bob", "Carol", "Dan", "Davis", "Eli", "Emma", "Eva", "Fae", "Finn",
          "Gabriel", "Grace", "Hank", "Ivy", "Jack", "Jane", "Kate", "Leo", "Lily", "Max", "Mia", "Nina",
          "Oliver", "Owen", "Polly", "Quinn", "Rex", "Rose", "Sally", "Sam", "Stella", "Ted", "Tom",
          "Uma", "Vera", "Wren", "Zoe")


@dataclass(frozen=True)
class GraphSize:
    """How big a generated graph is: weight tables (value -> weight) and (low, high) ranges per level."""

    steps: dict  # reasoning steps = root-to-target distance
    extra_persons: dict  # people beyond the root and one distractor
    extra_parents: dict  # in-degree of a concept minus one
    neg_level: dict  # distance of the wrong candidate from the other people
    root_side_sizes: tuple  # concepts per distance from the root
    other_side_sizes: tuple  # concepts per distance from the other people
    cross_edge_p: float  # chance that an extra parent of a root-side concept comes from the other side

    def __post_init__(self):  # read-only tables: SIZES is shared by every caller
        for name in ("steps", "extra_persons", "extra_parents", "neg_level"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


SIZES = {
    # Distributions measured on the published validation split.
    "prosqa": GraphSize(
        steps={3: 124, 4: 133, 5: 36, 6: 7},
        extra_persons={0: 180, 1: 93, 2: 21, 3: 5, 4: 1},
        extra_parents={0: 40, 1: 34, 2: 17, 3: 6, 4: 3},
        neg_level={1: 64, 2: 160, 3: 71, 4: 5},
        root_side_sizes=((2, 4), (3, 6), (2, 4), (1, 3), (1, 2), (1, 1)),
        other_side_sizes=((2, 4), (2, 5), (0, 3), (0, 1)),
        cross_edge_p=0.2,
    ),
    # The same construction, smaller: depth 3-4, 1-3 concepts per level, at most one extra parent.
    "small": GraphSize(
        steps={3: 3, 4: 2},
        extra_persons={0: 3, 1: 1},
        extra_parents={0: 3, 1: 2},
        neg_level={1: 1, 2: 2, 3: 1},
        root_side_sizes=((2, 3), (1, 3), (1, 2), (1, 1)),
        other_side_sizes=((2, 3), (1, 2), (0, 1)),
        cross_edge_p=0.2,
    ),
}


RENDERS = ("text", "edges")
CHAINS = ("forward", "backward")


def concept_nouns() -> list[str]:
    """The fictional concept vocabulary (375 nouns, fixed order)."""
    return [o + v + c + "pus" for o, v, c in itertools.product(_ONSETS, _VOWELS, _CODAS)]


def person_names() -> list[str]:
    return list(_NAMES)


def _draw(rng: random.Random, weights: dict[int, int]) -> int:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def reachable(n_nodes: int, edges, source: int) -> dict[int, int]:
    """Breadth-first distances from ``source`` over directed ``edges`` ([src, dst] pairs)."""
    adj: list[list[int]] = [[] for _ in range(n_nodes)]
    for a, b in edges:
        adj[a].append(b)
    dist = {source: 0}
    queue = deque([source])
    while queue:
        x = queue.popleft()
        for y in adj[x]:
            if y not in dist:
                dist[y] = dist[x] + 1
                queue.append(y)
    return dist


def generate_problem(rng: random.Random, nouns: list[str] | None = None, names: list[str] | None = None,
                     size: str = "prosqa", render: str = "text", chain: str = "forward") -> dict:
    """One ProsQA-style record: question, steps, answer, idx_to_symbol, edges, root, target, neg_target.

    Construction: people are level 0; concepts are added level by level on two sides. A root-side concept
    at level j has a parent at level j-1 and extra parents from level j-1, earlier concepts of level j or
    (rarely) the other side, so its distance from the root is exactly j. Other-side concepts take parents
    from the other side only, so none is reachable from the root. The target is a root-side leaf at the
    deepest level, the wrong candidate an other-side leaf. ``size`` names an entry of ``SIZES``; ``render``
    one of ``RENDERS``, ``chain`` one of ``CHAINS`` (the same graph either way, see ``generate_dataset``).
    """
    g = _size(size)
    _check_render(render, chain)
    nouns = concept_nouns() if nouns is None else nouns
    names = person_names() if names is None else names
    n_steps = _draw(rng, g.steps)
    n_people = 2 + _draw(rng, g.extra_persons)
    neg_level = min(_draw(rng, g.neg_level), len(g.other_side_sizes))

    root = rng.randrange(2)
    nodes_side = ["r" if p == root else "o" for p in range(n_people)]  # person indices come first
    level = [0] * n_people
    parents: list[list[int]] = [[] for _ in range(n_people)]
    closed: set[int] = set()  # the two candidates stay leaves

    sizes_r = [rng.randint(*g.root_side_sizes[j]) for j in range(n_steps)]
    sizes_o = [rng.randint(*g.other_side_sizes[j]) for j in range(len(g.other_side_sizes))]
    for j in range(neg_level):  # the wrong candidate needs a chain of other-side levels above it
        sizes_o[j] = max(sizes_o[j], 1)
    sizes_r += [0] * (len(sizes_o) - len(sizes_r))
    sizes_o += [0] * (len(sizes_r) - len(sizes_o))
    target = neg_target = -1
    for j in range(1, len(sizes_r) + 1):
        order = ["r"] * sizes_r[j - 1] + ["o"] * sizes_o[j - 1]
        rng.shuffle(order)
        for side in order:
            node = len(level)
            same = [v for v in range(node) if nodes_side[v] == side and v not in closed]
            prev = [v for v in same if level[v] == j - 1]
            if not prev:  # nothing left to hang this concept on at this level
                continue
            # the other people each get a child early, so none of them is isolated
            orphans = [v for v in prev if level[v] == 0 and not any(v in p for p in parents)]
            first = rng.choice(orphans or prev)
            pool = [v for v in same if level[v] in (j - 1, j) and v != first]
            cross = [v for v in range(node) if nodes_side[v] == "o" and v not in closed] if side == "r" else []
            extra: list[int] = []
            for _ in range(_draw(rng, g.extra_parents)):
                src = cross if cross and rng.random() < g.cross_edge_p else pool
                src = [v for v in src if v not in extra and v != first]
                if src:
                    extra.append(rng.choice(src))
            nodes_side.append(side)
            level.append(j)
            parents.append([first, *extra])
            if side == "r" and j == n_steps and target < 0:
                target = node
                closed.add(node)
            if side == "o" and j == neg_level and neg_target < 0:
                neg_target = node
                closed.add(node)
    # a person left without a child points at some other-side concept
    for p in range(n_people):
        if p != root and not any(p in ps for ps in parents):
            cands = [v for v in range(n_people, len(level)) if nodes_side[v] == "o" and v != neg_target]
            parents[rng.choice(cands)].append(p)

    n = len(level)
    edges = sorted(([a, b] for b in range(n) for a in parents[b]), key=lambda e: (e[1], e[0]))
    symbols = rng.sample(names, n_people) + rng.sample(nouns, n - n_people)

    # one shortest path, walked back from the target through parents one level up
    path = [target]
    while path[-1] != root:
        v = path[-1]
        path.append(rng.choice([u for u in parents[v] if nodes_side[u] == "r" and level[u] == level[v] - 1]))
    path.reverse()

    def sentence(a: int, b: int) -> str:
        if render == "edges":
            return f"{symbols[a]} {symbols[b]}"
        return f"{symbols[a]} is a {symbols[b]}." if a < n_people else f"Every {symbols[a]} is a {symbols[b]}."

    statements = [sentence(a, b) for a, b in edges]
    rng.shuffle(statements)
    a, b = (target, neg_target) if rng.random() < 0.5 else (neg_target, target)
    if render == "edges":
        question = ", ".join(statements) + f". {symbols[a]} or {symbols[b]}? {symbols[root]}"
        steps, answer = [symbols[v] for v in path[1:]], symbols[target]
        if chain == "backward":
            # its own generator, seeded by the graph: the records' graphs are those of the forward chain
            walk_rng = random.Random(repr((edges, neg_target)))
            up = {target: path[::-1], neg_target: [neg_target, *_walk_up(walk_rng, parents, neg_target, n_people)]}
            depth = max(len(up[a]), len(up[b]))
            steps = [f"{symbols[up[a][min(i, len(up[a]) - 1)]]} {symbols[up[b][min(i, len(up[b]) - 1)]]}"
                     for i in range(depth)]
    else:
        question = " ".join(statements) + f" Is {symbols[root]} a {symbols[a]} or {symbols[b]}?"
        steps, answer = [sentence(a, b) for a, b in zip(path, path[1:])], f"{symbols[root]} is a {symbols[target]}."
    return {
        "question": question,
        "steps": steps,
        "answer": answer,
        "idx_to_symbol": symbols,
        "edges": edges,
        "root": root,
        "target": target,
        "neg_target": neg_target,
    }


def _walk_up(rng: random.Random, parents: list[list[int]], node: int, n_people: int) -> list[int]:
    """Ancestors of ``node`` along randomly drawn parents, up to the first person (parents come first)."""
    walk = []
    while node >= n_people:
        node = rng.choice(parents[node])
        walk.append(node)
    return walk


def _size(size: str) -> GraphSize:
    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


def _check_render(render: str, chain: str = "forward") -> None:
    if render not in RENDERS:
        raise ValueError(f"render: expected one of {list(RENDERS)}, got {render!r}")
    if chain not in CHAINS:
        raise ValueError(f"chain: expected one of {list(CHAINS)}, got {chain!r}")
    if chain == "backward" and render != "edges":
        raise ValueError(f"chain: 'backward' is written in the edges render only, got render {render!r}")


def generate_dataset(n: int, seed: int = 0, size: str = "prosqa", render: str = "text",
                     chain: str = "forward") -> list[dict]:
    """``n`` records, the same for the same seed, size, render and chain.

    ``size``: ``"prosqa"`` (the published split's shape) or ``"small"`` (smaller graphs, see the module
    docstring). ``render``: ``"text"`` (the published split's sentences: ``Every X is a Y.``, steps are such
    sentences, the answer ``Tom is a Y.``) or ``"edges"`` (the same graphs, compactly: the question lists the
    edges as ``X Y`` pairs, then ``A or B? Tom``; each step is the next node's name and the answer the
    target's name, as in the from-scratch ProsQA experiments of Zhu et al. 2025, "Reasoning by
    Superposition"); the graph fields are the same for both.

    ``chain``: ``"forward"`` (the published steps: the path from the person to the right candidate) or
    ``"backward"`` (edges render only; not the published format): both candidates walked back towards the
    people at once. Step i is ``x y``, the i-th ancestor of each candidate in the question's order (step 0
    names the candidates themselves, so that every node of a later step is the parent of the one written three
    tokens back; a walk that has reached a person repeats it). The right candidate's walk is the path reversed
    and ends at the asked person; the wrong one's follows randomly drawn parents and ends at another person,
    since nothing reaches the wrong candidate from the asked person. Each step is a lookup of one parent per
    candidate, where a forward step must choose among several children the one that leads to a candidate.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    _size(size)
    _check_render(render, chain)
    rng = random.Random(seed)
    return [generate_problem(rng, size=size, render=render, chain=chain) for _ in range(n)]
