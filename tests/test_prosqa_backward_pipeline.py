"""examples/prosqa_cpu/backward/: its configs hold the recipe README "Walking back from the options" measured, and
pipeline.py runs each method's phases in order (a few steps each), sharing and skipping finished ones."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from coconut_kernels.training import load_config
from coconut_kernels.training.checkpoint import latest_checkpoint

HERE = Path(__file__).parents[1] / "examples" / "prosqa_cpu" / "backward"
spec = importlib.util.spec_from_file_location("prosqa_backward_pipeline", HERE / "pipeline.py")
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)


def _config(method):
    return load_config(str(HERE / f"{method}.yaml"), {})


def test_configs_hold_the_measured_recipe():
    for method in pipeline.METHODS:
        cfg = _config(method)
        assert cfg.method == method
        assert (cfg.generate_size, cfg.generate_render, cfg.generate_chain) == ("small", "edges", "backward")
        assert cfg.val_path is None and cfg.generate_val == 300 and cfg.max_val_records == 150
        assert cfg.max_new_tokens == 24 and cfg.max_grad_norm == 1.0 and cfg.batch_size == 32
    cot, no_cot = _config("cot"), _config("no_cot")
    for cfg in (cot, no_cot):
        assert (cfg.generate_train, cfg.num_epochs, cfg.lr) == (30000, 5, 1e-3)
    for method, lr in (("coconut", 1e-4), ("pause_as_thought", 3e-4)):
        cfg = _config(method)
        assert (cfg.generate_train, cfg.start_epoch, cfg.num_epochs, cfg.max_latent_stage) == (20000, 1, 6, 5)
        assert (cfg.c_thought, cfg.marker_init, cfg.lr) == (3, "\n", lr)
    assert _config("coconut").feedback == "soft"


def _epochs(folder: Path) -> list[int]:
    return [int(r["epoch"]) for r in csv.DictReader((folder / "eval_log.csv").open())]


def _saved_config(folder: Path) -> dict:
    return yaml.safe_load((latest_checkpoint(folder) / "config.yaml").read_text())


def _lrs(folder: Path) -> dict[int, set]:
    out: dict[int, set] = {}
    for r in csv.DictReader((folder / "train_log.csv").open()):
        out.setdefault(int(r["epoch"]), set()).add(float(r["lr"]))
    return out


def test_pipeline_runs_each_phase_once(tmp_path, capsys):
    runs = tmp_path / "runs"
    record = pipeline.main(["coconut", "--runs", str(runs), "--smoke", "--threads", "1", "--seed", "3"])
    assert [p["phase"] for p in record["phases"]] == ["lookup", "cot", "coconut"]
    assert not any(p["skipped"] for p in record["phases"])
    assert json.loads((runs / "pipeline_coconut_s3.json").read_text()) == record
    cot, coconut = runs / "cot_s3", runs / "coconut_s3"
    # CoT: epochs 0-4 at 1e-3 (after the warm-up step), then resumed for 5-6 at 3e-4
    assert _epochs(cot) == list(range(7))
    lrs = _lrs(cot)
    assert lrs[4] == {1e-3} and lrs[5] == lrs[6] == {3e-4}
    assert _epochs(coconut) == [1, 2, 3, 4, 5]
    saved = _saved_config(coconut)
    assert Path(saved["init_from"]) == cot and saved["seed"] == 3
    assert (saved["feedback"], saved["c_thought"], saved["marker_init"]) == ("soft", 3, "\n")
    # A second method of the same seed reuses the lookup and CoT phases; a rerun skips everything.
    pause = pipeline.main(["pause_as_thought", "--runs", str(runs), "--smoke", "--threads", "1", "--seed", "3"])
    assert [p["skipped"] for p in pause["phases"]] == [True, True, False]
    again = pipeline.main(["coconut", "--runs", str(runs), "--smoke", "--threads", "1", "--seed", "3"])
    assert all(p["skipped"] for p in again["phases"]) and again["accuracy"] == record["accuracy"]
    # no_cot starts from the lookup checkpoint, not a CoT run
    no_cot = pipeline.main(["no_cot", "--runs", str(runs), "--smoke", "--threads", "1", "--seed", "3"])
    assert [p["phase"] for p in no_cot["phases"]] == ["lookup", "no_cot"] and no_cot["phases"][0]["skipped"]
    saved = _saved_config(runs / "no_cot_s3")
    assert Path(saved["init_from"]) == runs / "lookup" and _epochs(runs / "no_cot_s3") == list(range(5))
    assert "already there" in capsys.readouterr().out


def test_a_run_stopped_early_is_resumed(tmp_path):
    """A no_cot run stopped by max_steps (in its second epoch) is resumed, not refused, by the next call."""
    runs = tmp_path / "runs"
    pipeline.main(["no_cot", "--runs", str(runs), "--smoke", "--threads", "1", "--", "--max_steps", "3"])
    assert (runs / "no_cot_s0" / "latest").exists() and not pipeline._ran(runs / "no_cot_s0", 4)
    record = pipeline.main(["no_cot", "--runs", str(runs), "--smoke", "--threads", "1"])
    assert _epochs(runs / "no_cot_s0")[-1] == 4 and record["phases"][0]["skipped"]
    assert [int(r["step"]) for r in csv.DictReader((runs / "no_cot_s0" / "train_log.csv").open())] == list(
        range(1, 11))


def test_pipeline_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        pipeline.main(["coconut_v2", "--runs", str(tmp_path)])
    with pytest.raises(SystemExit):
        pipeline.main(["cot", "--runs", str(tmp_path), "--threads", "0"])
    assert not any(tmp_path.iterdir())
