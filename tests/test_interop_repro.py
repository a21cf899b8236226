"""`coconut-repro`: the official recipe of each Table 1 row (compared key by key with facebookresearch/coconut's
args/*.yaml), the batch kept at 128 per optimizer step on any GPU count, the dry run's recipe and commands
(torchrun for several GPUs, GSM8k's latent rows after the cot row), bad input, and the whole pipeline on a
tiny model (train with a validation row per epoch, test every kept checkpoint, the paper's number beside)."""
from __future__ import annotations

import io
import json

import pytest
import yaml

from coconut_kernels.interop.official import official_config
from coconut_kernels.interop.repro import PAPER, main, per_gpu_batch, recipe
from coconut_kernels.training import read_csv

# The official files' values (facebookresearch/coconut args/*.yaml), without paths and names.
PROSQA_COCONUT = {"coconut": True, "cot": False, "no_thoughts": False, "no_cot": False, "c_thought": 1,
                  "epochs_per_stage": 5, "max_latent_stage": 6, "pad_latent_to_max": True, "save_only_improve": False,
                  "uniform_prob": 0.0, "model_id": "openai-community/gpt2", "load_model_path": "None", "seed": 0,
                  "resume": 0, "bf16": False, "reset_optimizer": True, "batch_size_training": 32,
                  "gradient_accumulation_steps": 1, "num_epochs": 50, "lr": 1e-4, "weight_decay": 0.01}
GSM_COT = {"coconut": False, "cot": True, "no_thoughts": False, "no_cot": False, "c_thought": 0, "epochs_per_stage": 1,
           "max_latent_stage": 0, "pad_latent_to_max": True, "save_only_improve": True, "uniform_prob": 0.0,
           "model_id": "openai-community/gpt2", "load_model_path": "None", "seed": 0, "resume": 0, "bf16": False,
           "reset_optimizer": False, "batch_size_training": 32, "gradient_accumulation_steps": 1, "num_epochs": 25,
           "lr": 1e-4, "weight_decay": 0.01}
GSM_COCONUT = dict(GSM_COT, coconut=True, cot=False, c_thought=2, epochs_per_stage=3, max_latent_stage=3,
                   save_only_improve=False, resume=3, reset_optimizer=True)


def _subset(r: dict, ref: dict) -> dict:
    return {k: r[k] for k in ref}


def test_recipes_are_the_official_files():
    assert _subset(recipe("prosqa", "coconut", n_gpus=4), PROSQA_COCONUT) == PROSQA_COCONUT
    prontoqa = recipe("prontoqa", "coconut", n_gpus=4)
    assert _subset(prontoqa, PROSQA_COCONUT) == PROSQA_COCONUT  # args/prontoqa_coconut.yaml: the same values
    assert prontoqa["train_path"] == "data/prontoqa_train.json" and prontoqa["val_path"] == "data/prontoqa_valid.json"
    assert _subset(recipe("gsm8k", "cot", n_gpus=4), GSM_COT) == GSM_COT
    gsm = recipe("gsm8k", "coconut", n_gpus=4, cot_checkpoint=None)
    assert _subset(gsm, GSM_COCONUT) == GSM_COCONUT and gsm["train_path"] == "data/gsm_train.json"
    # the controls differ from their row only in run.py's method flags
    pause = recipe("prosqa", "pause_as_thought", n_gpus=4)
    assert not any(pause[k] for k in ("coconut", "cot", "no_cot", "no_thoughts"))
    assert _subset(pause, PROSQA_COCONUT) == dict(PROSQA_COCONUT, coconut=False)
    no_cot = recipe("prosqa", "no_cot", n_gpus=4)
    assert no_cot["no_cot"] and no_cot["num_epochs"] == 50 and no_cot["max_latent_stage"] == 0
    assert PAPER["prosqa"] == {"cot": 77.5, "no_cot": 76.7, "coconut": 97.0, "no_thoughts": 95.5,
                               "pause_as_thought": 96.6}


@pytest.mark.parametrize("gpus,expected", [(1, (32, 4)), (2, (32, 2)), (4, (32, 1)), (8, (16, 1))])
def test_128_examples_per_step_on_any_gpu_count(gpus, expected):
    batch, accum = per_gpu_batch(gpus)
    assert (batch, accum) == expected and batch * accum * gpus == 128


def test_the_written_recipe_reads_as_run_py_would(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe("prosqa", "coconut", n_gpus=1, save_path=str(tmp_path / "row"))))
    cfg = official_config(path, {"init_from": None, "model": {"family": "gpt2", "n_layer": 1, "n_head": 1,
                                                               "d_model": 8, "max_position": 64}}, report=io.StringIO())
    assert (cfg.method, cfg.c_thought, cfg.epochs_per_stage, cfg.max_latent_stage) == ("coconut", 1, 5, 6)
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.num_epochs, cfg.lr, cfg.weight_decay) == (32, 4, 50, 1e-4, 0.01)
    assert cfg.save_dir == str(tmp_path / "row" / "run") and cfg.max_new_tokens == 128


