"""A save folder belongs to one run, on real folders: a fresh run never takes over another run's folder
(`overwrite` moves it aside, never deletes), pruning touches only the current run's checkpoints and never the
one `latest` names, `latest` names a complete folder even when a re-save dies half-way, a run that fails its
checks or has nothing left to do changes no byte, a failed resumed run leaves earlier files as they were, a
resume with a changed run config is refused by key, and a run killed with SIGKILL at a random step resumes to
bitwise the weights of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coconut_kernels.errors import CheckpointError, CoconutError, ConfigError
from coconut_kernels.latent import LatentLM
from coconut_kernels.train import run
from coconut_kernels.training import latest_checkpoint, read_csv

from .test_train import ROOT, TINY_MODEL, one_thread, tiny  # noqa: F401 (one_thread: autouse fixture)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def quick(tmp_path, **kw):
    """One epoch of 3 optimizer steps, no evaluation before the last epoch's."""
    return tiny(tmp_path, **{"num_epochs": 1, "eval_every": 0, "max_new_tokens": 4, **kw})


def run_id(folder: Path) -> str:
    return json.loads((folder / "run.json").read_text())["run_id"]


# ---------------------------------------------------------------------------------------------------------
# A fresh run and another run's folder


def test_fresh_run_refuses_a_folder_holding_another_run(tmp_path):
    run(quick(tmp_path))
    save = tmp_path / "run"
    before = snapshot(save)
    with pytest.raises(CheckpointError, match=r"holds run \w+ .*resume: true to continue it, or overwrite: true "
                                              r"to move it aside to .*run\.old-\w+ \(nothing is deleted\)"):
        run(quick(tmp_path, seed=1))
    # an evaluation's results would mix into the run's logs as well; resuming is no choice there
    with pytest.raises(CheckpointError, match=r"holds run \w+ .*; set overwrite: true") as e:
        run(quick(tmp_path, init_from=str(latest_checkpoint(save)), only_eval=True))
    assert "resume" not in str(e.value)
    assert snapshot(save) == before


def test_logs_alone_mark_a_folder_as_taken(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / "train_log.csv").write_text("step,loss\n1,2.0\n")
    with pytest.raises(CheckpointError, match="train_log.csv"):
        run(quick(tmp_path))
    assert snapshot(save) == {"train_log.csv": hashlib.sha256(b"step,loss\n1,2.0\n").hexdigest()}


def test_overwrite_moves_the_old_run_aside(tmp_path):
    first = run(quick(tmp_path))
    save = tmp_path / "run"
    old_id, before = run_id(save), snapshot(save)
    second = run(quick(tmp_path, seed=1, overwrite=True))
    aside = tmp_path / f"run.old-{old_id}"
    assert snapshot(aside) == before  # every file of the old run, byte for byte
    assert run_id(save) != old_id and second["checkpoint"].parent == save
    assert first["checkpoint"] == second["checkpoint"]  # the same name, now the new run's checkpoint
    assert run_id(second["checkpoint"]) == run_id(save) != run_id(aside / first["checkpoint"].name)
    # a third run moves the second aside next to the first, under a name of its own
    third_aside = tmp_path / f"run.old-{run_id(save)}"
    run(quick(tmp_path, seed=2, overwrite=True))
    assert third_aside.is_dir() and aside.is_dir()


def test_resume_from_another_runs_checkpoint_into_a_taken_folder(tmp_path):
    other = run(quick(tmp_path / "a"))["checkpoint"]
    run(quick(tmp_path / "b"))
    before = snapshot(tmp_path / "b" / "run")
    with pytest.raises(CheckpointError, match="holds run .*resume: true to continue that run instead of"):
        run(quick(tmp_path / "b", num_epochs=2, resume=str(other), resume_override=["num_epochs"]))
    assert snapshot(tmp_path / "b" / "run") == before


def test_resume_a_checkpoint_into_a_new_folder_continues_its_run(tmp_path):
    ckpt = run(quick(tmp_path / "a", max_steps=2))["checkpoint"]
    source = snapshot(tmp_path / "a")
    out = run(quick(tmp_path / "b", resume=str(ckpt)))
    assert [s for s, _ in out["losses"]] == [3]
    assert run_id(tmp_path / "b" / "run") == run_id(tmp_path / "a" / "run") == run_id(out["checkpoint"])
    assert snapshot(tmp_path / "a") == source  # the source run is only read


