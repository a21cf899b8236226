"""The trainer's learning curves and progress display: per-epoch (and per-stage) validation accuracy and loss
with the epoch's training loss in eval_log.csv, tokens per second in train_log.csv, learning_curves.png drawn
from them (skipped with one message when matplotlib is absent), and progress lines or a tqdm bar showing
stage, epoch, step, loss and throughput."""
from __future__ import annotations

import io
import sys

import pytest
import torch

from coconut_kernels.train import run
from coconut_kernels.training import TrainConfig, read_csv
from coconut_kernels.training.curves import CURVES_FILE, plot_learning_curves
from coconut_kernels.training.loop import Progress

from .test_train import one_thread  # noqa: F401  (the trainer tests' autouse fixture: one thread)
from .test_train import tiny as _train_tiny


def tiny(tmp_path, **kw) -> TrainConfig:
    """The trainer tests' tiny config, with progress lines every 2 steps."""
    return _train_tiny(tmp_path, **{"max_new_tokens": 8, "progress": True, "log_every": 2, **kw})


def test_curves_per_epoch_and_stage(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = run(tiny(tmp_path))
    save = tmp_path / "run"
    evals = read_csv(save / "eval_log.csv")
    assert [(int(r["epoch"]), int(r["stage"])) for r in evals] == [(0, 0), (1, 1), (2, 2)]
    train = read_csv(save / "train_log.csv")
    for r in evals:  # the epoch's mean training loss, from the per-step rows of that epoch
        losses = [float(t["loss"]) for t in train if t["epoch"] == r["epoch"]]
        assert float(r["train_loss"]) == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert float(r["val_loss"]) > 0 and 0.0 <= float(r["accuracy"]) <= 1.0
    assert all(float(t["tokens_per_s"]) > 0 for t in train)
    assert len(out["evals"]) == 3 and out["evals"][-1]["train_loss"] == float(evals[-1]["train_loss"])
    png = (save / CURVES_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(save.glob(".*.png"))  # the temporary file was renamed
    err = capsys.readouterr().err
    # captured stderr is not a terminal: plain lines every log_every (2) steps and at each epoch's end (3 steps)
    lines = [ln for ln in err.splitlines() if ln.startswith("[train]")]
    assert len(lines) == 6, err
    assert lines[0].startswith("[train] stage 0 epoch 0 step 2 (2/3 of the epoch) loss ")
    assert lines[1].startswith("[train] stage 0 epoch 0 step 3 (3/3 of the epoch) loss ")
    assert lines[-1].startswith("[train] stage 2 epoch 2 step 9 (3/3 of the epoch)") and lines[-1].endswith("tokens/s")
    assert "\r" not in err and "(training loss " in err


def test_no_progress_when_off(tmp_path, capsys):
    run(tiny(tmp_path, progress=False, num_epochs=1, max_latent_stage=1))
    assert "[train]" not in capsys.readouterr().err


def test_without_matplotlib_the_csvs_stay_and_one_line_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    run(tiny(tmp_path, progress=False))
    save = tmp_path / "run"
    assert len(read_csv(save / "eval_log.csv")) == 3
    assert not (save / CURVES_FILE).exists()
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed: learning_curves.png skipped") == 1, err


def test_plot_of_an_empty_folder_is_none(tmp_path):
    pytest.importorskip("matplotlib")
    assert plot_learning_curves(tmp_path) is None


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_tqdm_bar():
    stream = _Terminal()
    bar = Progress(True, epoch=4, stage=2, total=3, initial=0, log_every=1, stream=stream)
    for step in (13, 14, 15):
        bar.update(step, loss=1.25, lr=1e-3, tokens=1000)
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and "stage 2 epoch 4" in text and "3/3" in text
    assert "step=15" in text and "loss=1.2500" in text and "tok_s=" in text
    assert "[train]" not in text
