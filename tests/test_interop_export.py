"""Tests of the Hugging Face export (`coconut_kernels.interop.hf_export`, `coconut-export`): the folder loads in
`transformers` with our logits (fp32, 1e-5) and the markers' ids, and back into `LatentLM`; GPT-2 and the
Llama family; from a Hugging Face folder, a coconut-train checkpoint and an official checkpoint_N file;
nothing in OUT unless the whole export succeeded.
"""
from __future__ import annotations

import json

import pytest
import torch

from coconut_kernels import CheckpointError, CoconutError, LatentLM
from coconut_kernels.data import END_LATENT, LATENT, START_LATENT, generate_dataset, save_records
from coconut_kernels.interop import hf_export
from coconut_kernels.interop.hf_export import export_hf

from .test_interop_official import _grown_hf, _wrapper_state, word_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def records():
    return generate_dataset(8, seed=7)


def _perturbed(lm):
    """Weights unlike any initialisation (every row of the grown vocabulary included)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return lm


def _check_folder(lm, out):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    V = lm.model.config.vocab_size
    x = torch.randint(0, V, (3, 11))
    x[:, 4:6] = torch.tensor([lm.start_latent_id, lm.latent_token_id])  # the marker rows count too
    with torch.no_grad():
        ours = lm.model(x)
        theirs = hf(x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert [tok.convert_tokens_to_ids(m) for m in (START_LATENT, END_LATENT, LATENT)] == list(lm.latent_ids)
    assert tok.eos_token_id == lm.eos_token_id
    back = LatentLM.from_pretrained(out)
    assert back.latent_ids == lm.latent_ids and back.eos_token_id == lm.eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), ours, rtol=0, atol=0)


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("llama", False), ("llama", True)])
def test_export_loads_in_transformers_with_our_logits(tmp_path, records, family, tied):
    folder = word_folder(tmp_path / "base", records, family=family)
    if tied:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["tie_word_embeddings"] = True
        (folder / "config.json").write_text(json.dumps(cfg))
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        state.pop("lm_head.weight", None)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    lm = _perturbed(LatentLM.from_pretrained(folder))
    out = export_hf(lm, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                   "tokenizer.json", "tokenizer_config.json"]
    _check_folder(lm, out)


def test_export_cli_from_an_official_checkpoint(tmp_path, records, capsys):
    folder = word_folder(tmp_path / "base", records)
    hf, ids = _grown_hf(folder)
    ckpt = tmp_path / "checkpoint_7"
    torch.save(_wrapper_state(hf, ids), ckpt)
    assert hf_export.main([str(ckpt), str(tmp_path / "out"), "--base", str(folder)]) == 0
    assert "wrote" in capsys.readouterr().out
    lm = LatentLM.from_pretrained(tmp_path / "out")
    _check_folder(lm, tmp_path / "out")
    with torch.no_grad():
        x = torch.randint(0, hf.config.vocab_size, (2, 7))
        torch.testing.assert_close(lm.model(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    # an official file needs the model_id folder
    assert hf_export.main([str(ckpt), str(tmp_path / "out2")]) == 2
    assert "needs base (--base)" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_export_cli_from_a_training_checkpoint(tmp_path, records):
    from coconut_kernels.train import run
    from coconut_kernels.training import TrainConfig

    folder = word_folder(tmp_path / "base", records)
    data = tmp_path / "train.json"
    save_records(records, data)
    res = run(TrainConfig(init_from=str(folder), train_path=str(data), val_path=str(data), max_val_records=2,
                          num_epochs=1, batch_size=8, max_latent_stage=1, max_new_tokens=4, progress=False,
                          tensorboard=False, save_dir=str(tmp_path / "run")))
    assert hf_export.main([str(res["checkpoint"]), str(tmp_path / "out")]) == 0
    lm = hf_export.load_source(res["checkpoint"])
    _check_folder(lm, tmp_path / "out")


def test_nothing_in_out_unless_the_whole_export_succeeded(tmp_path, records, monkeypatch):
    folder = word_folder(tmp_path / "base", records)
    lm = LatentLM.from_pretrained(folder)
    out = tmp_path / "out"

    def broken(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(type(lm.tokenizer), "save", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(lm, out)
    assert not out.exists() and list(tmp_path.glob(".tmp-*")) == []
    monkeypatch.undo()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=f"{out}: exists and is not empty"):
        export_hf(lm, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_hf(lm, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_export_needs_a_hugging_face_tokenizer(tmp_path):
    from coconut_kernels.models import GPT2, GPT2Config

    lm = LatentLM(GPT2(GPT2Config(vocab_size=10, n_layer=1, n_head=2, d_model=8)), 6, 7, 8, 9)
    with pytest.raises(CoconutError, match="the model has no tokenizer"):
        export_hf(lm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
