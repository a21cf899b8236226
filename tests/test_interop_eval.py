"""Tests of `coconut-eval` and the evaluation it shares with the trainer (`training.evaluate`): answer and CoT
exact match with the official extraction (an oracle that writes the reference gets 100% of both), pass@k over
sampled decodings, the validation loss of the stage's layout, latents per example, the JSON of outputs.
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from coconut_kernels.data import RaggedCollator, StageConfig, generate_dataset, save_records, tokenize_records
from coconut_kernels.interop.evaluate import main
from coconut_kernels.interop.hf_export import load_source, main as export_main
from coconut_kernels.latent import GenerateOutput
from coconut_kernels.train import run
from coconut_kernels.training import TrainConfig
from coconut_kernels.training.evaluate import evaluate, validation_loss

from .test_interop_official import official_yaml

TINY = {"family": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "max_position": 512}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny coconut-train checkpoint (word tokenizer) and its data."""
    root = tmp_path_factory.mktemp("eval")
    records = generate_dataset(10, seed=11)
    data = root / "data.json"
    save_records(records, data)
    res = run(TrainConfig(train_path=str(data), val_path=str(data), model=TINY, method="coconut", max_latent_stage=2,
                          epochs_per_stage=1, num_epochs=2, batch_size=5, lr=3e-3, max_new_tokens=8,
                          progress=False, tensorboard=False, save_dir=str(root / "run")))
    return res["checkpoint"], data, records


