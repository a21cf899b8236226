"""Tests of the official code's files (`coconut_kernels.interop.official`): its run configs read with
run.py's meaning, a run of one stage from such a file on a tiny model, and its `checkpoint_N` files (the
`Coconut` wrapper's state dict or the bare model's) loaded for evaluation, generation and more training.

When the official repository is given (``COCONUT_OFFICIAL``: a checkout or its git directory), every file of
its ``args/`` is mapped and its `Coconut` class writes a checkpoint; otherwise those tests skip and the
checkpoint is built as the class builds it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from coconut_kernels import CheckpointError, ConfigError
from coconut_kernels.data import generate_dataset, save_records
from coconut_kernels.interop.official import (
    OFFICIAL_KEYS,
    load_official_checkpoint,
    official_config,
    read_official_checkpoint,
)
from coconut_kernels.train import main
from coconut_kernels.training import read_csv

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
_OFFICIAL = os.environ.get("COCONUT_OFFICIAL")


def _git(*args) -> str | None:
    out = subprocess.run(["git", f"--git-dir={_OFFICIAL}", *args], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def official_file(name: str) -> str | None:
    """A file of the official repository (a checkout or a bare git directory), None when not given."""
    if _OFFICIAL is None:
        return None
    if (Path(_OFFICIAL) / name).is_file():
        return (Path(_OFFICIAL) / name).read_text()
    return _git("show", f"HEAD:{name}") if (Path(_OFFICIAL) / "HEAD").is_file() else None


def official_args() -> list[str]:
    if _OFFICIAL is None:
        return []
    if (Path(_OFFICIAL) / "args").is_dir():
        return sorted(f"args/{p.name}" for p in (Path(_OFFICIAL) / "args").glob("*.yaml"))
    return sorted((_git("ls-tree", "--name-only", "HEAD", "args/") or "").split())


def official_yaml(**changes) -> dict:
    """run.py's keys with the values of its ProsQA coconut run, changed as asked."""
    base = dict(project="coconut", save_path="runs", name="prosqa-coconut", only_eval=False, coconut=True, cot=False,
                no_thoughts=False, no_cot=False, c_thought=1, epochs_per_stage=5, max_latent_stage=6,
                pad_latent_to_max=True, save_only_improve=False, uniform_prob=0.0, model_id="gpt2",
                load_model_path="None", seed=0, resume=0, bf16=False, train_path="data/prosqa_train.json",
                val_path="data/prosqa_valid.json", reset_optimizer=True, batch_size_training=32, debug=False,
                gradient_accumulation_steps=1, num_epochs=50, lr=1e-4, weight_decay=0.01)
    assert set(base) == set(OFFICIAL_KEYS)
    base.update(changes)
    return base


def word_folder(folder: Path, records: list[dict], family: str = "gpt2", seed: int = 0) -> Path:
    """A Hugging Face folder with a word-level tokenizer.json of the records (and `<<`) and random small
    weights."""
    from tokenizers import models, pre_tokenizers

    words = sorted({w for r in records for t in [r["question"], r["answer"], *r["steps"]]
                    for w in t.replace(".", " . ").replace("?", " ? ").split()})
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", "\n", "#", "###", "<<", *words])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    torch.manual_seed(seed)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=32,
                                                                  n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=5e5,
            bos_token_id=0,            eos_token_id=0, pad_token_id=0))
    hf.save_pretrained(str(folder))
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def records():
    return generate_dataset(12, seed=5)


@pytest.fixture(scope="module")
def gpt2_words(tmp_path_factory, records) -> Path:
    return word_folder(tmp_path_factory.mktemp("hf") / "gpt2", records)


# ---------------------------------------------------------------------------------------------------------
# Run configs


@pytest.mark.parametrize("name", official_args() or [pytest.param("args/", marks=pytest.mark.skip(
    reason="the official repository is not on this machine (COCONUT_OFFICIAL)"))])