# ---------------------------------------------------------------------------------------------------------
# Pruning and latest


def test_pruning_keeps_other_runs_checkpoints_and_latest(tmp_path):
    run(quick(tmp_path, keep_checkpoints=1))
    save = tmp_path / "run"
    # a checkpoint of another run with a higher step lands in the folder (copied by hand)
    foreign = run(quick(tmp_path / "other", num_epochs=2, save_every_steps=1))["checkpoint"]
    stranger = save / "step-000050"
    os.replace(foreign, stranger)
    out = run(quick(tmp_path, num_epochs=2, keep_checkpoints=1, resume=True, resume_override=["num_epochs"]))
    names = sorted(p.name for p in save.glob("step-*"))
    assert names == ["step-000006", "step-000050"]  # this run's step 3 pruned, the stranger untouched
    assert (save / "latest").read_text().strip() == "step-000006" == out["checkpoint"].name
    assert latest_checkpoint(save) == out["checkpoint"]


def test_latest_names_a_complete_folder_while_a_step_is_resaved(tmp_path, monkeypatch):
    save = tmp_path / "run"
    run(quick(tmp_path, num_epochs=2, save_every_steps=1, keep_checkpoints=9))
    step3 = save / "step-000003"
    # resume from step 3 of the same run: steps 4-6 are saved again; die between the two renames of step 4
    import coconut_kernels.training.checkpoint as ckpt

    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(src).name.startswith(".tmp-step-000004") and Path(dst).name == "step-000004":
            raise KeyboardInterrupt("killed mid-swap")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run(quick(tmp_path, num_epochs=2, save_every_steps=1, keep_checkpoints=9, resume=str(step3)))
    latest = latest_checkpoint(save)
    assert latest.name == (save / "latest").read_text().strip()
    for name in ("model.safetensors", "model_config.json", "tokenizer.json", "trainer_state.pt", "config.yaml"):
        assert (latest / name).is_file(), (latest, name)
    monkeypatch.undo()
    # the same resume, undisturbed, re-saves step 4 in place and leaves no temporary folder behind
    out = run(quick(tmp_path, num_epochs=2, save_every_steps=1, keep_checkpoints=9, resume=str(step3)))
    assert out["checkpoint"] == save / "step-000006" and latest_checkpoint(save) == out["checkpoint"]
    assert not [p.name for p in save.iterdir() if p.name.startswith((".bridge", ".old", ".tmp"))]


# ---------------------------------------------------------------------------------------------------------
# Checks before any write; failed and shorter resumed runs


@pytest.mark.parametrize("change,key", [
    ({"lr": 1e-2}, "'lr'"),
    ({"model": {**TINY_MODEL, "d_model": 64}}, "'model'"),
    ({"method": "cot"}, "'method'"),
    ({"feedback": "projected"}, "'feedback'"),
    ({"collate": "aligned"}, "'collate'"),
])
def test_resume_with_a_changed_run_config_is_refused_by_key(tmp_path, change, key):
    run(quick(tmp_path, max_steps=2))
    save = tmp_path / "run"
    before = snapshot(save)
    with pytest.raises(ConfigError, match=f"config key {key}: resuming .* with a different run config"):
        run(quick(tmp_path, resume=True, **change))
    assert snapshot(save) == before


def test_resume_override_allows_the_listed_keys(tmp_path):
    run(quick(tmp_path, max_steps=2))
    with pytest.raises(ConfigError, match="resume_override: \\['lr'\\]"):
        run(quick(tmp_path, resume=True, lr=1e-2))
    out = run(quick(tmp_path, resume=True, lr=1e-2, resume_override=["lr"]))
    assert [s for s, _ in out["losses"]] == [3]
    assert float(read_csv(tmp_path / "run" / "train_log.csv")[-1]["lr"]) == 1e-2
    with pytest.raises(ConfigError, match="'model' cannot change on resume"):
        quick(tmp_path, resume=True, resume_override=["model"])