def test_coconut_eval_cli(trained, tmp_path, capsys):
    ckpt, data, records = trained
    out = tmp_path / "outputs.json"
    assert main([str(ckpt), "--data", str(data), "--stage", "2", "--max_new_tokens", "8", "--batch_size", "4",
                 "--samples", "3", "--temperature", "1e-6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "answer exact match" in printed and "pass@3" in printed
    res = json.loads(out.read_text())
    assert res["n"] == len(records) and len(res["examples"]) == len(records)
    assert res["method"] == "coconut" and res["stage"] == 2
    for ex in res["examples"]:
        assert ex["n_latents"] == 2  # stage 2, c_thought 1
        assert ex["correct"] == (ex["prediction"] == ex["answer"].replace(",", "").strip())
        assert len(ex["samples"]) == 3
    assert res["mean_latents"] == 2.0
    assert res["accuracy"] == sum(e["correct"] for e in res["examples"]) / len(records)
    # at a temperature near 0 every sample is the greedy decoding
    for ex in res["examples"]:
        assert all(s["output"] == ex["output"] for s in ex["samples"])
    assert res["pass@3"] == res["accuracy"] and res["sample_accuracy"] == res["accuracy"]
    # the trainer's evaluation of the same stage gives the same accuracy
    lm = load_source(ckpt)
    tok = lm.tokenizer
    recs = tokenize_records(records, tok)
    sc = StageConfig(method="coconut", c_thought=1, max_latent_stage=2)
    again = evaluate(lm, recs, 2, sc, tok, RaggedCollator.from_tokenizer(tok), batch_size=10, max_new_tokens=8,
                     device=torch.device("cpu"))
    assert again["accuracy"] == res["accuracy"] and again["cot_accuracy"] == res["cot_accuracy"]
    # the validation loss is the mean over every labelled token, whatever the batch size
    one = validation_loss(lm, recs, 2, sc, tok, RaggedCollator.from_tokenizer(tok), batch_size=100,
                          device=torch.device("cpu"))
    assert one["val_loss"] == pytest.approx(res["val_loss"], rel=1e-5)


def test_oracle_gets_every_answer_and_chain(trained):
    """A model that writes each record's reference continuation scores 100% answer and CoT exact match:
    the extraction reads what the official run reads."""
    ckpt, _, records = trained
    lm = load_source(ckpt)
    tok = lm.tokenizer
    recs = tokenize_records(records, tok)
    sc = StageConfig(method="cot", c_thought=1, max_latent_stage=2)
    truth = {tuple(r.question): [t for s in r.steps for t in s] + r.answer for r in recs}

    def oracle(ids, mask, *, max_new_tokens, **kw):
        rows = [truth[tuple(x[m.bool()].tolist())] for x, m in zip(ids, mask)]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        return GenerateOutput(tokens=tokens, lengths=torch.tensor([len(r) for r in rows]),
                              n_latents=torch.zeros(len(rows), dtype=torch.long))

    lm.generate = oracle
    res = evaluate(lm, recs, 0, sc, tok, RaggedCollator.from_tokenizer(tok), batch_size=4, max_new_tokens=200,
                   device=torch.device("cpu"), outputs=True)
    assert res["accuracy"] == 1.0 and res["cot_accuracy"] == 1.0, res["outputs"][0]


def test_eval_and_export_take_a_save_folder(trained, tmp_path, capsys):
    """A save folder, or its `latest` pointer, means its newest checkpoint (as coconut-analyze takes it)."""
    ckpt, data, records = trained
    runs = {}
    for source in (ckpt, ckpt.parent, ckpt.parent / "latest"):
        out = tmp_path / f"{len(runs)}.json"
        assert main([str(source), "--data", str(data), "--max_new_tokens", "8", "--out", str(out)]) == 0
        runs[source] = json.loads(out.read_text())
    first, *rest = runs.values()
    for res in rest:
        assert res["source"] == str(ckpt) and res["examples"] == first["examples"]
    capsys.readouterr()
    # coconut-export loads the newest checkpoint too (then refuses this one's word tokenizer, as for the folder)
    assert export_main([str(ckpt.parent), str(tmp_path / "hf")]) == 2
    assert "the model has a WordTokenizer" in capsys.readouterr().err


def test_resolve_source_edge_cases(trained, tmp_path):
    from coconut_kernels.errors import CheckpointError
    from coconut_kernels.training.checkpoint import resolve_source
    ckpt = trained[0]
    assert resolve_source(ckpt.parent) == resolve_source(ckpt.parent / "latest") == str(ckpt)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "latest").write_text("step-000001")  # a Hugging Face folder is never read as a save folder
    assert resolve_source(hf) == str(hf)
    official = tmp_path / "official"
    official.mkdir()
    (official / "latest").write_bytes(b"\xf9\x00" * 200)  # an official checkpoint file that is called latest
    assert resolve_source(official / "latest") == str(official / "latest")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_source(empty) == str(empty)  # not a save folder: the loader says what it expected
    died = tmp_path / "died"
    died.mkdir()
    (died / "run.json").write_text('{"run_id": "x"}')
    with pytest.raises(CheckpointError, match="died: a coconut-train save folder without a complete checkpoint"):
        resolve_source(died)


def test_eval_with_an_official_config(trained, tmp_path, capsys):
    ckpt, data, records = trained
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(official_yaml(only_eval=True, resume=1, epochs_per_stage=1, max_latent_stage=2,
                                                 val_path=str(data))))
    assert main([str(ckpt), "--official", str(path), "--out", str(tmp_path / "o.json"), "--max_records", "3"]) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["stage"] == 1 and res["max_new_tokens"] == 128 and res["n"] == 3
    assert all(e["n_latents"] == 1 for e in res["examples"])


def test_eval_bad_input(trained, tmp_path, capsys):
    ckpt, data, _ = trained
    assert main([str(ckpt), "--data", str(tmp_path / "none.json")]) == 2
    assert "--data: " in capsys.readouterr().err
    assert main([str(tmp_path / "checkpoint_3"), "--data", str(data)]) == 2
    assert "not found" in capsys.readouterr().err