def test_every_official_args_file_maps(name, tmp_path, capsys):
    data = yaml.safe_load(official_file(name))
    path = tmp_path / Path(name).name
    path.write_text(official_file(name))
    # model_id is a hub id there: point it at a local folder as the error message says to
    cfg = official_config(path, {"init_from": str(tmp_path)})
    assert cfg.save_dir == os.path.join(data["save_path"], data["name"])
    assert cfg.batch_size == data["batch_size_training"] and cfg.grad_accum_steps == data["gradient_accumulation_steps"]
    assert (cfg.lr, cfg.weight_decay, cfg.num_epochs, cfg.seed) == (data["lr"], data["weight_decay"],
                                                                     data["num_epochs"], data["seed"])
    assert cfg.method == ("cot" if data["cot"] else "coconut")
    assert cfg.max_grad_norm is None and cfg.lr_schedule == "constant" and cfg.warmup_steps == 0
    assert cfg.max_new_tokens == (64 if "gsm" in data["val_path"] else 128)
    assert cfg.load_model_path == (None if data["load_model_path"] == "None" else data["load_model_path"])
    assert cfg.save_only_improve == data["save_only_improve"]
    if data["only_eval"]:
        assert cfg.only_eval and cfg.eval_stage == min(data["resume"] // data["epochs_per_stage"],
                                                       data["max_latent_stage"])
    else:
        assert cfg.start_epoch == data["resume"]
    err = capsys.readouterr().err
    assert err.count("['project', 'debug'] have no meaning here") == 1


def test_official_keys_and_methods(tmp_path, capsys):
    path = tmp_path / "a.yaml"
    for flags, method in [({}, "coconut"), ({"coconut": False, "cot": True}, "cot"),
                          ({"coconut": False, "no_cot": True}, "no_cot"), ({"no_thoughts": True}, "no_thoughts"),
                          ({"coconut": False}, "pause_as_thought")]:
        path.write_text(yaml.safe_dump(official_yaml(**flags)))
        assert official_config(path, {"init_from": str(tmp_path)}).method == method
    path.write_text(yaml.safe_dump(official_yaml(only_eval=True, resume=40, debug=True, wandb_entity="me")))
    cfg = official_config(path, {"init_from": str(tmp_path)})
    assert cfg.eval_stage == 6 and cfg.max_train_records == 5000 and cfg.max_val_records == 32
    err = capsys.readouterr().err
    assert "['wandb_entity'] are not read by run.py" in err and "debug: true" in err


@pytest.mark.parametrize("key,value,match", [
    ("c_thought", "two", "key 'c_thought' must be int, got str 'two'"),
    ("coconut", 1, "key 'coconut' must be bool, got int 1"),
    ("lr", "fast", "key 'lr' must be int or float, got str 'fast'"),
    ("batch_size_training", True, "key 'batch_size_training' must be int, got bool True"),
])
def test_official_key_with_a_wrong_type(tmp_path, key, value, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(official_yaml(**{key: value})))
    with pytest.raises(ConfigError, match=f"official config {path}: {match}"):
        official_config(path, {"init_from": str(tmp_path)})


def test_model_id_not_local(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(official_yaml(model_id="no-such-org/no-such-model")))
    with pytest.raises(ConfigError, match="key 'model_id': 'no-such-org/no-such-model' is neither a local folder"):
        official_config(path)


def test_official_yaml_runs_one_stage(tmp_path, records, gpt2_words, capsys):
    """coconut-train --official on a file of run.py's keys: one epoch of stage 1 (resume: 1, as run.py
    skips epochs), a tiny GPT-2, then evaluation with the official metrics."""
    data = tmp_path / "train.json"
    save_records(records, data)
    path = tmp_path / "prosqa_tiny.yaml"
    path.write_text(yaml.safe_dump(official_yaml(
        save_path=str(tmp_path), name="run", model_id=str(gpt2_words), train_path=str(data), val_path=str(data),
        epochs_per_stage=1, max_latent_stage=2, num_epochs=2, resume=1, batch_size_training=4, lr=1e-3)))
    assert main(["--official", str(path), "--progress", "false", "--tensorboard", "false",
                 "--max_val_records", "4", "--max_new_tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "have no meaning here" in err and "'project'" in err
    rows = read_csv(tmp_path / "run" / "train_log.csv")
    assert len(rows) == 3 and {int(r["stage"]) for r in rows} == {1}  # 12 records / 4: epoch 1 only
    assert [int(r["stage"]) for r in read_csv(tmp_path / "run" / "eval_log.csv")] == [1]


def test_official_resumes_only_its_own_run(tmp_path, records, gpt2_words, capsys):
    """run.py's preemption rule under --official: a save folder holding checkpoints is resumed (its
    `resume: N` ignored), but only by the same run: another run config's launch into it is refused and
    leaves the folder as it was."""
    data = tmp_path / "train.json"
    save_records(records, data)
    keys = dict(save_path=str(tmp_path), name="run", model_id=str(gpt2_words), train_path=str(data),
                val_path=str(data), epochs_per_stage=1, max_latent_stage=2, num_epochs=3, resume=1,
                batch_size_training=4, lr=1e-3)
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(official_yaml(**keys)))
    flags = ["--progress", "false", "--tensorboard", "false", "--max_val_records", "4", "--max_new_tokens", "8"]
    assert main(["--official", str(path), *flags, "--max_steps", "3"]) == 0  # epoch 1, then "preempted"
    run_dir = tmp_path / "run"
    assert [int(r["epoch"]) for r in read_csv(run_dir / "train_log.csv")] == [1, 1, 1]
    other = tmp_path / "b.yaml"
    other.write_text(yaml.safe_dump(official_yaml(**{**keys, "lr": 1e-4})))
    before = sorted(p.name for p in run_dir.iterdir())
    capsys.readouterr()
    assert main(["--official", str(other), *flags]) == 2
    err = capsys.readouterr().err
    assert "coconut-train: error: config key 'lr': resuming" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert main(["--official", str(path), *flags]) == 0
    assert "found checkpoints in" in capsys.readouterr().err
    rows = read_csv(run_dir / "train_log.csv")
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]


