"""The console scripts (`coconut-train`, `coconut-data`, `coconut-eval`, `coconut-analyze`) speak in one line:
every user error prints ``<prog>: error: ...`` naming the file, key or flag, exits 2, writes nothing, and shows a
traceback only with ``--debug``; a non-finite loss or gradient norm stops the run before the next checkpoint
unless ``skip_nonfinite``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from coconut_kernels.data import generate_dataset, save_records
from coconut_kernels.data.cli import main as data_main
from coconut_kernels.errors import CoconutError
from coconut_kernels.latent import LatentLM
from coconut_kernels.train import main, run
from coconut_kernels.training import latest_checkpoint, read_csv

from .test_train import TINY_MODEL, make_hf_folder, one_thread, tiny  # noqa: F401 (one_thread: autouse fixture)

FLAGS = ["--generate_train", "8", "--generate_val", "2", "--num_epochs", "1", "--batch_size", "4",
         "--max_latent_stage", "1", "--max_new_tokens", "4", "--progress", "false", "--tensorboard", "false"]


def model_flag(**changes) -> list[str]:
    return ["--model", json.dumps({**TINY_MODEL, **changes})]


def one_line_error(argv, capsys, command=main, prog="coconut-train") -> str:
    """Run a console script, assert exit status 2 and a single ``<prog>: error:`` line; return it."""
    assert command(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("extra,names", [
    (model_flag(n_layer=-1), ["model.n_layer", "-1"]),
    (model_flag(d_model=0), ["model.d_model", "0"]),
    (model_flag(d_model=30, n_head=4), ["d_model", "n_head"]),
    (model_flag(norm_eps=float("nan")), ["model.norm_eps"]),
    (model_flag() + ["--device", "gpu0"], ["'device'", "gpu0"]),
    (model_flag() + ["--lr", ".nan"], ["'lr'", "finite"]),
    (model_flag() + ["--max_grad_norm", ".inf"], ["'max_grad_norm'", "finite"]),
    (model_flag() + ["--weight_decay", ".nan"], ["'weight_decay'", "finite"]),
    (model_flag() + ["--uniform_prob", ".nan"], ["'uniform_prob'", "finite"]),
    (model_flag() + ["--resume_override", "[model]"], ["'resume_override'", "'model'"]),
    (model_flag() + ["--resume_override", "[lrr]"], ["'lrr' does not exist", "'lr'"]),
    (model_flag() + ["--overwrite", "true", "--resume", "true"], ["'overwrite'", "'resume'"]),
    (model_flag() + ["--num_epochs", "0"], ["'num_epochs'", "only_eval"]),
    (model_flag() + ["--device", "meta"], ["'device'", "meta"]),
])
def test_bad_values_are_one_line_errors_and_write_nothing(tmp_path, capsys, extra, names):
    save = tmp_path / "run"
    err = one_line_error([*FLAGS, "--save_dir", str(save), *extra], capsys)
    for name in names:
        assert name in err, err
    assert not save.exists()


def test_unwritable_save_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = one_line_error([*FLAGS, *model_flag(), "--save_dir", str(blocker / "run")], capsys)
    assert "'save_dir'" in err and str(blocker) in err and "not a folder" in err


def test_missing_init_from_names_the_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    err = one_line_error([*FLAGS, "--init_from", str(missing), "--save_dir", str(tmp_path / "run")], capsys)
    assert f"the folder {missing} does not exist" in err and "tokenizer.json" not in err


@pytest.mark.parametrize("name,keep", [("config.json", 20), ("model.safetensors", 100)])
def test_truncated_hugging_face_files_are_named(tmp_path, capsys, name, keep):
    records = generate_dataset(8, seed=5)
    folder = tmp_path / "hf"
    make_hf_folder(folder, records)
    file = folder / name
    file.write_bytes(file.read_bytes()[:keep])
    data = tmp_path / "train.json"
    save_records(records, data)
    capsys.readouterr()  # transformers' own output while the folder was made
    err = one_line_error([*FLAGS, "--train_path", str(data), "--init_from", str(folder),
                          "--save_dir", str(tmp_path / "run")], capsys)
    assert str(file) in err, err
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(CoconutError, match="'lr'"):
        main([*FLAGS, *model_flag(), "--lr", ".nan", "--save_dir", str(tmp_path / "run"), "--debug"])


def test_coconut_data_speaks_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert data_main(["prosqa", "--n", "2", "--out", str(blocker / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coconut-data: error: ") and str(blocker) in err and "\n" not in err
    with pytest.raises(OSError):
        data_main(["--debug", "prosqa", "--n", "2", "--out", str(blocker / "out.json")])


# ---------------------------------------------------------------------------------------------------------
# coconut-eval and coconut-analyze: every flag is checked before a file is read or the model is loaded

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")


@pytest.fixture
def analysis_checkpoint(tmp_path):
    """A tiny coconut-train checkpoint folder (untrained) and ProsQA-style records."""
    from .test_analysis import _checkpoint

    ckpt, data, *_ = _checkpoint(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    return ckpt, data, blocker


def _bad_flags(blocker, dash: str) -> list:
    """(flags, words the message must hold) of coconut-eval (dash "_") and coconut-analyze (dash "-")."""
    f = lambda name: "--" + name.replace("_", dash)  # noqa: E731
    return [
        ([f("batch_size"), "0"], [f("batch_size"), "[1, inf]", "got 0"]),
        ([f("max_records"), "0"], [f("max_records"), "[1, inf]"]),
        ([f("max_records"), "-2"], [f("max_records"), "got -2"]),
        ([f("stage"), "-1"], [f("stage"), "[0, inf]"]),
        ([f("max_new_tokens"), "0"], [f("max_new_tokens")]),
        (["--device", "meta"], ["--device", "'cpu' or 'cuda'"]),
        (["--device", "gpu0"], ["--device", "gpu0"]),
        (["--device", "cuda:99"], ["--device", "cuda:99"]),
        (["--out", str(blocker / "x")], ["--out", str(blocker), "not a folder"]),
    ]


@pytest.mark.parametrize("case", range(9))
def test_coconut_eval_flags(analysis_checkpoint, capsys, case):
    from coconut_kernels.interop.evaluate import main as eval_main

    ckpt, data, blocker = analysis_checkpoint
    flags, words = _bad_flags(blocker, "_")[case]
    err = one_line_error([str(ckpt), "--data", str(data), "--out", str(ckpt.parent / "o.json"), *flags], capsys,
                         eval_main, "coconut-eval")
    assert all(w in err for w in words), err
    assert not (ckpt.parent / "o.json").exists()


@pytest.mark.parametrize("flags,words", [
    (["--top_p", "2"], ["--top_p", "(0.0, 1.0]"]), (["--temperature", "0"], ["--temperature"]),
    (["--top_k", "-1"], ["--top_k"]), (["--samples", "-1"], ["--samples"]),
    (["--out", "."], ["--out", "a folder, not a file"]),
    pytest.param(["--device", "cuda"], ["--device", "no CUDA device is available"], marks=NO_GPU),
])
def test_coconut_eval_sampling_and_out_flags(analysis_checkpoint, capsys, flags, words):
    from coconut_kernels.interop.evaluate import main as eval_main

    ckpt, data, _ = analysis_checkpoint
    err = one_line_error([str(ckpt), "--data", str(data), *flags], capsys, eval_main, "coconut-eval")
    assert all(w in err for w in words), err


def test_coconut_eval_data_and_checkpoint_config(analysis_checkpoint, capsys):
    from coconut_kernels.interop.evaluate import main as eval_main

    ckpt, data, _ = analysis_checkpoint
    # this checkpoint's config.yaml names no model: the error names the file
    err = one_line_error([str(ckpt), "--data", str(data), "--out", ""], capsys, eval_main, "coconut-eval")
    assert str(ckpt / "config.yaml") in err
    config = ckpt / "config.yaml"
    config.write_text(config.read_text() + f"init_from: {ckpt}\n")
    empty = ckpt.parent / "empty.json"
    empty.write_text("[]")
    err = one_line_error([str(ckpt), "--data", str(empty), "--out", ""], capsys, eval_main, "coconut-eval")
    assert "--data" in err and "no records" in err
    with pytest.raises(CoconutError, match="--batch_size"):
        eval_main([str(ckpt), "--data", str(data), "--batch_size", "0", "--debug"])


@pytest.mark.parametrize("case", range(9))
def test_coconut_analyze_flags(analysis_checkpoint, capsys, case):
    from coconut_kernels.analysis import main as analyze_main

    ckpt, data, blocker = analysis_checkpoint
    flags, words = _bad_flags(blocker, "-")[case]
    out = ckpt.parent / "analysis"
    err = one_line_error([str(ckpt), "--data", str(data), "--out", str(out), *flags], capsys, analyze_main,
                         "coconut-analyze")
    assert all(w in err for w in words), err
    assert not out.exists()


@pytest.mark.parametrize("flags,words", [
    (["--plots", "-1"], ["--plots"]),
    (["--out", "FILE"], ["--out", "a file, not a folder"]),
    pytest.param(["--device", "cuda"], ["--device", "no CUDA device is available"], marks=NO_GPU),
])
def test_coconut_analyze_more_flags(analysis_checkpoint, capsys, flags, words):
    from coconut_kernels.analysis import main as analyze_main

    ckpt, data, blocker = analysis_checkpoint
    flags = [str(blocker) if f == "FILE" else f for f in flags]
    err = one_line_error([str(ckpt), "--data", str(data), *flags], capsys, analyze_main, "coconut-analyze")
    assert all(w in err for w in words), err
    with pytest.raises(CoconutError):
        analyze_main([str(ckpt), "--data", str(data), *flags, "--debug"])


def test_coconut_export_speaks_in_one_line(analysis_checkpoint, capsys):
    from coconut_kernels.interop.hf_export import main as export_main

    ckpt, _, blocker = analysis_checkpoint
    err = one_line_error([str(ckpt), str(blocker / "hf")], capsys, export_main, "coconut-export")
    assert "out" in err and str(blocker) in err and "not a folder" in err
    missing = ckpt.parent / "missing"
    err = one_line_error([str(missing), str(ckpt.parent / "hf")], capsys, export_main, "coconut-export")
    assert str(missing) in err
    assert not (ckpt.parent / "hf").exists()


@pytest.mark.parametrize("flags,words", [
    (["--port", "70000"], ["--port", "[0, 65535]"]), (["--max-batch", "0"], ["--max-batch"]),
    (["--max-queue", "0"], ["--max-queue"]), (["--max-tokens", "1"], ["--max-tokens"]),
    ([], ["does not exist"]),
])
def test_coconut_serve_speaks_in_one_line(tmp_path, capsys, flags, words):
    pytest.importorskip("uvicorn")
    from coconut_kernels.serve.app import main as serve_main

    err = one_line_error([str(tmp_path / "no_model"), *flags], capsys, serve_main, "coconut-serve")
    assert all(w in err for w in words), err


# ---------------------------------------------------------------------------------------------------------
# Non-finite loss or gradient norm


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make the loss of the n-th training forward (1-based) NaN."""
    calls = {"n": 0}
    forward = LatentLM.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == calls["at"]:
                out.loss = out.loss * float("nan")
        return out

    def arm(n: int):
        calls["at"] = n
        monkeypatch.setattr(LatentLM, "forward", poisoned)

    return arm


