"""Loading Hugging Face checkpoints into the model families without `transformers`: config.json is mapped
to the family's dataclass config, and model.safetensors (or the shards a model.safetensors.index.json
names) to its tensors. A `transformers` model object works as a source too (its config and state_dict).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError, CheckpointNotFoundError, CoconutError
from ..validation import check_device, check_dtype
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig

# model_type -> (config class, model class, the HF architectures whose tensors we can load)
FAMILIES = {
    "gpt2": (GPT2Config, GPT2, ("GPT2LMHeadModel", "GPT2Model")),
    "llama": (LlamaConfig, Llama, ("LlamaForCausalLM", "LlamaModel")),
    "qwen2": (LlamaConfig, Llama, ("Qwen2ForCausalLM", "Qwen2Model")),
    "mistral": (LlamaConfig, Llama, ("MistralForCausalLM", "MistralModel")),
}


def _read_json(path: Path, what: str):
    """The JSON value of a checkpoint file; CheckpointError naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} {path} does not exist" if not path.parent.is_dir() else
                                      f"{path.parent} has no {path.name} (found "
                                      f"{sorted(p.name for p in path.parent.iterdir())})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e}); is the file "
                              "truncated?") from None


def _hf_config_dict(source) -> tuple[dict, str]:
    """(the config dict, where it comes from, for messages)."""
    if isinstance(source, dict):
        return source, "config"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CheckpointNotFoundError(f"{path} does not exist (expected a checkpoint folder or its config.json)")
        if path.is_dir():
            path = path / "config.json"
        hf = _read_json(path, "config.json")
        if not isinstance(hf, dict):
            raise CheckpointError(f"{path} must hold a JSON object, got {type(hf).__name__}")
        return hf, str(path)
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return source.to_dict(), f"{type(source).__name__}"
    raise CoconutError(f"source must be a checkpoint folder, a config.json path, a dict or a transformers config, "
                       f"got {type(source).__name__}")


def _family(hf: dict):
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise CheckpointError(f"unsupported model_type {model_type!r} (architectures {architectures}); "
                              f"supported: {sorted(FAMILIES)}")
    config_cls, model_cls, known = FAMILIES[model_type]
    unknown = [a for a in architectures if a not in known]
    if unknown:
        raise CheckpointError(f"unsupported architecture(s) {unknown} for model_type {model_type!r}; "
                              f"supported: {list(known)}")
    return config_cls, model_cls


def load_config(source) -> GPT2Config | LlamaConfig:
    """The family's config for a checkpoint folder, a config.json path, its dict, or a transformers config."""
    hf, where = _hf_config_dict(source)
    try:
        config_cls, _ = _family(hf)
        return config_cls.from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _read_safetensors(folder: Path, device) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index, "index")
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise CheckpointError(f"{index} must hold a JSON object with a 'weight_map' object")
        files = sorted(set(map(str, weight_map["weight_map"].values())))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json "
                                      f"(found {found}); only safetensors checkpoints are read")
    tensors = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointNotFoundError(f"{path} does not exist ({index.name} names it)")
        try:
            with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors' own error types (SafetensorError, ...): a damaged file
            raise CheckpointError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e}); is the file "
                                  "truncated?") from None
    return tensors


def _convert(tensors: dict, model_cls, config, where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict, raising on missing tensors and on tensors we would silently drop."""
    prefix = model_cls.hf_prefix
    named = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    plan = model_cls.hf_tensor_plan(config)
    needed = {n for names, _ in plan.values() for n in names}
    missing = sorted(needed - named.keys())
    if missing:
        full = [n if n.startswith("lm_head.") else prefix + n for n in missing]
        raise CheckpointError(f"{where} lacks tensors required by {model_cls.__name__}: {full}")
    unexpected = sorted(k for k in named.keys() - needed if not model_cls.hf_ignored.search(k))
    if unexpected:
        raise CheckpointError(f"{where} has tensors {model_cls.__name__} does not use (an unsupported variant of "
                              f"the architecture?): {unexpected}")
    return {ours: fn(*(named[n] for n in names)) if fn else named[names[0]] for ours, (names, fn) in plan.items()}


def from_pretrained(source, dtype: torch.dtype | None = None, device=None) -> GPT2 | Llama:
    """A model with the weights of a Hugging Face checkpoint folder (config.json + model.safetensors or
    sharded safetensors) or of a `transformers` model object (its tensors are copied).
    A missing folder or file raises CheckpointNotFoundError, a damaged or unsupported one CheckpointError,
    both naming the file.

    dtype None keeps the checkpoint's (the source model's) floating dtype; device None: the CPU for a
    folder, the source model's device for a model object."""
    check_dtype(dtype)
    device = check_device(device)
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise CheckpointNotFoundError(f"checkpoint folder {folder} does not exist" if not folder.exists() else
                                          f"{folder} is not a folder: a checkpoint is a folder with config.json "
                                          "and model.safetensors")
        config = load_config(folder)
        tensors = _read_safetensors(folder, device)
        where, copy = f"checkpoint {folder}", False
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        config = load_config(source.config)
        tensors = source.state_dict()
        where, copy = f"{type(source).__name__} object", True
    else:
        raise CoconutError(f"source must be a checkpoint folder or a transformers model, got {type(source).__name__}")
    model_cls = FAMILIES[config.model_type][1]
    state = _convert(tensors, model_cls, config, where)
    reference = state["embed_tokens.weight"]
    dtype = dtype or reference.dtype
    device = device or reference.device
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype,
                     memory_format=torch.contiguous_format, copy=copy) for k, v in state.items()}
    with torch.device("meta"):
        model = model_cls(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shapes that contradict the config
        raise CheckpointError(f"{where}: its tensors do not match its config (config.json): {e}") from None
    return model
