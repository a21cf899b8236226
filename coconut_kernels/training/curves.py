"""The run's learning curves as a picture: `learning_curves.png` in the save folder, drawn from the metric log's
own CSVs (`train_log.csv` per optimizer step, `eval_log.csv` per evaluated epoch), so the figure and the
numbers never disagree. Redrawn after every evaluation and when the run ends; matplotlib is optional (the
`test`/`bench` extras carry it): without it the CSVs are the curves and the trainer says once that the plot
was skipped.
"""
from __future__ import annotations

import math
from pathlib import Path

from .metrics import read_csv

__all__ = ["CURVES_FILE", "plot_learning_curves"]

CURVES_FILE = "learning_curves.png"


def _pyplot():
    """matplotlib's pyplot on the Agg backend (ImportError when matplotlib is not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _float(v) -> float:
    return float(v) if v not in (None, "") else math.nan


def plot_learning_curves(save_dir: str | Path, title: str = "") -> Path | None:
    """Draw `save_dir/learning_curves.png` from its train and eval logs: the training loss per optimizer step
    with the validation loss of each evaluated epoch (left), answer and CoT exact match per evaluated epoch
    (right); the curriculum stages are shaded bands over the steps they trained. Returns the path, or None
    when the logs hold no row yet; ImportError when matplotlib is not installed."""
    save_dir = Path(save_dir)
    train = read_csv(save_dir / "train_log.csv") if (save_dir / "train_log.csv").is_file() else []
    evals = read_csv(save_dir / "eval_log.csv") if (save_dir / "eval_log.csv").is_file() else []
    if not train and not evals:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    steps = [int(r["step"]) for r in train]
    ax_loss.plot(steps, [_float(r["loss"]) for r in train], color="C0", linewidth=0.8, alpha=0.7,
                 label="training loss (per step)")
    ev_steps = [int(r["step"]) for r in evals]
    ax_loss.plot(ev_steps, [_float(r["val_loss"]) for r in evals], "o-", color="C1",
                 label="validation loss (per evaluated epoch)")
    ax_loss.set_ylabel("loss (mean over labelled tokens)")
    ax_loss.set_title("loss")
    ax_acc.plot(ev_steps, [100 * _float(r["accuracy"]) for r in evals], "o-", color="C2", label="answer exact match")
    cot = [100 * _float(r["cot_accuracy"]) for r in evals]
    if any(c > 0 for c in cot):  # CoT match is 0 by construction for methods that write no reasoning
        ax_acc.plot(ev_steps, cot, "s--", color="C3", label="CoT exact match")
    ax_acc.set_ylim(-2, 102)
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_title("validation accuracy")
    for r, s in zip(evals, ev_steps):
        ax_acc.annotate(f"e{r['epoch']}", (s, 100 * _float(r["accuracy"])), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize=7)
    for ax in (ax_loss, ax_acc):
        _shade_stages(ax, train)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = save_dir / CURVES_FILE
    tmp = save_dir / f".{CURVES_FILE}.tmp.png"
    fig.savefig(tmp, dpi=100)  # written whole, then renamed: a reader never sees half a figure
    plt.close(fig)
    tmp.replace(path)
    return path


def _shade_stages(ax, train: list[dict]) -> None:
    """Alternate grey bands over the step ranges of each curriculum stage, labelled at the top."""
    spans: list[list[int]] = []  # [stage, first step, last step]
    for r in train:
        stage, step = int(r["stage"]), int(r["step"])
        if spans and spans[-1][0] == stage:
            spans[-1][2] = step
        else:
            spans.append([stage, step, step])
    if len(spans) < 2:
        return
    total = spans[-1][2] - spans[0][1] + 1
    for k, (stage, first, last) in enumerate(spans):
        if k % 2:
            ax.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.12, linewidth=0)
        wide = (last - first + 1) >= 0.12 * total  # a narrow band gets the bare number, so labels never overlap
        ax.text((first + last) / 2, 0.98, f"stage {stage}" if wide else str(stage), transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="dimgrey")
