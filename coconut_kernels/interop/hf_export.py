"""Export to a Hugging Face folder (config.json, model.safetensors, tokenizer.json + tokenizer_config.json
with the three latent markers) that `transformers.AutoModelForCausalLM.from_pretrained` loads with the same
logits, and `LatentLM.from_pretrained` loads back with the same ids.

``coconut-export SOURCE OUT``: SOURCE is a coconut-train checkpoint folder or save folder (its newest
checkpoint), a Hugging Face folder, or an official ``checkpoint_N`` file (with ``--base`` the folder of its
run.py ``model_id``). The folder is written to a temporary folder next to OUT and renamed into place, so OUT
holds nothing unless the whole export succeeded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .._cli import run_cli
from ..errors import CheckpointError, CoconutError
from ..training.checkpoint import resolve_source
from ..validation import check_writable

__all__ = ["export_hf", "load_source", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_source(source, base=None):
    """A LatentLM (with its tokenizer) from a coconut-train checkpoint folder, a Hugging Face folder, or an
    official checkpoint_N file with ``base`` (the Hugging Face folder of its model_id)."""
    from ..latent import LatentLM
    from ..training.checkpoint import is_checkpoint
    from .official import load_official_checkpoint

    path = Path(source)
    if path.is_file():
        if base is None:
            raise CoconutError(f"{path}: an official checkpoint file needs base (--base): the Hugging Face folder "
                               f"of the run's model_id, for the architecture and the tokenizer")
        return load_official_checkpoint(path, base)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not found (expected a checkpoint folder or an official checkpoint file)")
    if is_checkpoint(path):
        return _load_ours(path)
    return LatentLM.from_pretrained(path, dtype=torch.float32)


def _load_ours(folder: Path):
    """A coconut-train checkpoint folder as the trainer builds it (model config, tokenizer, run config's
    feedback), its weights loaded strictly; in eval mode, as every loader returns a model (no dropout)."""
    import yaml

    from ..data import load_tokenizer
    from ..latent import LatentLM
    from ..training.build import _model_from_dict
    from ..training.checkpoint import TOKENIZER, load_weights, read_model_config

    tokenizer = load_tokenizer(folder / TOKENIZER)
    model = _model_from_dict(read_model_config(folder), tokenizer.vocab_size, f"checkpoint {folder}")
    run = folder / "config.yaml"
    cfg = (yaml.safe_load(run.read_text()) or {}) if run.is_file() else {}
    feedback = "pause" if cfg.get("method") == "pause_as_thought" else cfg.get("feedback", "hidden")
    lm = LatentLM(model, tokenizer=tokenizer, feedback=feedback)
    try:
        lm.load_state_dict(load_weights(folder), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: weights do not fit the model ({e})") from None
    return lm.eval()


def _tokenizer_config(tokenizer) -> dict:
    raw = tokenizer._tok
    eos = raw.id_to_token(tokenizer.eos_token_id)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "unk_token": eos,
            "pad_token": raw.id_to_token(tokenizer.pad_token_id), "clean_up_tokenization_spaces": False,
            "model_max_length": None}


def export_hf(lm, out, *, dtype: torch.dtype | None = None, base_config: dict | None = None,
              overwrite: bool = False) -> Path:
    """Write `lm` (a LatentLM with a Hugging Face tokenizer, `lm.tokenizer`) as a Hugging Face folder `out`.
    dtype None keeps the weights' dtype; base_config: a config.json dict whose other fields are kept."""
    from safetensors.torch import save_file

    from ..data import HFTokenizer
    from ..models.loading import to_hf_config, to_hf_state

    out = Path(out)
    tok = lm.tokenizer
    if not isinstance(tok, HFTokenizer):
        kind = "no tokenizer" if tok is None else f"a {type(tok).__name__}"
        raise CheckpointError(f"export to {out}: the model has {kind}; a Hugging Face folder needs a Hugging Face "
                              f"tokenizer (tokenizer.json) with the latent markers")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    if lm.feedback is not None and any(True for _ in lm.feedback.parameters()):
        print(f"export to {out}: the feedback's own parameters ({type(lm.feedback).__name__}) have no place in a "
              f"Hugging Face folder and are not written", file=sys.stderr)
    state = to_hf_state(lm.model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = to_hf_config(lm.model.config, eos_token_id=lm.eos_token_id, bos_token_id=lm.eos_token_id,
                          base=base_config)
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok.save(tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": lm.eos_token_id, "eos_token_id": lm.eos_token_id}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """The console script: a user error prints ``coconut-export: error: ...`` and returns 2 (the traceback only
    with ``--debug``)."""
    return run_cli("coconut-export", _main, argv)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="coconut-export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a coconut-train checkpoint folder or save folder (its newest checkpoint), a "
                                  "Hugging Face folder, or an official checkpoint_N file (with --base)")
    p.add_argument("out", help="the Hugging Face folder to write (written whole or not at all)")
    p.add_argument("--base", default=None, help="for an official checkpoint file: the Hugging Face folder of its "
                                                "model_id (architecture, tokenizer, config fields)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="the weights' dtype (default: as loaded)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    args.source = resolve_source(args.source)
    if not (args.overwrite and Path(args.out).exists()):  # before the model is loaded
        check_writable(args.out, "out", folder=True)
    lm = load_source(args.source, args.base)
    base = Path(args.base if args.base else args.source) / "config.json"
    try:
        base_config = json.loads(base.read_text()) if base.is_file() else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{base}: not valid JSON ({e})") from None
    out = export_hf(lm, args.out, dtype=_DTYPES.get(args.dtype), base_config=base_config, overwrite=args.overwrite)
    print(f"coconut-export: wrote {out} (vocabulary {lm.model.config.vocab_size}, markers {tuple(lm.latent_ids)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