# ---------------------------------------------------------------------------------------------------------
# checkpoint_N


def _hf(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def _grown_hf(folder: Path):
    """What run.py trains: the model with the markers added by transformers' tokenizer, rows from `<<`."""
    from coconut_kernels import add_latent_tokens

    hf = _hf(folder)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>")
    ids = add_latent_tokens(hf, tok)
    return hf, ids


def _wrapper_state(hf, ids) -> dict:
    """The state dict of the official Coconut(base_causallm) wrapper: the official class when its code is
    here, else its keys built by hand (the wrapper registers the input embedding a second time)."""
    source = official_file("coconut.py")
    if source is not None:
        mod = type(sys)("official_coconut")
        exec(compile(source, "coconut.py", "exec"), mod.__dict__)
        wrapper = mod.Coconut(hf, ids.latent_token_id, ids.start_latent_id, ids.end_latent_id, 0)
        return {k: v.clone() for k, v in wrapper.state_dict().items()}
    state = {f"base_causallm.{k}": v.clone() for k, v in hf.state_dict().items()}
    state["embedding.weight"] = hf.get_input_embeddings().weight.clone()
    return state


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_official_checkpoint_loads_with_equal_logits(tmp_path, records, family):
    folder = word_folder(tmp_path / "base", records, family=family)
    hf, ids = _grown_hf(folder)
    with torch.no_grad():  # a trained checkpoint differs from the base model
        for p in hf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = _wrapper_state(hf, ids)
    assert any(k.startswith("base_causallm.") for k in state) and "embedding.weight" in state
    ckpt = tmp_path / "checkpoint_5"
    torch.save(state, ckpt)
    lm = load_official_checkpoint(ckpt, folder)
    assert lm.latent_ids == ids
    x = torch.randint(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = hf(x).logits
        ours = lm.model(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # generation and a training step on the loaded model
    prompt = torch.tensor([[5, 6, 7, ids.start_latent_id, ids.latent_token_id, ids.end_latent_id]])
    out = lm.generate(prompt, max_new_tokens=3)
    assert int(out.n_latents[0]) == 1
    labels = torch.tensor([[-100] * 6 + [8, 9]])
    loss = lm(torch.cat([prompt, torch.tensor([[8, 9]])], 1), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and lm.model.embed_tokens.weight.grad is not None


def test_bare_model_checkpoint_before_the_markers(tmp_path, records, gpt2_words):
    """A CoT run's checkpoint (the bare model, the base vocabulary): the base rows load and the markers
    get the loaded row of `<<`, as run.py initialises them after loading."""
    hf = _hf(gpt2_words)
    with torch.no_grad():
        hf.transformer.wte.weight.mul_(2.0)
    ckpt = tmp_path / "checkpoint_3"
    torch.save(hf.state_dict(), ckpt)
    lm = load_official_checkpoint(ckpt, gpt2_words)
    w = lm.model.embed_tokens.weight
    lt = lm.tokenizer._tok.token_to_id("<<")
    torch.testing.assert_close(w[: hf.config.vocab_size], hf.transformer.wte.weight, rtol=0, atol=0)
    for i in lm.latent_ids:
        torch.testing.assert_close(w[i], hf.transformer.wte.weight[lt], rtol=0, atol=0)


def test_continued_training_from_an_official_checkpoint(tmp_path, records, gpt2_words):
    hf, ids = _grown_hf(gpt2_words)
    ckpt = tmp_path / "checkpoint_1"
    torch.save(_wrapper_state(hf, ids), ckpt)
    data = tmp_path / "train.json"
    save_records(records, data)
    assert main([f"--init_from={gpt2_words}", f"--load_model_path={ckpt}", f"--train_path={data}",
                 f"--val_path={data}", "--max_val_records=2", "--num_epochs=1", "--batch_size=6",
                 "--max_latent_stage=2", "--max_new_tokens=4", "--progress=false", "--tensorboard=false",
                 f"--save_dir={tmp_path / 'run'}"]) == 0
    rows = read_csv(tmp_path / "run" / "train_log.csv")
    assert len(rows) == 2 and all(float(r["loss"]) > 0 for r in rows)


def test_bad_checkpoints(tmp_path, gpt2_words):
    hf = _hf(gpt2_words)
    pickled = tmp_path / "checkpoint_pickle"
    torch.save({"model": hf.state_dict(), "args": argparse_namespace()}, pickled)
    with pytest.raises(CheckpointError,
                       match=f"{pickled}: holds an object of type argparse.Namespace; reading it would run pickle"):
        read_official_checkpoint(pickled)
    small = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=hf.config.vocab_size, n_positions=512,
                                                                 n_embd=16, n_layer=2, n_head=2))
    mismatch = tmp_path / "checkpoint_small"
    torch.save({f"base_causallm.{k}": v for k, v in small.state_dict().items()}, mismatch)
    V = hf.config.vocab_size
    with pytest.raises(CheckpointError, match=f"{mismatch}: key 'transformer.wte.weight' has shape "
                                              f"\\({V}, 16\\), the model needs \\({V + 3}, 32\\)"):
        load_official_checkpoint(mismatch, gpt2_words)
    missing = tmp_path / "checkpoint_missing"
    torch.save({k: v for k, v in hf.state_dict().items() if "h.1." not in k}, missing)
    with pytest.raises(CheckpointError, match="lacks tensors required by GPT2"):
        load_official_checkpoint(missing, gpt2_words)
    with pytest.raises(CheckpointError, match="official checkpoint not found"):
        read_official_checkpoint(tmp_path / "nope")


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1e-4)


def test_stages_past_max_latent_stage_lay_the_data_out_as_run_py(records):
    """run.py's stage is epoch // epochs_per_stage, uncapped: past max_latent_stage every step is replaced
    (max_latent_stage latents with pad_latent_to_max), which stage max_latent_stage + 1 gives."""
    from coconut_kernels.data import WordTokenizer, build_example, tokenize_records
    from coconut_kernels.training import TrainConfig

    cfg = TrainConfig(max_latent_stage=2, epochs_per_stage=1, num_epochs=9, model={"family": "gpt2"})
    assert [cfg.stage_of_epoch(e) for e in range(6)] == [0, 1, 2, 3, 3, 3]
    tok = WordTokenizer.from_records(records)
    rec = max(tokenize_records(records, tok), key=lambda r: len(r.steps))
    assert len(rec.steps) > 3
    ex = build_example(rec, cfg.stage_of_epoch(8), cfg.stage_config(), tok)
    assert ex.n_latents == 2 and ex.input_ids == rec.question + [tok.bot_id, tok.latent_id, tok.latent_id,
                                                                  tok.eot_id] + rec.answer


def test_start_epoch_past_the_run_is_an_error():
    from coconut_kernels.errors import ConfigError
    from coconut_kernels.training import TrainConfig

    with pytest.raises(ConfigError, match=r"config key 'start_epoch': expected < num_epochs \(3\), got 3"):
        TrainConfig(start_epoch=3, num_epochs=3, model={"family": "gpt2"})
    assert TrainConfig(start_epoch=2, num_epochs=3, model={"family": "gpt2"}).start_epoch == 2


def test_save_only_improve_saves_as_run_py(tmp_path):
    """run.py saves when the accuracy beats the best so far, which starts at 0: a model that never answers
    right writes no checkpoint."""
    from coconut_kernels.train import run
    from coconut_kernels.training import TrainConfig

    cfg = TrainConfig(generate_train=8, generate_val=2, model={"family": "gpt2", "n_layer": 1, "n_head": 2,
                                                               "d_model": 16, "max_position": 512},
                      max_latent_stage=1, num_epochs=2, batch_size=8, max_new_tokens=2, save_only_improve=True,
                      progress=False, tensorboard=False, save_dir=str(tmp_path / "run"))
    out = run(cfg)
    assert [e["accuracy"] for e in out["evals"]] == [0.0, 0.0]
    assert out["checkpoint"] is None and not list((tmp_path / "run").glob("step-*"))
