"""The numbers of the thought analysis, from the fed vectors and their states alone (no model needed, so a test
can build them by hand).

A continuous thought is the vector fed at a latent step (`GenerateOutput.latents`: for the "hidden"
feedback, the last hidden state after the final norm). Its read-out is the LM head's distribution over the
vocabulary, ``softmax(W h + b)``, for h the normed hidden state the thought was made from
(`GenerateOutput.latent_states`; for "hidden" feedback the thought itself): the next-token distribution the
model produced where it thought. A "soft" or "mixture" thought is a mix of token embeddings, which the LM head
does not read; its state's read-out is the distribution that weighted the mix. A node's probability is the
read-out's probability of the node's token; a node whose name is several tokens gets its first token's (the
word tokenizer gives every ProsQA node one token; the ``n_tokens`` column says when this applies). Thought
``i`` (0-based) of ``c_thought`` thoughts per step stands for reasoning step ``i // c_thought + 1``, whose
frontier is the nodes at that depth from the root, and replaces the record's language step ``i // c_thought``,
whose nodes (`step_nodes`) a thought that carries the chain names: for the published chain the step's two
concepts, for ``generate_chain: backward`` the two walks' nodes at that depth.
"""
from __future__ import annotations

import math
import re

import torch

from .graph import GraphInfo

__all__ = ["node_token_ids", "thought_rows", "aggregate_steps", "pearson", "step_node_sets"]


def node_token_ids(info: GraphInfo, tokenizer, where: str) -> list[list[int]]:
    """Each node's token ids as the name appears in the text (after a space)."""
    from ..errors import CoconutError

    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for v, name in enumerate(info.symbols):
        ids = tokenizer.encode(" " + name)
        if not ids or (unk is not None and unk in ids):
            raise CoconutError(f"{where}: field 'idx_to_symbol': node {v} {name!r} is not in the checkpoint's "
                               f"vocabulary")
        out.append(ids)
    return out


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when fewer than two points or either side is constant."""
    if len(x) < 2:
        return math.nan
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    xc, yc = xt - xt.mean(), yt - yt.mean()
    den = float(xc.norm() * yc.norm())
    return float((xc * yc).sum()) / den if den > 0 else math.nan


def thought_rows(latents: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None,
                 embeddings: torch.Tensor, info: GraphInfo, node_ids: list[list[int]], c_thought: int,
                 vocab: list[str] | None = None, record: int = 0, states: torch.Tensor | None = None,
                 step_nodes: list[set[int]] | None = None) -> tuple[list[dict], list[dict]]:
    """One question's tables. ``latents`` (K, d): its fed vectors, in order (their norm and nearest embedding);
    ``states`` (K, d): the normed hidden states they were made from, read out through the LM head (default:
    the latents, which they are for "hidden" feedback); ``step_nodes``: the nodes each language step of the
    record names (`step_node_sets`), for the mass on the replaced step's nodes. Returns (node rows: one per
    latent step and graph node, thought rows: one per latent step)."""
    h = latents.double()
    if states is not None and states.shape != latents.shape:
        raise ValueError(f"states: expected the latents' shape {tuple(latents.shape)}, got {tuple(states.shape)}")
    logits = (h if states is None else states.double()) @ head_weight.double().T
    if head_bias is not None:
        logits = logits + head_bias.double()
    probs = logits.softmax(-1)  # (K, V)
    emb = embeddings.double()
    cos = torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T  # (K, V)
    first = torch.tensor([ids[0] for ids in node_ids])
    nodes, thoughts = [], []
    for i in range(h.shape[0]):
        step = i + 1
        depth = i // c_thought + 1
        frontier = set(info.frontier(depth))
        p_nodes = probs[i, first]
        in_step = sorted(step_nodes[i // c_thought]) if step_nodes and i // c_thought < len(step_nodes) else []
        for v in range(info.n_nodes):
            nodes.append({
                "record": record, "step": step, "depth_of_step": depth, "node": v, "symbol": info.symbols[v],
                "n_tokens": len(node_ids[v]), "node_depth": info.depth.get(v, ""), "frontier": int(v in frontier),
                "height": info.height[v], "reaches_target": int(info.to_target[v] is not None),
                "to_target": "" if info.to_target[v] is None else info.to_target[v],
                "is_root": int(v == info.root), "is_target": int(v == info.target),
                "is_neg_target": int(v == info.neg_target), "in_step": int(v in in_step), "prob": float(p_nodes[v]),
            })
        best = int(cos[i].argmax())
        top = int(probs[i].argmax())
        thoughts.append({
            "record": record, "step": step, "depth_of_step": depth, "norm": float(h[i].norm()),
            "nearest_token_id": best, "nearest_token": vocab[best] if vocab else "", "nearest_cosine": float(cos[i, best]),
            "top1_token_id": top, "top1_token": vocab[top] if vocab else "", "top1_prob": float(probs[i, top]),
            "frontier_mass": float(p_nodes[sorted(frontier)].sum()) if frontier else 0.0,
            "nonfrontier_mass": float(p_nodes.sum() - (p_nodes[sorted(frontier)].sum() if frontier else 0.0)),
            "n_frontier": len(frontier),
            "step_mass": float(p_nodes[in_step].sum()) if in_step else math.nan, "n_step_nodes": len(in_step),
        })
    return nodes, thoughts


def aggregate_steps(nodes: list[dict], thoughts: list[dict]) -> list[dict]:
    """Per latent step over all questions: the mean probability mass on the frontier and on the other graph
    nodes, the mean probability of one frontier / other node, the Pearson correlation over frontier nodes
    of probability with height and with reaching the target, the mean mass on the replaced language step's
    nodes (over the questions that have that step), and the mean thought norm and cosine."""
    out = []
    for step in sorted({t["step"] for t in thoughts}):
        ts = [t for t in thoughts if t["step"] == step]
        ns = [r for r in nodes if r["step"] == step]
        fr = [r for r in ns if r["frontier"]]
        other = [r for r in ns if not r["frontier"]]
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        out.append({
            "step": step, "depth_of_step": ts[0]["depth_of_step"], "n_questions": len(ts),
            "frontier_mass": mean([t["frontier_mass"] for t in ts]),
            "nonfrontier_mass": mean([t["nonfrontier_mass"] for t in ts]),
            "frontier_node_prob": mean([r["prob"] for r in fr]),
            "nonfrontier_node_prob": mean([r["prob"] for r in other]),
            "n_frontier_nodes": len(fr),
            "corr_prob_height": pearson([r["prob"] for r in fr], [r["height"] for r in fr]),
            "corr_prob_reaches_target": pearson([r["prob"] for r in fr], [r["reaches_target"] for r in fr]),
            "step_mass": mean([t["step_mass"] for t in ts if not math.isnan(t["step_mass"])]),
            "norm": mean([t["norm"] for t in ts]),
            "nearest_cosine": mean([t["nearest_cosine"] for t in ts]),
        })
    return out


def step_node_sets(record: dict, info: GraphInfo) -> list[set[int]]:
    """The graph nodes each of the record's language steps names (words of the step that are node symbols)."""
    return [{info.index[w] for w in re.findall(r"\w+", step) if w in info.index} for step in record["steps"]]
