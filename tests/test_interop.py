"""Tests of the latent markers (`coconut_kernels.add_latent_tokens`, `LatentLM.from_pretrained` without ids)
and of the README Quick start, run as written on a GPT-2-shaped folder: GPT-2's vocabulary size (50257, a
byte-level BPE with `<<` as one token and <|endoftext|> last) and its tokenizer files, random small weights.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch

import coconut_kernels as ck
from coconut_kernels import CoconutError, LatentLM, add_latent_tokens
from coconut_kernels.data import END_LATENT, LATENT, START_LATENT
from coconut_kernels.models import GPT2, GPT2Config, Llama, LlamaConfig

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
GPT2_VOCAB = 50257


def gpt2_tokenizer_files(folder: Path, *, tokenizer_json: bool = True) -> None:
    """GPT-2's tokenizer files for a synthetic byte-level BPE of GPT-2's size: the 256 byte symbols, 50000
    two-symbol merges (`<<` among them, as in GPT-2) and <|endoftext|> = 50256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [("<", "<")] + [(a, b) for a in alphabet for b in alphabet if (a, b) != ("<", "<")]
    pairs = pairs[: GPT2_VOCAB - 1 - len(alphabet)]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in pairs:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == GPT2_VOCAB
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "model_max_length": 1024, "add_prefix_space": False}))
    if tokenizer_json:
        tok = Tokenizer(models.BPE(vocab, pairs))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        tok.save(str(folder / "tokenizer.json"))


