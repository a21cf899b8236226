"""PNG figures of the thought analysis (matplotlib, imported on use: the `test`/`bench` extras carry it)."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import CoconutError
from .graph import GraphInfo

__all__ = ["plot_question", "plot_aggregate"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CoconutError("coconut-analyze draws its figures with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_question(info: GraphInfo, rows: list[dict], path: Path, title: str = "") -> Path:
    """Heat map of one question: graph nodes (rows, grouped by depth from the root; unreachable nodes last)
    by latent step (columns), colour = the thought's probability of the node; the frontier of each step is
    boxed, the answer marked ✓ and the wrong option ✗."""
    plt = _pyplot()
    steps = sorted({r["step"] for r in rows})
    order = sorted(range(info.n_nodes), key=lambda v: (info.depth.get(v, math.inf), info.symbols[v]))
    pos = {v: k for k, v in enumerate(order)}
    grid = [[0.0] * len(steps) for _ in order]
    for r in rows:
        grid[pos[r["node"]]][steps.index(r["step"])] = r["prob"]
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(steps), 1.2 + 0.28 * len(order)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, max(max(g) for g in grid)))
    for r in rows:
        if r["frontier"]:
            ax.add_patch(plt.Rectangle((steps.index(r["step"]) - 0.5, pos[r["node"]] - 0.5), 1, 1, fill=False,
                                       edgecolor="red", linewidth=1.5))

    def label(v):
        d = info.depth.get(v)
        mark = " ✓" if v == info.target else " ✗" if v == info.neg_target else ""
        return f"{'-' if d is None else d}: {info.symbols[v]}{mark}"

    ax.set_yticks(range(len(order)), [label(v) for v in order], fontsize=7)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_xlabel("latent step (red box: frontier = nodes at that depth)")
    ax.set_ylabel("node (depth from root: name)")
    ax.set_title(title or "probability of each node per continuous thought", fontsize=9)
    fig.colorbar(im, ax=ax, label="probability (LM-head read-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_aggregate(steps: list[dict], nodes: list[dict], path: Path) -> Path:
    """Three panels over latent steps: mean probability mass on frontier vs other graph nodes (and on the replaced
    language step's nodes); the correlation over frontier nodes of probability with height and with reaching the
    target; the thought's norm and its cosine to the nearest token embedding."""
    plt = _pyplot()
    x = [s["step"] for s in steps]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    _two_series(axes[0], x, steps, ("frontier_mass", "frontier nodes"), ("nonfrontier_mass", "other graph nodes"),
                "mean probability mass", "where a thought puts its probability")
    if not all(math.isnan(s.get("step_mass", math.nan)) for s in steps):
        axes[0].plot(x, [s["step_mass"] for s in steps], "^:", color="C4", label="replaced step's nodes")
        axes[0].legend(fontsize=8)
    _two_series(axes[1], x, steps, ("corr_prob_height", "corr(p, height)"),
                ("corr_prob_reaches_target", "corr(p, reaches target)"),
                "Pearson r over frontier nodes", "probability vs the node's value")
    axes[1].axhline(0.0, color="grey", linewidth=0.8)
    ax = axes[2]
    ax.plot(x, [s["norm"] for s in steps], "o-", color="C2")
    ax.set_xlabel("latent step")
    ax.set_ylabel("thought norm", color="C2")
    twin = ax.twinx()
    twin.plot(x, [s["nearest_cosine"] for s in steps], "s--", color="C3")
    twin.set_ylabel("cosine to nearest token embedding", color="C3")
    ax.set_title("the thought vector")
    for a in axes:
        a.set_xticks(x)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _two_series(ax, x, steps, first, second, ylabel: str, title: str) -> None:
    """One panel of the aggregate figure: two per-step columns (key, label) against the latent step."""
    for (key, label), style in ((first, "o-"), (second, "s--")):
        ax.plot(x, [s[key] for s in steps], style, label=label)
    ax.set_xlabel("latent step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
