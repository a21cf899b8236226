"""Tests of the curriculum trainer (`coconut_kernels.train`, `coconut_kernels.training`).

A tiny GPT-2 (2 layers, d=32) on a few generated ProsQA-style problems: optimisation lowers the loss,
every method and feedback mode runs the curriculum, resume reproduces the uninterrupted loss curve, two
gloo processes train under DDP and FSDP, and every bad input (records, config keys, stages, checkpoints)
fails with an error naming what is wrong. A failed save never replaces a good checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coconut_kernels.data import generate_dataset, save_records
from coconut_kernels.errors import CheckpointError
from coconut_kernels.train import main, run
from coconut_kernels.training import TrainConfig, latest_checkpoint, load_config, read_csv
from coconut_kernels.training.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"family": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "max_position": 512}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second intra-op thread only adds synchronisation (and, on a loaded machine, waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, **kw) -> TrainConfig:
    """A config that trains in about a second per epoch on one core."""
    base = dict(generate_train=12, generate_val=4, data_seed=3, model=TINY_MODEL, method="coconut",
                max_latent_stage=2, epochs_per_stage=1, num_epochs=3, lr=3e-3, batch_size=4, eval_batch_size=4,
                max_new_tokens=12, save_dir=str(tmp_path / "run"), progress=False, tensorboard=False, seed=0,
                warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def losses_of(save_dir) -> list[float]:
    return [float(r["loss"]) for r in read_csv(Path(save_dir) / "train_log.csv")]


# ---------------------------------------------------------------------------------------------------------
# Optimisation


def test_steps_lower_the_loss(tmp_path):
    cfg = tiny(tmp_path, method="cot", num_epochs=6, generate_train=8, batch_size=8, lr=1e-2, eval_every=0, warmup_steps=0)
    out = run(cfg)
    losses = [loss for _, loss in out["losses"]]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_trivially_learnable_answer_is_learned(tmp_path):
    """Accuracy that means something: every training record ends in the same answer, so 20 steps teach it and
    greedy decoding through the latent stage gets (nearly) all validation problems right (measured: 8/8 for
    seeds 0-3), where the untrained model gets none; validation records whose answer differs score 0."""
    rng = random.Random(0)
    names, nouns = ["Tom", "Ann", "Bob", "Sam", "Eve", "Max"], ["lempus", "wumpus", "zorpus", "yumpus"]
    records = []
    for _ in range(24):
        name, a, b, c = rng.choice(names), *rng.sample(nouns, 3)
        records.append({"question": f"{name} is a {a}. Every {a} is a {b}. Is {name} a {b} or {c}?",
                        "steps": [f"{name} is a {b}."], "answer": "Tom is a wumpus."})
    save_records(records[:16], tmp_path / "train.json")
    save_records(records[16:], tmp_path / "val.json")
    save_records([dict(r, answer="Tom is a zorpus.") for r in records[16:]], tmp_path / "other.json")
    # AdamW restarts only at the stage change: the official restart every epoch (here 2 steps) at lr 1e-2 undoes
    # what the epoch learnt (measured: 0/8 right, final loss 1.31 against 8/8 and 0.64)
    cfg = dict(train_path=str(tmp_path / "train.json"), max_latent_stage=1, epochs_per_stage=5, num_epochs=10,
               lr=1e-2, batch_size=8, eval_batch_size=8, max_new_tokens=8, warmup_steps=0, eval_every=0,
               reset_optimizer_every="stage")
    untrained = run(tiny(tmp_path / "untrained", val_path=str(tmp_path / "val.json"), only_eval=True, eval_stage=1,
                         **cfg))["evals"][0]
    assert untrained["n"] == 8 and untrained["accuracy"] == 0.0
    out = run(tiny(tmp_path, val_path=str(tmp_path / "val.json"), **cfg))
    (final,) = out["evals"]
    assert final["stage"] == 1 and final["n"] == 8 and final["accuracy"] >= 0.75, final
    other = run(tiny(tmp_path / "other", val_path=str(tmp_path / "other.json"), init_from=str(out["checkpoint"]),
                     only_eval=True, eval_stage=1, **cfg))["evals"][0]
    assert other["n"] == 8 and other["accuracy"] == 0.0


@pytest.mark.parametrize("method", ["coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought"])
def test_every_method_runs_the_curriculum(tmp_path, method):
    out = run(tiny(tmp_path, method=method))
    stages = [int(r["stage"]) for r in read_csv(tmp_path / "run" / "train_log.csv")]
    expected = [0, 1, 2] if method in ("coconut", "no_thoughts", "pause_as_thought") else [0, 0, 0]
    assert sorted(set(stages)) == sorted(set(expected))
    assert [e["stage"] for e in out["evals"]] == expected
    for e in out["evals"]:  # what the accuracy means: test_a_trivially_learnable_answer_is_learned
        assert e["n"] == 4 and e["mean_new_tokens"] >= 1
    losses = [loss for _, loss in out["losses"]]
    assert len(losses) == 9 and losses[-1] < 0.9 * losses[0], losses  # ~0.8x in 9 steps, stage changes included


@pytest.fixture(scope="module")
def hidden_feedback_losses(tmp_path_factory):
    return [loss for _, loss in run(tiny(tmp_path_factory.mktemp("hidden"), num_epochs=2, eval_every=0))["losses"]]


@pytest.mark.parametrize("feedback", ["projected", "soft", "mixture"])
def test_feedback_modes_train(tmp_path, feedback, hidden_feedback_losses):
    """The trainer hands the mode to the model: the stage-0 epoch (no latents) takes exactly the steps of the
    default "hidden" mode, the stage-1 epoch does not. (That each mode's loss and gradients are right:
    tests/test_latent.py::test_feedback_modes_train_like_a_plain_loop.)"""
    losses = [loss for _, loss in run(tiny(tmp_path, feedback=feedback, num_epochs=2, eval_every=0))["losses"]]
    assert len(losses) == 6 and losses[:3] == hidden_feedback_losses[:3]
    assert all(a != b for a, b in zip(losses[3:], hidden_feedback_losses[3:])), (losses, hidden_feedback_losses)
    assert losses[-1] < losses[0]


def test_jacobi_schedule_trains_like_sequential_when_exact(tmp_path, hidden_feedback_losses):
    """latent_schedule: jacobi reaches the model's forward and generate: stage 1 has one thought per example, so
    one iteration is exact and the loss curve is the sequential one."""
    out = run(tiny(tmp_path, latent_schedule="jacobi", jacobi_iters=1, num_epochs=2, eval_every=0))
    losses = [loss for _, loss in out["losses"]]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(hidden_feedback_losses), rtol=1e-5, atol=1e-6)


def test_aligned_and_ragged_collation_give_the_same_curve(tmp_path):
    a = run(tiny(tmp_path / "a", collate="aligned", num_epochs=2, eval_every=0))["losses"]
    b = run(tiny(tmp_path / "b", collate="ragged", num_epochs=2, eval_every=0))["losses"]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


def test_grad_accumulation_bf16_autocast_and_schedule(tmp_path):
    cfg = dict(grad_accum_steps=2, lr_schedule="cosine", num_epochs=2, eval_every=0)
    out = run(tiny(tmp_path, precision="bf16-autocast", **cfg))
    rows = read_csv(tmp_path / "run" / "train_log.csv")
    assert len(rows) == 4  # 3 micro-batches per epoch -> 2 optimizer steps (the last one alone)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warm-up then cosine decay
    # bf16 autocast takes the fp32 run's steps: every logged loss within 2e-3 relative (measured: <= 6e-5)
    fp32 = run(tiny(tmp_path / "fp32", **cfg))["losses"]
    torch.testing.assert_close(torch.tensor([x for _, x in out["losses"]]), torch.tensor([x for _, x in fp32]),
                               rtol=2e-3, atol=0)
    assert all(a != b for (_, a), (_, b) in zip(out["losses"], fp32))  # and it did run in bf16
    # the weights stay fp32 under bf16 autocast
    from safetensors.torch import load_file

    weights = load_file(str(out["checkpoint"] / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_resume_gives_the_uninterrupted_loss_curve(tmp_path):
    full = run(tiny(tmp_path / "full", num_epochs=3, eval_every=0))
    assert len(full["losses"]) == 9
    # interrupted mid-epoch (step 4 of 9: epoch 1, stage 1) then resumed from save_dir's latest checkpoint
    part = tiny(tmp_path / "part", num_epochs=3, eval_every=0, max_steps=4)
    first = run(part)
    assert [s for s, _ in first["losses"]] == [1, 2, 3, 4]
    assert latest_checkpoint(part.save_dir).name == "step-000004"
    second = run(tiny(tmp_path / "part", num_epochs=3, eval_every=0, resume=True))
    assert [s for s, _ in second["losses"]] == [5, 6, 7, 8, 9]
    assert losses_of(part.save_dir) == [loss for _, loss in full["losses"]]
    # and the final weights are the same
    from safetensors.torch import load_file

    a = load_file(str(full["checkpoint"] / "model.safetensors"))
    b = load_file(str(second["checkpoint"] / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_at_a_stage_change_resets_the_optimizer_as_uninterrupted(tmp_path):
    full = run(tiny(tmp_path / "full", num_epochs=3, eval_every=0))["losses"]
    run(tiny(tmp_path / "part", num_epochs=3, eval_every=0, max_steps=3))  # ends exactly at epoch 0's end
    run(tiny(tmp_path / "part", num_epochs=3, eval_every=0, resume=True))
    assert losses_of(tmp_path / "part" / "run") == [loss for _, loss in full]


def test_keep_checkpoints_and_latest(tmp_path):
    cfg = tiny(tmp_path, num_epochs=3, eval_every=0, keep_checkpoints=2, save_every_steps=1, progress=True,
               log_every=1)  # with the progress bars on
    run(cfg)
    names = sorted(p.name for p in Path(cfg.save_dir).glob("step-*"))
    assert names == ["step-000008", "step-000009"]
    assert (Path(cfg.save_dir) / "latest").read_text().strip() == "step-000009"
    assert not list(Path(cfg.save_dir).glob(".tmp-*"))


def test_failed_save_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, num_epochs=1, eval_every=0)
    good = run(cfg)["checkpoint"]
    before = (good / "model.safetensors").read_bytes()

    from coconut_kernels.data import WordTokenizer

    def broken_save(self, path):
        Path(path).write_text('{"kind": "coconut-word')  # a partial write, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(WordTokenizer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run(tiny(tmp_path, num_epochs=2, eval_every=0, resume=True, resume_override=["num_epochs"]))
    assert latest_checkpoint(cfg.save_dir) == good
    assert (good / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in Path(cfg.save_dir).glob("step-*")) == [good.name]
    assert not list(Path(cfg.save_dir).glob(".tmp-*"))  # the partial folder is cleaned up
    # the good checkpoint still resumes
    monkeypatch.undo()
    out = run(tiny(tmp_path, num_epochs=2, eval_every=0, resume=True, resume_override=["num_epochs"]))
    assert [s for s, _ in out["losses"]] == [4, 5, 6]


def last_samples(err: str) -> list[str]:
    """The generated outputs the last evaluation printed ("  [ok] '...'" / "  [x ] '...'")."""
    return [line for line in err.rsplit("[eval]", 1)[1].splitlines() if line.startswith("  [")]


def test_only_eval_and_init_from_a_checkpoint(tmp_path, capsys):
    trained = run(tiny(tmp_path, num_epochs=3))
    samples = last_samples(capsys.readouterr().err)
    ckpt = trained["checkpoint"]
    out = run(tiny(tmp_path / "eval", init_from=str(ckpt), only_eval=True, eval_stage=2))
    assert out["evals"][0]["accuracy"] == trained["evals"][-1]["accuracy"]
    assert out["evals"][0]["mean_new_tokens"] == trained["evals"][-1]["mean_new_tokens"]
    # Both figures are 0% and max_new_tokens for any model this small: the same generated text shows the weights
    # are the checkpoint's.
    printed = capsys.readouterr()
    assert len(samples) == 3 and last_samples(printed.err) == samples
    printed = printed.out
    assert "accuracy" in printed and "stage" in printed
    rows = read_csv(tmp_path / "eval" / "run" / "eval_log.csv")
    assert len(rows) == 1 and int(rows[0]["stage"]) == 2
    # the save folder stands for its newest checkpoint, as for coconut-eval
    again = run(tiny(tmp_path / "eval2", init_from=str(ckpt.parent), only_eval=True, eval_stage=2))
    assert again["evals"][0]["accuracy"] == out["evals"][0]["accuracy"]
    assert last_samples(capsys.readouterr().err) == samples
    empty = tmp_path / "empty_save"
    empty.mkdir()
    (empty / "run.json").write_text('{"run_id": "x"}')
    with pytest.raises(CheckpointError, match="init_from.*without a complete checkpoint"):
        run(tiny(tmp_path / "eval3", init_from=str(empty), only_eval=True))


def test_marker_init_copies_a_token_row_into_the_marker_rows(tmp_path):
    """marker_init: at init_from, the <bot>, <eot>, <latent> embedding rows become the token's; the untied LM head
    and every other row stay the checkpoint's; a resumed run keeps its own rows; bad values are refused."""
    from coconut_kernels.training.build import build_lm, build_tokenizer

    model = dict(TINY_MODEL, family="llama", d_ff=64)
    ckpt = run(tiny(tmp_path / "cot", method="cot", num_epochs=1, eval_every=0, model=model))["checkpoint"]
    plain = tiny(tmp_path / "a", init_from=str(ckpt), model=None)
    tok = build_tokenizer(plain, [], None)
    base = build_lm(plain, tok, None)
    lm = build_lm(tiny(tmp_path / "b", init_from=str(ckpt), model=None, marker_init="\n"), tok, None)
    nl = tok.encode("\n")[0]
    E0, E = base.model.embed_tokens.weight, lm.model.embed_tokens.weight
    markers = [lm.start_latent_id, lm.end_latent_id, lm.latent_token_id]
    assert not torch.equal(E0[markers[0]], E0[nl])
    for m in markers:
        assert torch.equal(E[m], E0[nl])
    others = [i for i in range(E.shape[0]) if i not in markers]
    assert torch.equal(E[others], E0[others])
    assert torch.equal(lm.model.lm_head_weight, base.model.lm_head_weight)
    resumed = build_lm(tiny(tmp_path / "c", init_from=str(ckpt), model=None, marker_init="\n"), tok, ckpt)
    assert torch.equal(resumed.model.embed_tokens.weight, E0)
    with pytest.raises(ValueError, match="'marker_init': expected the text of one token"):
        build_lm(tiny(tmp_path / "d", init_from=str(ckpt), model=None, marker_init="Tom is"), tok, None)
    with pytest.raises(ValueError, match="'marker_init': sets marker rows of init_from"):
        tiny(tmp_path / "e", marker_init="\n")
    with pytest.raises(ValueError, match="'marker_init': expected None or a token"):
        tiny(tmp_path / "f", init_from=str(ckpt), model=None, marker_init="")