def test_nan_loss_stops_before_the_next_checkpoint(tmp_path, nan_at_call):
    cfg = tiny(tmp_path, num_epochs=2, eval_every=0)
    good = run(tiny(tmp_path, num_epochs=2, eval_every=0, max_steps=3))["checkpoint"]  # epoch 0's 3 steps
    weights = (good / "model.safetensors").read_bytes()
    nan_at_call(2)  # step 5 of the resumed run
    with pytest.raises(CoconutError, match=r"step 5 \(epoch 1, stage 1\): the loss is nan.*skip_nonfinite"):
        run(tiny(tmp_path, num_epochs=2, eval_every=0, resume=True))
    assert latest_checkpoint(cfg.save_dir) == good
    assert (good / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in Path(cfg.save_dir).glob("step-*")) == [good.name]


def test_skip_nonfinite_skips_and_logs_the_step(tmp_path, nan_at_call):
    nan_at_call(2)
    out = run(tiny(tmp_path, num_epochs=1, eval_every=0, skip_nonfinite=True))
    rows = read_csv(tmp_path / "run" / "train_log.csv")
    assert [int(r["skipped"]) for r in rows] == [0, 1, 0]
    assert math.isnan(float(rows[1]["loss"]))
    # the epoch's mean training loss in the learning curve leaves the skipped step out
    ev = read_csv(tmp_path / "run" / "eval_log.csv")[0]
    assert float(ev["train_loss"]) == pytest.approx((float(rows[0]["loss"]) + float(rows[2]["loss"])) / 2)
    from safetensors.torch import load_file

    weights = load_file(str(out["checkpoint"] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
