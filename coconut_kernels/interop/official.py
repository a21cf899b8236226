"""The official COCONUT code's files (facebookresearch/coconut): its `args/*.yaml` run configs, mapped to a
`TrainConfig` with the meaning `run.py` gives each key, and its `checkpoint_N` files (a `torch.save`d state
dict of the `Coconut` wrapper, keys `base_causallm.*`, or of the bare Hugging Face model), loaded into a
`LatentLM` with ``torch.load(weights_only=True)``.

``coconut-train --official args/prosqa_coconut.yaml [--key value ...]`` reads a file through `official_config`;
the flags after it are this library's keys and apply on top.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

__all__ = ["OFFICIAL_KEYS", "official_config", "read_official_checkpoint", "load_official_weights",
           "load_official_checkpoint"]

log = logging.getLogger("coconut_kernels")

# Every key run.py reads, with its type.
OFFICIAL_KEYS: dict[str, type | tuple] = {
    "project": str, "save_path": str, "name": str, "only_eval": bool, "coconut": bool, "cot": bool,
    "no_thoughts": bool, "no_cot": bool, "c_thought": int, "epochs_per_stage": int, "max_latent_stage": int,
    "pad_latent_to_max": bool, "save_only_improve": bool, "uniform_prob": (int, float), "model_id": str,
    "load_model_path": str, "seed": int, "resume": int, "bf16": bool, "train_path": str, "val_path": str,
    "reset_optimizer": bool, "batch_size_training": int, "debug": bool, "gradient_accumulation_steps": int,
    "num_epochs": int, "lr": (int, float), "weight_decay": (int, float),
}
# run.py's keys whose meaning is the same key here.
_SAME = ("only_eval", "c_thought", "epochs_per_stage", "max_latent_stage", "pad_latent_to_max", "uniform_prob",
         "seed", "bf16", "train_path", "val_path", "reset_optimizer", "num_epochs", "lr", "weight_decay",
         "save_only_improve")
_RENAMED = {"batch_size_training": "batch_size", "gradient_accumulation_steps": "grad_accum_steps"}


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _read_yaml(path: Path) -> dict:
    from ..training.config import read_yaml  # lazily, as official_config imports the trainer's config

    data = read_yaml(path, "official config")
    if not isinstance(data, dict):
        raise ConfigError(f"official config {path}: expected a mapping of run.py's keys, got {type(data).__name__}")
    for key, value in data.items():
        want = OFFICIAL_KEYS.get(key)
        if want is None:
            continue
        if isinstance(value, str) and want == (int, float):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string; run.py's files write !!float "1e-4"
                value = data[key] = float(value)
            except ValueError:
                pass
        bad_bool = isinstance(value, bool) and want is not bool
        if bad_bool or not isinstance(value, want):
            raise ConfigError(f"official config {path}: key {key!r} must be {_type_name(want)}, got "
                              f"{type(value).__name__} {value!r}")
    return data


def _method(data: dict, path: Path) -> str:
    """run.py's flags as one method: no_thoughts wins (run.py turns coconut off for it); cot and no_cot keep
    stage 0; coconut wraps the model; none of them is the pause-as-thought baseline (the latent tokens kept
    as ordinary tokens of a plain model)."""
    flags = [k for k in ("cot", "no_cot", "no_thoughts") if data.get(k)]
    if len(flags) > 1:
        raise ConfigError(f"official config {path}: keys {flags} are all true; run.py's methods exclude each other")
    if flags:
        return flags[0]
    return "coconut" if data.get("coconut") else "pause_as_thought"


def resolve_model_id(model_id: str, path: Path) -> str:
    """A local folder as it is; a hub id from the local Hugging Face cache (nothing is downloaded)."""
    folder = Path(os.path.expandvars(os.path.expanduser(model_id)))
    if folder.is_dir():
        return str(folder)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # not a valid repo id, or huggingface_hub missing
        cached = None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    raise ConfigError(f"official config {path}: key 'model_id': {model_id!r} is neither a local folder nor in the "
                      f"Hugging Face cache; download it (huggingface-cli download {model_id} --local-dir DIR) and "
                      f"pass --init_from DIR")


def official_config(path, overrides: dict | None = None, *, report=None):
    """A `TrainConfig` with the meaning run.py gives each key of the official YAML file `path`;
    ``overrides`` (this library's keys) apply on top. Keys with no meaning here are reported once through
    ``report`` (default: stderr)."""
    from ..training.config import load_config

    path = Path(path)
    data = _read_yaml(path)
    overrides = dict(overrides or {})
    values: dict = {"method": _method(data, path)}
    notes: list[str] = []
    for key in _SAME:
        if key in data:
            values[key] = data[key]
    for key, ours in _RENAMED.items():
        if key in data:
            values[ours] = data[key]
    if values["method"] == "no_thoughts":
        values.pop("c_thought", None)  # run.py sets it to 0; the no_thoughts layout has no latents
    if "save_path" in data or "name" in data:
        values["save_dir"] = os.path.join(data.get("save_path", "."), data.get("name", ""))
    if "model_id" in data and "init_from" not in overrides:
        values["init_from"] = resolve_model_id(data["model_id"], path)
    if data.get("load_model_path", "None") != "None":
        values["load_model_path"] = data["load_model_path"]
    if "val_path" in data:  # run.py's generation budget
        values["max_new_tokens"] = 64 if "gsm" in data["val_path"] else 128
    _start(values, data.get("resume", 0), overrides, notes)
    if data.get("debug"):
        values.update(max_train_records=5000, max_val_records=32)
        notes.append("debug: true: 5000 training and 32 validation records as run.py; checkpoints are still written")
    # The official recipe's optimisation: plain AdamW, no clipping, no warm-up, a constant learning rate.
    values.update(max_grad_norm=None, warmup_steps=0, lr_schedule="constant", eval_every=1)
    ignored = [k for k in data if k in ("project", "debug") and not (k == "debug" and data[k])]
    unknown = [k for k in data if k not in OFFICIAL_KEYS]
    if ignored:
        notes.append(f"key(s) {ignored} have no meaning here (wandb project, debug mode off): ignored")
    if unknown:
        notes.append(f"key(s) {unknown} are not read by run.py: ignored")
    try:
        cfg = load_config(None, {**values, **overrides})
    except ValueError as e:
        raise ConfigError(f"official config {path}: {e}") from None
    for note in notes:
        print(f"official config {path}: {note}", file=report or sys.stderr)
    return cfg


def _start(values: dict, resume: int, overrides: dict, notes: list[str]) -> None:
    """run.py's `resume: N` (the first epoch, or with only_eval the evaluated stage) and its preemption rule
    (a save folder with checkpoints is resumed; under --resume or --overwrite the flag decides)."""
    from ..training.checkpoint import latest_checkpoint

    only_eval = overrides.get("only_eval", values.get("only_eval", False))
    if only_eval:
        # run.py evaluates once, at epoch `resume`; the prompts of a stage past max_latent_stage are those of it
        if values["method"] not in ("cot", "no_cot"):
            values["eval_stage"] = min(resume // values.get("epochs_per_stage", 1), values.get("max_latent_stage", 0))
        else:
            values["eval_stage"] = 0
        return
    values["start_epoch"] = resume
    save_dir = overrides.get("save_dir", values.get("save_dir"))
    asked = "resume" in overrides or overrides.get("overwrite")
    if not asked and save_dir is not None and latest_checkpoint(save_dir) is not None:
        # only the same run resumes: the trainer refuses the folder's checkpoint when its run config differs
        # (training.savedir.check_resume_config)
        values["resume"] = True
        notes.append(f"found checkpoints in {save_dir}: resuming from the latest ('resume: {resume}' ignored, "
                     f"as run.py does)")


# ---------------------------------------------------------------------------------------------------------
# checkpoint_N files

# DDP, the Coconut wrapper, torch.compile; FSDP's wrapper name may sit anywhere in a key
_PREFIXES = ("module.", "base_causallm.", "_orig_mod.")


def read_official_checkpoint(path) -> dict[str, torch.Tensor]:
    """The state dict of an official checkpoint file in Hugging Face names: the `Coconut` wrapper's
    ``base_causallm.`` prefix (and DDP/FSDP/compile prefixes) removed, its ``embedding.weight`` alias of the
    input embedding dropped. Read with ``weights_only=True``: a file that needs pickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: official checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"an object of type {found.group(1)}" if found else "objects other than tensors"
        raise CheckpointError(f"{path}: holds {what}; reading it would run pickle, which is never done for a "
                              f"checkpoint: save the model's state_dict() alone") from None
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r} is a {type(value).__name__}, not a tensor")
        name = key.replace("_fsdp_wrapped_module.", "")
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if name == "embedding.weight":
            continue  # Coconut.embedding is the base model's input embedding, saved twice
        out[name] = value
    return out