def test_feedback_grad_scale_reaches_the_forward(tmp_path):
    """feedback_grad_scale: the loss of the first step (stage 1: one thought per example) is the unscaled run's,
    its gradient norm is not; the key is checked."""
    rows = {}
    for s in (1.0, 0.25):
        save = tmp_path / f"s{s}"
        run(tiny(save, start_epoch=2, num_epochs=3, max_latent_stage=2, c_thought=2, eval_every=0,
                 feedback_grad_scale=s))
        rows[s] = read_csv(save / "run" / "train_log.csv")[0]
    assert rows[1.0]["stage"] == "2" and rows[1.0]["loss"] == rows[0.25]["loss"]
    assert rows[1.0]["grad_norm"] != rows[0.25]["grad_norm"]
    with pytest.raises(ValueError, match="'feedback_grad_scale': expected a number in \\[0, 1\\]"):
        tiny(tmp_path, feedback_grad_scale=2.0)


def make_hf_folder(folder: Path, records: list[dict]) -> int:
    """A small random-weight Hugging Face GPT-2 folder (config.json, model.safetensors, a word-level
    tokenizer.json covering `records`); returns its vocabulary size."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    words = sorted({w for r in records for t in [r["question"], r["answer"], *r["steps"]]
                    for w in t.replace(".", " . ").replace("?", " ? ").split()})
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", "\n", "#", "###", *words])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=32,
                                                              n_layer=2, n_head=2))
    hf.save_pretrained(str(folder))
    return len(vocab)


def test_init_from_a_hugging_face_folder_adds_the_latent_markers(tmp_path):
    records = generate_dataset(10, seed=5)
    folder = tmp_path / "hf"
    n_vocab = make_hf_folder(folder, records)
    data = tmp_path / "train.json"
    save_records(records, data)
    out = run(tiny(tmp_path, init_from=str(folder), train_path=str(data), num_epochs=1, max_new_tokens=4))
    assert len(out["losses"]) == 3
    saved = json.loads((out["checkpoint"] / "model_config.json").read_text())
    assert saved["vocab_size"] == n_vocab + 3
    # the official recipe: the checkpoint's dropout (transformers' GPT-2 default, 0.1 everywhere) in training
    assert (saved["embd_pdrop"], saved["resid_pdrop"], saved["attn_pdrop"]) == (0.1, 0.1, 0.1)


def test_dropout_key_overrides_the_checkpoints(tmp_path):
    from coconut_kernels.training import TrainConfig
    from coconut_kernels.training.build import build_lm, build_tokenizer

    records = generate_dataset(4, seed=5)
    folder = tmp_path / "hf"
    make_hf_folder(folder, records)
    for dropout, want in ((None, 0.1), (0.0, 0.0), (0.25, 0.25)):
        cfg = TrainConfig(init_from=str(folder), dropout=dropout)
        lm = build_lm(cfg, build_tokenizer(cfg, records, None), None)
        c = lm.model.config
        assert (c.embd_pdrop, c.resid_pdrop, c.attn_pdrop) == (want, want, want), dropout
    with pytest.raises(ValueError, match="config key 'dropout'"):
        TrainConfig(model=TINY_MODEL, dropout=1.0)


def test_dropout_seeds_depend_on_the_run_seed_and_position_only():
    from coconut_kernels.training.loop import dropout_seed

    seeds = {dropout_seed(s, e, b, r) for s in (0, 1) for e in (0, 1) for b in (0, 1, 2) for r in (0, 1)}
    assert len(seeds) == 24 and all(0 <= x < 2 ** 63 for x in seeds)
    assert dropout_seed(3, 1, 2, 0) == dropout_seed(3, 1, 2, 0)


# ---------------------------------------------------------------------------------------------------------
# Configuration and bad input


MODEL_FLAG = ["--model", json.dumps(TINY_MODEL)]


def _error_of(argv, capsys) -> str:
    assert main([*MODEL_FLAG, *argv]) == 2
    return capsys.readouterr().err


def test_yaml_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: cot\nlr: 0.001\nmodel: {family: gpt2, n_layer: 3, d_model: 32, n_head: 2}\n")
    cfg = parse_args([str(path), "--lr", "3e-4", "--model", "{n_layer: 1}", "--val_path", "null"])
    assert cfg.method == "cot" and cfg.lr == 3e-4 and cfg.val_path is None
    assert cfg.model == {"family": "gpt2", "n_layer": 1, "d_model": 32, "n_head": 2}


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in ("--c_thought", "--epochs_per_stage", "--max_latent_stage", "--pad_latent_to_max", "--uniform_prob",
                "--reset_optimizer", "--grad_accum_steps", "--bf16", "--feedback", "--init_from", "--only_eval",
                "--resume", "--dist"):
        assert key in text


def test_unknown_config_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("method: coconut\nlearning_rate: 0.001\n")
    err = _error_of([str(path)], capsys)
    assert "'learning_rate' does not exist" in err and str(path) in err
    with pytest.raises(ValueError, match="'epochs_per_stag' does not exist.*did you mean 'epochs_per_stage'"):
        load_config(None, {"epochs_per_stag": 2})
    with pytest.raises(SystemExit):
        parse_args(["--no_such_flag", "1"])
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"model\.n_layers do not exist"):
        run(tiny(tmp_path, model={"family": "gpt2", "n_layers": 2}))


@pytest.mark.parametrize("key,value,match", [
    ("lr", "fast", "'lr': expected float"),
    ("batch_size", True, "'batch_size': expected int"),
    ("method", "coconuts", "'method': expected one of"),
    ("feedback", "echo", "'feedback': expected one of"),
    ("c_thought", 0, "c_thought"),
    ("uniform_prob", 1.5, "uniform_prob"),
    ("dist", "horovod", "'dist': expected one of"),
    ("latent_schedule", "parallel", "'latent_schedule': expected one of"),
    ("jacobi_iters", 0, "'jacobi_iters': expected an int >= 1"),
    ("generate_size", "huge", "'generate_size': expected one of"),
    ("generate_render", "graph", "'generate_render': expected one of"),
    ("generate_chain", "up", "'generate_chain': expected one of"),
    ("generate_chain", "backward", "'generate_chain': 'backward' needs generate_render 'edges', got 'text'"),
])
def test_bad_config_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, {key: value})


@pytest.mark.parametrize("records,match", [
    ([{"question": "q", "steps": ["a"]}], "record 0: missing field 'answer'"),
    ([{"question": "q", "steps": ["a"], "answer": "x"}, {"question": "q", "steps": "a b", "answer": "x"}],
     "record 1: field 'steps' must be a list"),
    ([{"question": 3, "steps": [], "answer": "x"}], "record 0: field 'question' must be a string"),
    ({"question": "q"}, "expected a JSON list"),
])
def test_malformed_records(tmp_path, capsys, records, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    err = _error_of(["--train_path", str(path), "--save_dir", str(tmp_path / "run"), "--progress", "false"], capsys)
    assert match in err and str(path) in err


def test_unreadable_data_files(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('[{"question": "q", ')
    assert "not valid JSON" in _error_of(["--train_path", str(path)], capsys)
    assert "data file" in _error_of(["--train_path", str(tmp_path / "none.json")], capsys)
    missing = str(tmp_path / "none_val.json")
    assert missing in _error_of(["--val_path", missing, "--generate_train", "2"], capsys)


def test_stage_past_the_data_steps(tmp_path):
    records = generate_dataset(6, seed=1)
    for r in records:
        r["steps"] = r["steps"][:2]
    path = tmp_path / "short.json"
    save_records(records, path)
    with pytest.raises(ValueError, match=r"'max_latent_stage': stage 4 is past the data's steps.* 2 reasoning steps"):
        run(tiny(tmp_path, train_path=str(path), max_latent_stage=4))
    with pytest.raises(ValueError, match=r"'eval_stage': stage 9 is past the data's steps"):
        run(tiny(tmp_path, eval_stage=9, only_eval=True))


def test_record_longer_than_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"training record \d+: \d+ tokens at stage \d, more than the model's "
                                         r"max_position 64"):
        run(tiny(tmp_path, model={**TINY_MODEL, "max_position": 64}))


def test_unreadable_checkpoints(tmp_path):
    ckpt = run(tiny(tmp_path, num_epochs=1, eval_every=0))["checkpoint"]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=f"{weights}: unreadable checkpoint weights"):
        run(tiny(tmp_path, num_epochs=1, eval_every=0, resume=True))
    (ckpt / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="trainer_state.pt: unreadable trainer state"):
        run(tiny(tmp_path, num_epochs=1, eval_every=0, resume=True))
    with pytest.raises(ValueError, match="checkpoint folder .*nowhere not found"):
        run(tiny(tmp_path, resume=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="no checkpoint in save_dir"):
        run(tiny(tmp_path / "empty", resume=True))


# ---------------------------------------------------------------------------------------------------------
# Distributed: two gloo processes on the CPU, launched by torchrun


def _torchrun(tmp_path, *flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "coconut_kernels.train", "--generate_train", "16", "--generate_val", "6", "--data_seed", "3",
           "--model", json.dumps(TINY_MODEL), "--max_latent_stage", "1", "--num_epochs", "2", "--lr", "3e-3",
           "--batch_size", "4", "--eval_batch_size", "4", "--max_new_tokens", "12", "--progress", "false",
           "--tensorboard", "false", "--save_dir", str(tmp_path / "run"), *flags]
    # its own session, so that a timeout kills the workers too, not only torchrun's agent
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {flags} did not finish in 300 s; its stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_process_gloo_ddp_and_fsdp(tmp_path, capsys):
    curves = {}
    for mode in ("ddp", "fsdp"):
        proc = _torchrun(tmp_path / mode, "--dist", mode)
        assert proc.returncode == 0, proc.stderr[-3000:]
        save = tmp_path / mode / "run"
        rows = read_csv(save / "train_log.csv")
        assert len(rows) == 4  # 16 records / 2 ranks / batch 4 = 2 steps per epoch, written once (rank 0)
        assert sum(int(r["tokens"]) for r in rows[:2]) > 0
        curves[mode] = [float(r["loss"]) for r in rows]
        evals = read_csv(save / "eval_log.csv")
        assert [int(r["n"]) for r in evals] == [6, 6]  # both ranks' shares of the split, summed
        assert sorted(p.name for p in save.glob("step-*")) == ["step-000002", "step-000004"]
        assert proc.stdout.count("accuracy") == 1  # one table, from rank 0
        # the checkpoint is a whole model that one process evaluates to the same figures and the same output for
        # the first problem (rank 0 evaluated problems 0, 2, 4; the figures are the same for any weights this small)
        capsys.readouterr()
        out = run(tiny(tmp_path / mode / "eval", init_from=str(save / "step-000004"), generate_val=6,
                       only_eval=True, max_latent_stage=1, max_new_tokens=12, eval_batch_size=4))
        assert out["evals"][0]["accuracy"] == pytest.approx(float(evals[-1]["accuracy"]))
        assert out["evals"][0]["mean_new_tokens"] == pytest.approx(float(evals[-1]["mean_new_tokens"]))
        assert last_samples(capsys.readouterr().err)[0] == last_samples(proc.stderr)[0]
    assert curves["ddp"][-1] < curves["ddp"][0]
    # FSDP (sharded gradients and optimizer state) takes the same steps as DDP
    torch.testing.assert_close(torch.tensor(curves["fsdp"]), torch.tensor(curves["ddp"]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The official recipe is the default; every deviation is a named key


def test_defaults_are_the_official_recipe(tmp_path):
    cfg = TrainConfig(model=TINY_MODEL)
    assert cfg.max_grad_norm is None and cfg.weight_decay_scope == "all" and cfg.compute_precision == "fp32"
    assert cfg.reset_optimizer and cfg.reset_optimizer_every == "epoch" and cfg.lr == 1e-4
    with pytest.raises(ValueError, match="no model to train: set init_from .* or model to a fresh random one"):
        TrainConfig()
    assert TrainConfig(bf16=True, model=TINY_MODEL).compute_precision == "bf16"
    assert TrainConfig(precision="bf16-autocast", model=TINY_MODEL).compute_precision == "bf16-autocast"
    with pytest.raises(ValueError, match="'bf16' and 'precision'"):
        TrainConfig(bf16=True, precision="bf16-autocast", model=TINY_MODEL)
    with pytest.raises(ValueError, match="'precision': expected one of"):
        TrainConfig(precision="fp16", model=TINY_MODEL)


def test_weight_decay_scope_and_betas():
    from coconut_kernels.latent import LatentLM
    from coconut_kernels.models import GPT2, GPT2Config
    from coconut_kernels.training.build import make_optimizer

    lm = LatentLM(GPT2(GPT2Config(vocab_size=40, n_layer=1, n_head=2, d_model=8, max_position=16)), 37, 38, 39, 0)
    n_params = len(list(lm.parameters()))
    biases = [p for p in lm.parameters() if p.ndim < 2]
    assert biases
    opt = make_optimizer(TrainConfig(model=TINY_MODEL, weight_decay=0.1), lm)  # official: one group, all decayed
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(n_params, 0.1)]
    opt = make_optimizer(TrainConfig(model=TINY_MODEL, weight_decay=0.1, weight_decay_scope="matrices"), lm)
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [
        (n_params - len(biases), 0.1), (len(biases), 0.0)]
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)  # torch's default, as run.py
    for scope in ("all", "matrices"):
        opt = make_optimizer(TrainConfig(model=TINY_MODEL, weight_decay_scope=scope, adam_betas=[0.9, 0.95]), lm)
        assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    for bad in ([0.9], [0.9, 1.0], [-0.1, 0.9], [True, 0.9]):
        with pytest.raises(ValueError, match="'adam_betas': expected two numbers in \\[0, 1\\)"):
            TrainConfig(model=TINY_MODEL, adam_betas=bad)


def test_bf16_casts_the_whole_model(tmp_path):
    out = run(tiny(tmp_path, bf16=True, num_epochs=1, eval_every=0, lr=1e-2))
    from safetensors.torch import load_file

    weights = load_file(str(out["checkpoint"] / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values() if t.is_floating_point())
    losses = [loss for _, loss in out["losses"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_reset_optimizer_every_epoch_or_stage(tmp_path):
    # two epochs at stage 0: the official reset restarts AdamW at epoch 1, the per-stage one does not
    kw = dict(num_epochs=2, epochs_per_stage=2, eval_every=0, warmup_steps=0)
    every_epoch = [x for _, x in run(tiny(tmp_path / "e", **kw))["losses"]]
    every_stage = [x for _, x in run(tiny(tmp_path / "s", reset_optimizer_every="stage", **kw))["losses"]]
    assert every_epoch[:4] == every_stage[:4]  # epoch 0 and the first step of epoch 1 (same weights)
    assert every_epoch[4:] != every_stage[4:]


def test_generate_size_reaches_both_splits():
    from coconut_kernels.training.data import load_data
    cfg = load_config(None, {"generate_train": 5, "generate_val": 3, "data_seed": 4, "generate_size": "small",
                             "model": TINY_MODEL})
    train, val, source = load_data(cfg)
    assert train == generate_dataset(5, seed=4, size="small") and val == generate_dataset(3, seed=5, size="small")
    assert source == "generated (3 small problems, text render, forward chain, seed 5)"
    cfg = load_config(None, {"generate_train": 2, "generate_val": 2, "generate_render": "edges", "model": TINY_MODEL})
    train, val, source = load_data(cfg)
    assert train == generate_dataset(2, seed=0, render="edges") and val == generate_dataset(2, seed=1, render="edges")
    assert source == "generated (2 prosqa problems, edges render, forward chain, seed 1)"
    cfg = load_config(None, {"generate_train": 2, "generate_val": 2, "generate_render": "edges",
                             "generate_chain": "backward", "model": TINY_MODEL})
    train, val, source = load_data(cfg)
    assert train == generate_dataset(2, seed=0, render="edges", chain="backward") != \
        generate_dataset(2, seed=0, render="edges")
    assert val == generate_dataset(2, seed=1, render="edges", chain="backward")
    assert source == "generated (2 prosqa problems, edges render, backward chain, seed 1)"


def test_a_failed_rank_leaves_its_peer_a_clean_exit(tmp_path):
    """One rank raising inside the process group: the other passes the closing barrier with a line naming the
    failed rank and exits 0 (torchrun reports the failed one), rather than a second traceback or a hang."""
    script = tmp_path / "fail.py"
    script.write_text("import os, torch\n"
                      "from coconut_kernels.training.distributed import process_group\n"
                      "with process_group(2, torch.device('cpu')):\n"
                      "    if int(os.environ['RANK']) == 1:\n"
                      "        raise SystemExit(3)\n"
                      "print('rank 0 done', flush=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "rank 0 done" in proc.stdout
    assert "[dist] rank 0: the closing barrier failed" in proc.stderr and "Rank 1 failed" in proc.stderr
    assert "exitcode  : 3" in proc.stderr