def gpt2_folder(folder: Path, *, n_embd: int = 32, n_layer: int = 2, n_positions: int = 256, seed: int = 0,
                tokenizer_json=True) -> Path:
    """A stock-GPT-2-shaped checkpoint folder with random weights (what save_pretrained writes)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=GPT2_VOCAB, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                  n_head=2, bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    gpt2_tokenizer_files(folder, tokenizer_json=tokenizer_json)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return gpt2_folder(tmp_path_factory.mktemp("hf") / "gpt2")


def quick_start_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


# ---------------------------------------------------------------------------------------------------------
# The README


def test_readme_quick_start_runs_as_written(gpt2_dir, tmp_path, monkeypatch, capsys):
    code = quick_start_code()
    assert 'LatentLM.from_pretrained("models/gpt2")' in code
    (tmp_path / "models").mkdir()
    os.symlink(gpt2_dir, tmp_path / "models" / "gpt2")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md Quick start", "exec"), scope)
    printed = capsys.readouterr().out
    assert "LatentIds(start_latent_id=50257, end_latent_id=50258, latent_token_id=50259)" in printed
    lm = scope["lm"]
    assert lm.model.embed_tokens.weight.grad is not None and torch.isfinite(scope["out"].loss)
    assert int(scope["gen"].n_latents[0]) == 2


# ---------------------------------------------------------------------------------------------------------
# add_latent_tokens and LatentLM.from_pretrained


def test_from_pretrained_adds_the_markers_in_the_official_order(gpt2_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gpt2_dir))
    lm = LatentLM.from_pretrained(gpt2_dir)
    assert lm.latent_ids == (50257, 50258, 50259)
    assert (lm.start_latent_id, lm.end_latent_id, lm.latent_token_id, lm.eos_token_id) == (50257, 50258, 50259, 50256)
    tok = lm.tokenizer
    assert [tok._tok.token_to_id(m) for m in (START_LATENT, END_LATENT, LATENT)] == [50257, 50258, 50259]
    # the official initialisation: every marker row is the row of "<<"
    lt = tok._tok.token_to_id("<<")
    w = lm.model.embed_tokens.weight
    assert w.shape[0] == 50260
    ref = hf.transformer.wte.weight.detach()
    torch.testing.assert_close(w[:GPT2_VOCAB], ref, rtol=0, atol=0)
    for i in lm.latent_ids:
        torch.testing.assert_close(w[i], ref[lt], rtol=0, atol=0)
    # the official tokenizer (transformers + add_tokens in run.py's order) gives the same ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir))
    for m in (START_LATENT, END_LATENT, LATENT):
        hf_tok.add_tokens(m)
    assert [hf_tok.convert_tokens_to_ids(m) for m in (START_LATENT, END_LATENT, LATENT)] == list(lm.latent_ids)
    text = "Is Alex a yumpus? <<yes>>\n### Alex"
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_vocab_and_merges_without_tokenizer_json(tmp_path):
    folder = gpt2_folder(tmp_path / "gpt2", tokenizer_json=False)
    lm = LatentLM.from_pretrained(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert lm.latent_ids == (50257, 50258, 50259)
    text = "Every wumpus is a <<yumpus>>."
    assert lm.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)])
def test_add_latent_tokens_grows_embedding_and_head_and_is_idempotent(family, tied, caplog):
    from tokenizers import Tokenizer, models

    words = ["<unk>", "a", "b", "<<", "</s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    torch.manual_seed(0)
    model = (GPT2(GPT2Config(vocab_size=5, n_layer=1, n_head=2, d_model=8, tie_embeddings=tied)) if family == "gpt2"
             else Llama(LlamaConfig(vocab_size=5, n_layer=1, n_head=2, d_model=8, d_ff=16, tie_embeddings=tied)))
    emb0 = model.embed_tokens.weight.detach().clone()
    head0 = model.lm_head_weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="coconut_kernels"):
        ids = add_latent_tokens(model, tok)
    assert ids == (5, 6, 7) and ids.latent_token_id == 7
    assert "'<<' (id 3)" in caplog.text
    assert model.config.vocab_size == 8 and model.embed_tokens.weight.shape == (8, 8)
    assert model.lm_head_weight.shape == (8, 8)
    torch.testing.assert_close(model.embed_tokens.weight[:5], emb0, rtol=0, atol=0)
    for i in ids:
        torch.testing.assert_close(model.embed_tokens.weight[i], emb0[3], rtol=0, atol=0)
        torch.testing.assert_close(model.lm_head_weight[i], head0[3], rtol=0, atol=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert add_latent_tokens(model, tok) == ids
    assert tok.get_vocab_size() == 8
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the model trains and decodes with the grown vocabulary
    lm = LatentLM(model, tokenizer=ck.data.HFTokenizer(tok, eos_token="</s>"))
    assert lm.latent_ids == ids and lm.eos_token_id == 4


def test_mean_row_without_the_init_token(caplog):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "</s>": 3}, unk_token="<unk>"))
    model = GPT2(GPT2Config(vocab_size=4, n_layer=1, n_head=2, d_model=8, tie_embeddings=False))
    emb0 = model.embed_tokens.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="coconut_kernels"):
        ids = add_latent_tokens(model, tok)
    assert "mean row" in caplog.text
    for i in ids:
        torch.testing.assert_close(model.embed_tokens.weight[i], emb0.mean(0))


def test_transformers_model_and_tokenizer(gpt2_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gpt2_dir))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir))
    lt = hf_tok.convert_tokens_to_ids("<<")
    ids = add_latent_tokens(hf, hf_tok)
    assert ids == (50257, 50258, 50259) and len(hf_tok) == 50260
    w = hf.get_input_embeddings().weight
    assert w.shape[0] == 50260
    for i in ids:
        assert torch.equal(w[i], w[lt]) and torch.equal(hf.lm_head.weight[i], w[lt])
    assert add_latent_tokens(hf, hf_tok) == ids and len(hf_tok) == 50260


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_explicit_ids_are_checked():
    model = GPT2(GPT2Config(vocab_size=10, n_layer=1, n_head=2, d_model=8))
    with pytest.raises(CoconutError, match="latent_token_id: 50258 is outside the model's vocabulary"):
        LatentLM(model, 50258, 7, 8, 9)
    with pytest.raises(CoconutError, match="end_latent_id: 7 equals start_latent_id"):
        LatentLM(model, 6, 7, 7, 9)
    with pytest.raises(CoconutError, match="start_latent_id: 9 equals eos_token_id"):
        LatentLM(model, 6, 9, 8, 9)
    with pytest.raises(CoconutError, match="eos_token_id: not given"):
        LatentLM(model, 6, 7, 8)


def test_folder_without_a_tokenizer(tmp_path):
    folder = tmp_path / "bare"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=12, n_positions=32, n_embd=8, n_layer=1,
                                                         n_head=2)).save_pretrained(str(folder))
    with pytest.raises(CoconutError, match=r"bare: no tokenizer \(expected tokenizer.json, or vocab.json"):
        LatentLM.from_pretrained(folder)
    lm = LatentLM.from_pretrained(folder, latent_token_id=9, start_latent_id=8, end_latent_id=10, eos_token_id=11)
    assert lm.tokenizer is None and lm.latent_ids == (8, 10, 9)


def test_markers_not_consecutive(tmp_path):
    from tokenizers import Tokenizer, models

    folder = tmp_path / "odd"
    words = ["<unk>", START_LATENT, "a", END_LATENT, "b", LATENT, "</s>"]
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(words), n_positions=32, n_embd=8, n_layer=1,
                                                         n_head=2)).save_pretrained(str(folder))
    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")).save(
        str(folder / "tokenizer.json"))
    with pytest.raises(CoconutError, match=r"odd: the latent markers exist but are not on consecutive ids "
                                           r"\(<\|start-latent\|>=1, <\|end-latent\|>=3, <\|latent\|>=5\)"):
        LatentLM.from_pretrained(folder)


def test_vocabulary_padded_past_the_tokenizer(tmp_path):
    """A model with more rows than its tokenizer has tokens (Qwen2's padded vocabulary): the markers take
    the ids after the tokenizer's and their existing rows become the row of `<<`, as run.py sets them; the
    trainer's init_from builds the same rows."""
    from tokenizers import Tokenizer, models

    from coconut_kernels.training import TrainConfig
    from coconut_kernels.training.build import build_lm, build_tokenizer

    words = ["<unk>", "a", "b", "<<", "</s>"]
    folder = tmp_path / "padded"
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_positions=32, n_embd=8, n_layer=1,
                                                              n_head=2, bos_token_id=4, eos_token_id=4))
    hf.save_pretrained(str(folder))
    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")).save(
        str(folder / "tokenizer.json"))
    wte = hf.transformer.wte.weight.detach()
    lm = LatentLM.from_pretrained(folder)
    trained = build_lm(TrainConfig(init_from=str(folder)), build_tokenizer(TrainConfig(init_from=str(folder)), [], None),
                       None)
    for model in (lm.model, trained.model):
        assert model.embed_tokens.weight.shape == (16, 8)
        for i in (5, 6, 7):
            torch.testing.assert_close(model.embed_tokens.weight[i], wte[3], rtol=0, atol=0)
        torch.testing.assert_close(model.embed_tokens.weight[8:], wte[8:], rtol=0, atol=0)
    assert lm.latent_ids == (5, 6, 7) and trained.latent_ids == (5, 6, 7)
