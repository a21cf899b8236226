"""The graph of a ProsQA-style record, checked, with each node's place in the search the paper analyses.

Hao et al. 2024 (§5) read a continuous thought as a breadth-first search over the question's graph: the
t-th thought should give probability to the *frontier* at depth t (the nodes exactly t edges from the
root), and among those more to the nodes of higher *value*. The values computed here: the node's
``height`` (its shortest distance to a leaf, the paper's measure), whether it reaches the target at all,
and its distance to the target.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from functools import cached_property

from ..data import reachable
from ..errors import CoconutError

__all__ = ["GraphInfo", "graph_info", "REQUIRED_FIELDS"]

REQUIRED_FIELDS = ("question", "idx_to_symbol", "edges", "root", "target", "neg_target")
# "Is Tom a lempus or scrompus?": the question's last sentence names the root and the two candidates.
_ASK = re.compile(r"Is (\S+) an? (\S+) or (\S+)\?\s*$")


@dataclass(frozen=True)
class GraphInfo:
    symbols: list[str]
    edges: list[tuple[int, int]]
    root: int
    target: int
    neg_target: int
    depth: dict[int, int]  # shortest distance from the root, reachable nodes only
    height: list[int]  # shortest distance to a leaf (a node without out-edges); 0 for leaves
    to_target: list[int | None]  # shortest distance to the target, None when the target is out of reach

    @property
    def n_nodes(self) -> int:
        return len(self.symbols)

    @cached_property
    def index(self) -> dict[str, int]:
        """Each node's index by its name."""
        return {name: v for v, name in enumerate(self.symbols)}

    def frontier(self, t: int) -> list[int]:
        """The nodes exactly ``t`` edges from the root."""
        return sorted(v for v, d in self.depth.items() if d == t)


def _fail(where: str, field: str, msg: str):
    raise CoconutError(f"{where}: field {field!r}: {msg}")


def _index(where: str, field: str, value, n: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(where, field, f"expected a node index (int), got {value!r}")
    if not 0 <= value < n:
        _fail(where, field, f"node {value} is unknown: idx_to_symbol has {n} nodes (0..{n - 1})")
    return value


def _distances_to(n: int, edges: list[tuple[int, int]], sources: list[int]) -> list[int | None]:
    """Shortest distance from every node to the nearest of ``sources`` along the edges' direction."""
    back: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        back[b].append(a)
    dist: list[int | None] = [None] * n
    queue = deque(sources)
    for s in sources:
        dist[s] = 0
    while queue:
        x = queue.popleft()
        for y in back[x]:
            if dist[y] is None:
                dist[y] = dist[x] + 1
                queue.append(y)
    return dist


def graph_info(record, where: str) -> GraphInfo:
    """Check ``record``'s graph and compute the search quantities. ``where`` names the file and record in
    the errors ("valid.json: record 3"). Raises CoconutError for a missing or ill-typed field, an edge or
    index naming an unknown node, a cycle, or a question that asks about other nodes than the record's."""
    if not isinstance(record, dict):
        raise CoconutError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            _fail(where, field, "missing (a ProsQA-style record needs " + ", ".join(REQUIRED_FIELDS) + ")")
    symbols = record["idx_to_symbol"]
    if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) and s for s in symbols):
        _fail(where, "idx_to_symbol", "expected a non-empty list of node names (strings)")
    if len(set(symbols)) != len(symbols):
        _fail(where, "idx_to_symbol", "node names must be unique")
    n = len(symbols)
    raw = record["edges"]
    if not isinstance(raw, list):
        _fail(where, "edges", f"expected a list of [src, dst] pairs, got {type(raw).__name__}")
    edges = []
    for j, e in enumerate(raw):
        if not isinstance(e, list) or len(e) != 2:
            _fail(where, "edges", f"edge {j}: expected a [src, dst] pair, got {e!r}")
        edges.append((_index(where, f"edges[{j}]", e[0], n), _index(where, f"edges[{j}]", e[1], n)))
    root = _index(where, "root", record["root"], n)
    target = _index(where, "target", record["target"], n)
    neg_target = _index(where, "neg_target", record["neg_target"], n)

    # Kahn's algorithm: what is left once every node without predecessors has been peeled lies on a cycle.
    indeg = [0] * n
    succ: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    queue = deque(v for v in range(n) if indeg[v] == 0)
    peeled = 0
    while queue:
        x = queue.popleft()
        peeled += 1
        for y in succ[x]:
            indeg[y] -= 1
            if indeg[y] == 0:
                queue.append(y)
    if peeled < n:
        on_cycle = [symbols[v] for v in range(n) if indeg[v] > 0]
        _fail(where, "edges", f"the graph has a cycle (through {', '.join(on_cycle[:6])}); ProsQA graphs are DAGs")

    if not isinstance(record["question"], str):
        _fail(where, "question", "expected a string")
    m = _ASK.search(record["question"])
    if m is not None:
        known = set(symbols)
        for name in m.groups():
            if name not in known:
                _fail(where, "question", f"asks about {name!r}, which is not a node of idx_to_symbol")
        if m.group(1) != symbols[root] or {m.group(2), m.group(3)} != {symbols[target], symbols[neg_target]}:
            _fail(where, "question", f"asks 'Is {m.group(1)} a {m.group(2)} or {m.group(3)}?' but root/target/"
                                     f"neg_target are {symbols[root]}/{symbols[target]}/{symbols[neg_target]}")

    leaves = [v for v in range(n) if not succ[v]]
    return GraphInfo(symbols=list(symbols), edges=edges, root=root, target=target, neg_target=neg_target,
                     depth=reachable(n, edges, root), height=_distances_to(n, edges, leaves),
                     to_target=_distances_to(n, edges, [target]))