def test_failing_checks_write_nothing(tmp_path):
    data = tmp_path / "train.json"
    from coconut_kernels.data import generate_dataset, save_records

    save_records(generate_dataset(12, seed=3), data)
    run(quick(tmp_path, train_path=str(data), max_steps=2))
    save = tmp_path / "run"
    before = snapshot(save)
    data.write_text('[{"question": "q", ')  # the data file broke since
    with pytest.raises(ConfigError, match="not valid JSON"):
        run(quick(tmp_path, train_path=str(data), resume=True))
    with pytest.raises(ConfigError, match="'lr': expected a finite number"):
        quick(tmp_path, train_path=str(data), resume=True, lr=float("nan"))
    assert snapshot(save) == before
    # a fresh run whose model does not fit its data creates no folder
    with pytest.raises(ConfigError, match="max_position 64"):
        run(quick(tmp_path / "fresh", model={**TINY_MODEL, "max_position": 64}))
    assert not (tmp_path / "fresh").exists()


def test_a_shorter_resumed_run_changes_nothing(tmp_path, capsys):
    run(quick(tmp_path, num_epochs=2))
    save = tmp_path / "run"
    before = snapshot(save)
    out = run(quick(tmp_path, num_epochs=2, resume=True, max_steps=4))  # saved at step 6
    assert out["losses"] == [] and "nothing left to train" in capsys.readouterr().err
    out = run(quick(tmp_path, num_epochs=2, resume=True))  # the run is complete
    assert out["losses"] == []
    assert snapshot(save) == before
    assert json.loads((save / "summary.json").read_text())["final_loss"] is not None


def test_a_failed_resumed_run_leaves_earlier_files(tmp_path, monkeypatch):
    run(quick(tmp_path, num_epochs=2, max_steps=3))
    save = tmp_path / "run"
    summary = (save / "summary.json").read_bytes()
    good = latest_checkpoint(save)
    good_files = snapshot(good)
    rows = read_csv(save / "train_log.csv")
    forward, calls = LatentLM.forward, []

    def nan_on_second(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LatentLM, "forward", nan_on_second)
    with pytest.raises(CoconutError, match="step 5 .* the loss is nan"):
        run(quick(tmp_path, num_epochs=2, resume=True))
    assert (save / "summary.json").read_bytes() == summary
    assert latest_checkpoint(save) == good and snapshot(good) == good_files
    assert read_csv(save / "train_log.csv")[:3] == rows  # the earlier rows as they were


# ---------------------------------------------------------------------------------------------------------
# SIGKILL at a random step, then resume: the weights of an uninterrupted run, bitwise

KILL_CFG = dict(generate_train=40, generate_val=2, data_seed=3, model=TINY_MODEL, method="coconut",
                max_latent_stage=2, epochs_per_stage=1, num_epochs=3, lr=3e-3, batch_size=4, eval_batch_size=2,
                max_new_tokens=4, eval_every=0, save_every_steps=1, keep_checkpoints=2, progress=False,
                tensorboard=False, seed=0, warmup_steps=2,
                dropout=0.1)  # 30 optimizer steps, a checkpoint after each; dropout: its masks must resume too


def test_sigkill_at_a_random_step_then_resume_gives_the_same_weights(tmp_path):
    from coconut_kernels.training import TrainConfig

    reference = run(TrainConfig(**KILL_CFG, save_dir=str(tmp_path / "ref")))["checkpoint"]
    save = tmp_path / "killed"
    kill_at = random.Random(20).randint(3, 15)
    flags = [a for k, v in KILL_CFG.items() for a in (f"--{k}", json.dumps(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "wb") as err:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen([sys.executable, "-m", "coconut_kernels.train", *flags, "--save_dir", str(save)],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    log = save / "train_log.csv"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) - 1 >= kill_at:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err_file.read_text()[-2000:]
    assert not (save / "summary.json").exists()  # it really died before the end
    steps_done = len(read_csv(log))
    assert kill_at <= steps_done < 30
    out = run(TrainConfig(**KILL_CFG, save_dir=str(save), resume=True))
    assert out["losses"][-1][0] == 30 and out["checkpoint"].name == reference.name
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out["checkpoint"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the log reads as one uninterrupted run
    assert [int(r["step"]) for r in read_csv(log)] == list(range(1, 31))