def test_dry_run_prints_the_recipe_and_commands_and_writes_nothing(tmp_path, capsys):
    assert main(["gsm8k", "--method", "pause", "--gpus", "4", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    # GSM8k's latent rows start from the CoT checkpoint: the cot row's recipe and command come first
    cot, pause = out.split(f"# {tmp_path / 'out' / 'gsm8k-pause_as_thought' / 'recipe.yaml'}")
    assert "cot: true" in cot and "num_epochs: 25" in cot
    assert "python -m torch.distributed.run --standalone --nproc_per_node=4 -m coconut_kernels.train --official" in cot
    assert "c_thought: 2" in pause and "resume: 3" in pause and "coconut: false" in pause
    assert f"--init_from {tmp_path / 'out' / 'gsm8k-cot' / 'run'}" in pause
    assert "coconut_kernels.interop.evaluate" in pause and "--data data/gsm_test.json" in pause


def test_bad_input_names_the_flag(tmp_path, capsys):
    assert main(["prosqa", "--method", "icot", "--dry-run"]) == 2
    assert "coconut-repro: error: --method: expected one of coconut, cot, no_cot" in capsys.readouterr().err
    assert main(["prosqa", "--gpus", "3", "--dry-run"]) == 2
    assert "--gpus: 3 GPUs cannot share the official 128 examples" in capsys.readouterr().err
    assert main(["prosqa", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--gpus", "1"]) == 2
    assert f"--data: {tmp_path / 'nowhere' / 'prosqa_train.json'} not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["imagenet"])


def test_tiny_row_end_to_end(tmp_path, capsys):
    """A tiny random GPT-2 through the ProsQA COCONUT recipe shrunk to one step per stage: the trainer's
    validation row per epoch, the kept checkpoint scored on the test split, the paper's number beside."""
    assert main(["prosqa", "--method", "coconut", "--tiny", "--keep", "1", "--out", str(tmp_path)]) == 0
    row = tmp_path / "prosqa-coconut"
    written = yaml.safe_load((row / "recipe.yaml").read_text())
    assert written["coconut"] and written["epochs_per_stage"] == 1 and written["max_latent_stage"] == 3
    evals = read_csv(row / "run" / "eval_log.csv")
    assert [(int(r["epoch"]), int(r["stage"])) for r in evals] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    train = read_csv(row / "run" / "train_log.csv")
    assert [int(r["stage"]) for r in train] == [0, 1, 2, 3, 4]  # one optimizer step per stage
    res = json.loads((row / "repro.json").read_text())
    test = json.loads((row / "test_step-000005.json").read_text())
    assert res["paper"] == 97.0 and res["measured"] == round(100 * test["accuracy"], 1)
    assert res["selected"]["epoch"] == 4 and res["selected"]["stage"] == 4 and test["n"] == 4
    assert test["stage"] == 4 and test["mean_latents"] == 3.0
    out = capsys.readouterr().out
    assert f"prosqa COCONUT: paper 97.0%   measured {res['measured']:.1f}% (tiny pipeline check" in out


def test_tiny_gsm8k_latent_row_starts_from_the_cot_row(tmp_path, capsys):
    """GSM8k's official two-phase recipe: the cot row runs first, the coconut row starts from its checkpoint
    at stage 1 (resume 3 // epochs_per_stage 3) with two thoughts per step."""
    assert main(["gsm8k", "--method", "coconut", "--tiny", "--keep", "1", "--out", str(tmp_path)]) == 0
    cot_evals = read_csv(tmp_path / "gsm8k-cot" / "run" / "eval_log.csv")
    assert [int(r["stage"]) for r in cot_evals] == [0, 0]
    evals = read_csv(tmp_path / "gsm8k-coconut" / "run" / "eval_log.csv")
    assert [(int(r["epoch"]), int(r["stage"])) for r in evals] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    saved = yaml.safe_load((tmp_path / "gsm8k-coconut" / "run" / "step-000004" / "config.yaml").read_text())
    assert saved["init_from"] == str(tmp_path / "gsm8k-cot" / "run" / "step-000002") and saved["c_thought"] == 2
    res = json.loads((tmp_path / "gsm8k-coconut" / "repro.json").read_text())
    test = json.loads((tmp_path / "gsm8k-coconut" / "test_step-000004.json").read_text())
    assert res["paper"] == 34.1 and test["mean_latents"] == 6.0  # 3 stages x c_thought 2
    assert "gsm8k COCONUT: paper 34.1%" in capsys.readouterr().out