def test_coconut_eval_precision_has_the_trainers_meanings(trained, tmp_path, capsys):
    """--precision fp32 | bf16 (the whole model cast, as the trainer's bf16: true; --bf16 is its alias) |
    bf16-autocast; the default is the checkpoint's run config's (fp32 here)."""
    ckpt, data, _ = trained
    flags = [str(ckpt), "--data", str(data), "--stage", "2", "--max_new_tokens", "4", "--max_records", "4"]
    got = {}
    for name, extra in (("default", []), ("fp32", ["--precision", "fp32"]), ("bf16", ["--precision", "bf16"]),
                        ("alias", ["--bf16"]), ("autocast", ["--precision", "bf16-autocast"])):
        out = tmp_path / f"{name}.json"
        assert main([*flags, *extra, "--out", str(out)]) == 0
        got[name] = json.loads(out.read_text())
    assert [got[n]["precision"] for n in got] == ["fp32", "fp32", "bf16", "bf16", "bf16-autocast"]
    assert got["alias"]["val_loss"] == got["bf16"]["val_loss"] and got["alias"]["examples"] == got["bf16"]["examples"]
    assert got["bf16"]["val_loss"] != got["fp32"]["val_loss"] != got["autocast"]["val_loss"]
    capsys.readouterr()
    assert main([*flags, "--bf16", "--precision", "bf16-autocast", "--out", ""]) == 2
    assert "--bf16 means --precision bf16" in capsys.readouterr().err


def test_evaluation_stops_answers_at_the_model_positions(trained, capsys):
    """The official loop decodes up to max_new_tokens and fails only if an answer runs past the model's positions;
    the evaluation therefore gives each batch the room its longest prompt leaves instead of refusing it."""
    ckpt, _, records = trained
    lm = load_source(ckpt)
    tok = lm.tokenizer
    recs = tokenize_records(records, tok)
    sc = StageConfig(method="coconut", c_thought=1, max_latent_stage=2)
    asked = []
    real = lm.generate

    def spy(ids, mask, *, max_new_tokens, **kw):
        asked.append((ids.shape[1], max_new_tokens))
        return real(ids, mask, max_new_tokens=max_new_tokens, **kw)

    lm.generate = spy
    res = evaluate(lm, recs, 2, sc, tok, RaggedCollator.from_tokenizer(tok), batch_size=5, max_new_tokens=10_000,
                   device=torch.device("cpu"))
    assert res["n"] == len(records)
    assert asked and all(width + n == TINY["max_position"] for width, n in asked)
    assert "cut at the model's 512 positions" in capsys.readouterr().err


def test_eval_latent_schedule(trained, tmp_path, capsys):
    """--latent_schedule jacobi --jacobi_iters T reaches generate and the validation loss: with T >= the stage's
    thought count (2) the outputs and the loss are the sequential schedule's; fewer iterations are recorded."""
    ckpt, data, _ = trained
    common = [str(ckpt), "--data", str(data), "--stage", "2", "--max_new_tokens", "8", "--batch_size", "4"]
    res = {}
    for name, flags in (("seq", []), ("exact", ["--latent_schedule", "jacobi", "--jacobi_iters", "2"]),
                        ("one", ["--latent_schedule", "jacobi", "--jacobi_iters", "1"])):
        assert main(common + flags + ["--out", str(tmp_path / f"{name}.json")]) == 0
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert res["seq"]["latent_schedule"] == "sequential" and res["seq"]["jacobi_iters"] is None
    assert (res["exact"]["latent_schedule"], res["exact"]["jacobi_iters"]) == ("jacobi", 2)
    assert [e["output"] for e in res["exact"]["examples"]] == [e["output"] for e in res["seq"]["examples"]]
    assert res["exact"]["val_loss"] == pytest.approx(res["seq"]["val_loss"], rel=1e-5)
    assert res["one"]["jacobi_iters"] == 1 and res["one"]["n"] == res["seq"]["n"]
    capsys.readouterr()
    assert main(common + ["--latent_schedule", "jacobi", "--jacobi_iters", "0"]) == 2
    assert "--jacobi_iters" in capsys.readouterr().err