@torch.no_grad()
def load_official_weights(lm, path, tokenizer=None) -> None:
    """Load an official checkpoint file into `lm` (its model: same family and shapes). A checkpoint saved
    before the vocabulary was grown (a CoT / no-CoT run's) fills the base rows, and the marker rows get
    the row of ``<<`` of the loaded weights, as run.py initialises them after loading."""
    from ..models.loading import _convert
    from ..markers import INIT_TOKEN, _markers_of

    path = Path(path)
    tensors = read_official_checkpoint(path)
    model = lm.model
    cls = type(model)
    emb_key = cls.hf_prefix + cls.hf_tensor_plan(model.config)["embed_tokens.weight"][0][0]
    if emb_key not in tensors:
        raise CheckpointError(f"{path}: no {emb_key!r}: not a checkpoint of a {model.config.model_type} model "
                              f"(keys {sorted(tensors)[:4]}...)")
    rows = tensors[emb_key].shape[0]
    ours = model.config.vocab_size
    config = dataclasses.replace(model.config, vocab_size=rows)
    try:
        state = _convert(tensors, cls, config, f"checkpoint {path}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    target = model.state_dict()
    grown = []
    for key, value in state.items():
        want = target[key].shape
        if value.shape != want:
            if key in ("embed_tokens.weight", "lm_head.weight") and value.shape[1:] == want[1:] and rows < ours:
                full = target[key].clone()
                full[:rows] = value
                state[key] = full
                grown.append(key)
                continue
            hf_name = cls.hf_tensor_plan(config)[key][0][0]
            hf_name = hf_name if hf_name.startswith("lm_head.") else cls.hf_prefix + hf_name
            raise CheckpointError(f"{path}: key {hf_name!r} has shape {tuple(value.shape)}, the model needs "
                                  f"{tuple(want)} (a checkpoint of another model size?)")
        state[key] = value.to(target[key].dtype)
    model.load_state_dict(state, strict=True)
    if grown:
        tok = tokenizer if tokenizer is not None else lm.tokenizer
        init = _markers_of(tok, "tokenizer")[2] if tok is not None else None
        for key in grown:
            w = model.get_parameter(key)
            w[rows:] = w[init] if init is not None and init < rows else w[:rows].float().mean(0).to(w.dtype)
        log.info("%s: %d rows, the model %d: rows %d.. initialised from %s", path, rows, ours, rows,
                 f"the row of {INIT_TOKEN!r}" if init is not None else "the mean row")


def load_official_checkpoint(path, model_id, *, dtype=None, device=None, **kwargs):
    """A `LatentLM` of the Hugging Face folder `model_id` (run.py's `model_id`: architecture and tokenizer)
    with the weights of the official checkpoint file `path`, for evaluation, generation or more training."""
    from ..latent import LatentLM

    lm = LatentLM.from_pretrained(model_id, dtype=torch.float32, **kwargs)
    load_official_weights(lm, path)
    if dtype is not None or device is not None:
        lm.to(device=device, dtype=dtype)
    return lm
