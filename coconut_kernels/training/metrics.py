"""The trainer's metric log: CSV files (``train_log.csv`` per optimizer step, ``eval_log.csv`` per
evaluation: the learning curves per epoch and stage), the same rows as JSON lines in ``metrics.jsonl``, the
curves drawn as ``learning_curves.png`` (`training.curves`, when matplotlib is installed), and TensorBoard
scalars when the ``tensorboard`` package is installed. Only rank 0 writes. On resume, rows past the resumed
step are dropped, so the log of a resumed run reads as one uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

__all__ = ["MetricsLog", "TRAIN_FIELDS", "EVAL_FIELDS", "read_csv", "format_eval_table"]

# skipped: 1 when a non-finite loss or gradient norm skipped the update (skip_nonfinite); tokens_per_s: the
# step's tokens (every process) over its wall time, forward, backward and update
TRAIN_FIELDS = ("step", "epoch", "stage", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "skipped", "elapsed_s")
# train_loss: the mean training loss of the epoch's optimizer steps (empty for only_eval)
EVAL_FIELDS = ("step", "epoch", "stage", "accuracy", "cot_accuracy", "val_loss", "train_loss", "mean_latents",
               "mean_new_tokens", "correct", "n", "elapsed_s")


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class MetricsLog:
    def __init__(self, save_dir: str | Path, enabled: bool, tensorboard: bool, resume_step: int | None = None,
                 title: str = ""):
        self.enabled = enabled
        self.dir = Path(save_dir)
        self.tb = None
        self.title = title  # of the learning-curve figure
        self._plot_skipped = False
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, fields in (("train_log.csv", TRAIN_FIELDS), ("eval_log.csv", EVAL_FIELDS)):
            path = self.dir / name
            keep = []
            if resume_step is not None and path.is_file():
                keep = [r for r in read_csv(path) if int(r["step"]) <= resume_step]
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(keep)
        jsonl = self.dir / "metrics.jsonl"
        if resume_step is not None and jsonl.is_file():
            lines = [ln for ln in jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            jsonl.write_text("".join(ln + "\n" for ln in lines))
        elif resume_step is None:
            jsonl.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step)

    def _write(self, kind: str, fields, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.dir / f"{kind}_log.csv", "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=fields).writerow({k: row.get(k) for k in fields})
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, **row}) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, row["step"])

    def train(self, row: dict) -> None:
        self._write("train", TRAIN_FIELDS, row)

    def eval(self, row: dict) -> None:
        self._write("eval", EVAL_FIELDS, row)
        self.plot()

    def plot(self) -> None:
        """Redraw learning_curves.png from the CSVs; without matplotlib, say once that it is skipped."""
        if not self.enabled or self._plot_skipped:
            return
        from .curves import CURVES_FILE, plot_learning_curves

        try:
            plot_learning_curves(self.dir, self.title)
        except ImportError:
            self._plot_skipped = True
            print(f"coconut-train: matplotlib is not installed: {CURVES_FILE} skipped (the curves are in "
                  f"train_log.csv and eval_log.csv; pip install matplotlib to draw them)", file=sys.stderr)

    def close(self) -> None:
        self.plot()
        if self.tb is not None:
            self.tb.close()


def format_eval_table(rows: list[dict], title: str = "") -> str:
    """A fixed-width table of evaluation rows (epoch, stage, accuracy, mean generated tokens, n)."""
    head = f"{'epoch':>5} {'stage':>5} {'step':>7} {'accuracy':>9} {'new tokens':>10} {'n':>6}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['epoch']:>5} {r['stage']:>5} {r['step']:>7} {100 * float(r['accuracy']):>8.1f}% "
                     f"{float(r['mean_new_tokens']):>10.1f} {r['n']:>6}")
    return "\n".join(lines)
