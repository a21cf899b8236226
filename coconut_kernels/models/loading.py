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
    folder, the source model's device for a model object. The model is returned in eval mode, as transformers'
    from_pretrained returns it: call .train() to train with the config's dropout."""
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
    return model.eval()


def load_pretrained(source, *, tokenizer=None, dtype: torch.dtype | None = None, device=None,
                    need_tokenizer: bool = True):
    """(model, tokenizer) of a Hugging Face folder for `LatentLM.from_pretrained`: the model as
    `from_pretrained` reads it, the folder's tokenizer (unless one is given) with the three latent markers,
    and the model grown for them as `coconut_kernels.add_latent_tokens` does. The tokenizer is None when
    the folder has none and ``need_tokenizer`` is False (the caller has every id)."""
    from ..errors import CheckpointError
    from ..markers import add_latent_tokens, load_folder_tokenizer

    folder = Path(source)
    if not folder.exists():
        raise CheckpointNotFoundError(f"{folder} does not exist (expected a Hugging Face checkpoint folder)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a Hugging Face checkpoint folder)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        model = from_pretrained(folder, dtype=dtype, device=device)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: cannot load the checkpoint ({type(e).__name__}: {e})") from None
    if tokenizer is None:
        tokenizer = load_folder_tokenizer(folder, required=need_tokenizer)
    if tokenizer is not None:
        add_latent_tokens(model, tokenizer)
    return model, tokenizer


def to_hf_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the Hugging Face names (`hf_tensor_plan` inverted: GPT-2's Conv1D
    transposes undone, Llama's fused q/k/v and gate/up split), contiguous, on the CPU. A tied LM head is
    not written (transformers ties it on load)."""
    config = model.config
    state = model.state_dict()
    plan = type(model).hf_tensor_plan(config)
    prefix = type(model).hf_prefix
    out = {}
    for ours, (names, fn) in plan.items():
        t = state[ours].detach()
        if len(names) == 1:
            parts = [fn(t) if fn is not None else t]  # the only one-tensor transform is a transpose
        elif names[0].endswith(("q_proj.weight", "q_proj.bias")):
            q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
            parts = t.split([q, kv, kv], dim=0)
        else:  # gate and up
            parts = t.split([config.d_ff, config.d_ff], dim=0)
        for name, part in zip(names, parts):
            key = name if name.startswith("lm_head.") else prefix + name
            out[key] = part.to("cpu").contiguous().clone()
    # the inverse must read back to the same tensors
    back = _convert(out, type(model), config, "export")
    for k, v in back.items():
        if not torch.equal(v, state[k].detach().cpu()):
            raise AssertionError(f"to_hf_state: {k} does not read back")  # a tensor plan without its inverse here
    return out


def to_hf_config(config, *, eos_token_id: int | None = None, bos_token_id: int | None = None,
                 base: dict | None = None) -> dict:
    """A Hugging Face config.json dict for our config (`load_config` inverted), on top of ``base`` (the
    source checkpoint's config.json, whose other fields are kept) when given."""
    base = dict(base or {})
    if isinstance(config, GPT2Config):
        ours = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
                "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.d_model,
                "n_positions": config.max_position, "n_inner": config.d_ff, "layer_norm_epsilon": config.norm_eps,
                "tie_word_embeddings": config.tie_embeddings, "activation_function": config.activation,
                "scale_attn_weights": config.scale_attn_weights,
                "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
                "initializer_range": config.initializer_range, "embd_pdrop": config.embd_pdrop,
                "resid_pdrop": config.resid_pdrop, "attn_pdrop": config.attn_pdrop}
    else:
        if config.model_type == "llama" and config.qkv_bias != config.o_bias:
            raise ValueError("a Llama config with q/k/v biases but no output bias (or the reverse) has no "
                             "Hugging Face form (attention_bias sets both)")
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        ours = {"model_type": config.model_type, "architectures": [arch[config.model_type]],
                "vocab_size": config.vocab_size, "hidden_size": config.d_model,
                "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layer,
                "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
                "head_dim": config.head_dim, "max_position_embeddings": config.max_position,
                "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
                "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling, "hidden_act": "silu",
                "mlp_bias": config.mlp_bias, "sliding_window": config.sliding_window,
                "use_sliding_window": config.sliding_window is not None,
                "initializer_range": config.initializer_range, "attention_dropout": config.attention_dropout}
        if config.model_type != "qwen2":
            ours["attention_bias"] = config.qkv_bias
        for key in ("rope_parameters", "layer_types"):  # superseded by the fields above
            base.pop(key, None)
    out = {**base, **ours}
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    # read back: the exported config must give the same model config
    if load_config(out) != config:
        raise ValueError(f"to_hf_config: {type(config).__name__} does not read back from {out}")
    return out
