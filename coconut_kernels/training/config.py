"""The trainer's configuration: one dataclass, read from a YAML file and/or ``--key value`` flags.

Every key is a field of `TrainConfig`; a key that is not one (in the file or on the command line) is an
error naming it, with the closest valid key. `coconut_kernels.train` consumes the validated object.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import METHODS, StageConfig
from ..data.prosqa import CHAINS, RENDERS, SIZES
from ..errors import ConfigError
from ..feedback import MODES
from ..validation import LATENT_SCHEDULES

__all__ = ["TrainConfig", "load_config", "config_parser"]

_SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "bf16-autocast")
# Keys a resumed run may change freely (where and how the run stops, saves, logs and evaluates); every other
# key must equal the checkpoint's unless listed in resume_override.
RESUME_FREE = ("resume", "resume_override", "overwrite", "save_dir", "max_steps", "save_every_steps",
               "keep_checkpoints", "dist", "device", "progress", "log_every", "tensorboard", "eval_every",
               "eval_batch_size", "max_new_tokens", "eval_stage", "start_epoch", "save_only_improve")
# Keys that cannot change on resume: the weights and vocabulary come from the checkpoint.
RESUME_FIXED = ("model", "init_from", "load_model_path", "tokenizer", "method", "feedback", "marker_init")


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------------------
    train_path: str | None = None  # official JSON records; None: generate `generate_train` ProsQA problems
    val_path: str | None = None  # None: generate `generate_val` problems (seed data_seed + 1)
    val_if_missing: str = "error"  # "generate": a val_path that does not exist falls back to a generated split
    generate_train: int = 2000
    generate_val: int = 200
    generate_size: str = "prosqa"  # generated graphs: prosqa (the published split's shape) | small (for CPU runs)
    generate_render: str = "text"  # generated records: text (the published sentences) | edges (compact X Y pairs)
    generate_chain: str = "forward"  # generated steps: forward (published) | backward (edges render, README)
    data_seed: int = 0
    max_train_records: int | None = None
    max_val_records: int | None = None
    tokenizer: str | None = None  # a tokenizer file/folder; None: init_from's, else a word tokenizer of the data
    # --- model ------------------------------------------------------------------------------------------
    init_from: str | None = None  # a Hugging Face checkpoint folder, a coconut-train checkpoint or save folder
    model: dict | None = None  # a fresh random model: {family: gpt2|llama, n_layer: .., ...}; one of init_from / model
    feedback: str = "hidden"  # hidden | projected | soft | mixture | pause (pause_as_thought forces pause)
    latent_schedule: str = "sequential"  # sequential (official: a pass per thought) | jacobi (PCCoT: jacobi_iters)
    jacobi_iters: int = 3  # Jacobi iterations over all thoughts (latent_schedule: jacobi); >= the thought count: exact
    # the gradient from each fed-back thought into the hidden state it was made from is multiplied by this (0..1;
    # 1: the official full gradient through the chain of thoughts; LatentLM.forward's feedback_grad_scale)
    feedback_grad_scale: float = 1.0
    load_model_path: str | None = None  # an official checkpoint_N file loaded over init_from's weights
    marker_init: str | None = None  # a token whose embedding row the marker rows take at init_from (README)
    # --- method and curriculum (the official knobs) -------------------------------------------------------
    method: str = "coconut"  # coconut | cot | no_cot | no_thoughts | pause_as_thought
    c_thought: int = 1
    epochs_per_stage: int = 1
    max_latent_stage: int = 6
    pad_latent_to_max: bool = True
    uniform_prob: float = 0.0
    reset_optimizer: bool = True  # fresh AdamW moments (see reset_optimizer_every)
    reset_optimizer_every: str = "epoch"  # epoch (the official run.py) | stage (only when the stage changes)
    num_epochs: int = 7
    start_epoch: int = 0  # the official `resume: N`: the curriculum starts at epoch N (stage N // epochs_per_stage)
    # --- optimisation -----------------------------------------------------------------------------------
    lr: float = 1e-4
    weight_decay: float = 0.01
    weight_decay_scope: str = "all"  # all parameters (the official AdamW) | matrices (not biases, norm weights)
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (beta1, beta2); run.py: torch's
    warmup_steps: int = 0  # linear warm-up over this many optimizer steps
    lr_schedule: str = "constant"  # after warm-up: constant | linear | cosine (to 0 at the last step)
    max_grad_norm: float | None = None  # None: no clipping (the official run.py)
    batch_size: int = 32  # per process
    grad_accum_steps: int = 1
    # how an optimizer step averages its loss: "micro_batch" (run.py: each micro-batch's token mean / the
    # accumulation steps, then DDP's mean over processes) or "tokens" (every labelled token of the step
    # weighs the same, across micro-batches and processes: k micro-batches of B/k = one batch of B)
    loss_average: str = "micro_batch"
    bf16: bool = False  # the official key: true casts the whole model (weights, optimizer state) to bf16
    precision: str | None = None  # fp32 | bf16 (= bf16: true) | bf16-autocast (fp32 weights); None: from bf16
    # None: the dropout of the model's config (a Hugging Face checkpoint's config.json: GPT-2 0.1 on embeddings,
    # residuals and attention probabilities, as the official run.py trains); a number sets every probability
    dropout: float | None = None
    seed: int = 0  # also seeds each micro-batch's dropout (with the epoch, micro-batch and rank)
    collate: str = "ragged"  # ragged (no compute on pads) | aligned (the official left padding)
    max_steps: int | None = None  # stop (and checkpoint) after this many optimizer steps
    skip_nonfinite: bool = False  # a NaN/inf loss or gradient norm skips the step (logged) instead of stopping
    # --- evaluation -------------------------------------------------------------------------------------
    eval_every: int = 1  # epochs; 0: only at the end
    eval_batch_size: int = 64
    max_new_tokens: int = 64
    eval_stage: int | None = None  # only_eval: the stage of the prompts; None: the last training stage
    only_eval: bool = False
    # --- io and distribution ----------------------------------------------------------------------------
    save_dir: str = "runs/coconut"
    save_every_steps: int = 0  # 0: checkpoint at the end of every epoch only
    keep_checkpoints: int = 2
    save_only_improve: bool = False  # the end-of-epoch checkpoint only when the accuracy beats the best so far
    resume: Any = False  # false | true (latest in save_dir) | a checkpoint folder
    resume_override: list = field(default_factory=list)  # keys a resumed run may change (e.g. [lr, num_epochs])
    overwrite: bool = False  # a fresh run in a save_dir holding another run moves that run aside (never deletes)
    dist: str = "ddp"  # ddp | fsdp (used when launched by torchrun with more than one process)
    device: str | None = None  # None: cuda when available, else cpu
    progress: bool = True
    log_every: int = 10  # optimizer steps between progress updates (the bar's loss; a line when not on a terminal)
    tensorboard: bool = True  # when the tensorboard package is installed

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and "float" in str(f.type):
                # YAML 1.1 reads 3e-4 (no dot) as a string
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    pass
            _check_type(f.name, getattr(self, f.name), f.type)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key {f.name!r}: expected a finite number, got {value}")
        if self.method not in METHODS:
            raise ConfigError(f"config key 'method': expected one of {METHODS}, got {self.method!r}")
        if self.feedback not in MODES:
            raise ConfigError(f"config key 'feedback': expected one of {sorted(MODES)}, got {self.feedback!r}")
        _choice("collate", self.collate, ("ragged", "aligned"))
        _choice("latent_schedule", self.latent_schedule, LATENT_SCHEDULES)
        _choice("loss_average", self.loss_average, ("micro_batch", "tokens"))
        _choice("dist", self.dist, ("ddp", "fsdp"))
        _choice("lr_schedule", self.lr_schedule, _SCHEDULES)
        _choice("val_if_missing", self.val_if_missing, ("error", "generate"))
        _choice("generate_size", self.generate_size, tuple(SIZES))
        _choice("generate_render", self.generate_render, RENDERS)
        _choice("generate_chain", self.generate_chain, CHAINS)
        if self.generate_chain == "backward" and self.generate_render != "edges":
            raise ConfigError("config key 'generate_chain': 'backward' needs generate_render 'edges', "
                              f"got {self.generate_render!r}")
        _choice("weight_decay_scope", self.weight_decay_scope, ("all", "matrices"))
        _choice("reset_optimizer_every", self.reset_optimizer_every, ("epoch", "stage"))
        self._check_precision()
        self._check_ranges()
        if not isinstance(self.resume, (bool, str)):
            raise ConfigError(f"config key 'resume': expected true, false or a checkpoint folder, got {self.resume!r}")
        self._check_resume_keys()
        _check_device(self.device)
        if self.model is not None and self.model.get("family", "gpt2") not in ("gpt2", "llama"):
            raise ConfigError(f"config key 'model.family': expected 'gpt2' or 'llama', got {self.model['family']!r}")
        self.stage_config()  # the curriculum knobs' own checks
        if self.marker_init is not None and (not isinstance(self.marker_init, str) or not self.marker_init):
            raise ConfigError(f"config key 'marker_init': expected None or a token's text, got {self.marker_init!r}")
        if self.marker_init is not None and self.init_from is None:
            raise ConfigError("config key 'marker_init': sets marker rows of init_from's model; a fresh model (key "
                              "'model') has random rows everywhere, so set init_from or leave marker_init unset")
        if self.model is None and self.init_from is None:
            raise ConfigError("no model to train: set init_from to a Hugging Face checkpoint folder (e.g. GPT-2, as "
                              "the official recipe) or a coconut-train checkpoint, or model to a fresh random "
                              "one, e.g. model: {family: gpt2, n_layer: 4, n_head: 4, d_model: 64, max_position: "
                              "512}")

    def _check_ranges(self) -> None:
        for name in ("jacobi_iters", "epochs_per_stage", "batch_size", "grad_accum_steps", "eval_batch_size", "max_new_tokens",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r}: expected an int >= 1, got {getattr(self, name)}")
        for name in ("num_epochs", "start_epoch", "warmup_steps", "eval_every", "save_every_steps", "generate_train",
                     "generate_val"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key {name!r}: expected an int >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_records", "max_val_records", "eval_stage"):
            v = getattr(self, name)
            if v is not None and v < (1 if name != "eval_stage" else 0):
                raise ConfigError(f"config key {name!r}: expected None or a positive int, got {v}")
        if self.num_epochs == 0 and not self.only_eval:
            raise ConfigError("config key 'num_epochs': expected an int >= 1 for a training run, got 0 (to evaluate "
                              "without training, set only_eval: true)")
        if self.start_epoch and self.start_epoch >= self.num_epochs and self.resume is False and not self.only_eval:
            raise ConfigError(f"config key 'start_epoch': expected < num_epochs ({self.num_epochs}), got "
                              f"{self.start_epoch}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr': expected > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"config key 'weight_decay': expected >= 0, got {self.weight_decay}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"config key 'dropout': expected None or a number in [0, 1), got {self.dropout}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"config key 'max_grad_norm': expected None or > 0, got {self.max_grad_norm}")
        if (len(self.adam_betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                 and 0.0 <= b < 1.0 for b in self.adam_betas)):
            raise ConfigError(f"config key 'adam_betas': expected two numbers in [0, 1), got {self.adam_betas!r}")
        if not 0.0 <= self.feedback_grad_scale <= 1.0:
            raise ConfigError(f"config key 'feedback_grad_scale': expected a number in [0, 1], "
                              f"got {self.feedback_grad_scale}")

    def _check_precision(self) -> None:
        if self.precision is None:
            return
        _choice("precision", self.precision, PRECISIONS)
        if self.bf16 and self.precision != "bf16":
            raise ConfigError(f"config keys 'bf16' and 'precision': bf16: true means precision: bf16 (the whole "
                              f"model cast), not {self.precision!r}; set only one of them")

    @property
    def compute_precision(self) -> str:
        """fp32, bf16 (the model cast to bf16, as the official run.py) or bf16-autocast (fp32 weights)."""
        return self.precision if self.precision is not None else ("bf16" if self.bf16 else "fp32")

    def _check_resume_keys(self) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        for key in self.resume_override:
            if key not in names:
                raise _unknown_key(str(key), "config key 'resume_override'")
            if key in RESUME_FIXED:
                raise ConfigError(f"config key 'resume_override': {key!r} cannot change on resume (the weights and "
                                 f"vocabulary come from the checkpoint); start a new run with init_from instead")
        if self.overwrite and self.resume is not False:
            raise ConfigError("config keys 'overwrite' and 'resume': overwrite moves the run in save_dir aside for a "
                             "fresh run; it cannot be combined with resume")
        if self.only_eval and self.resume is not False:
            raise ConfigError("config keys 'only_eval' and 'resume': to evaluate a checkpoint, give it as init_from "
                             "(only_eval writes its results to a fresh save_dir)")

    def stage_config(self) -> StageConfig:
        try:
            return StageConfig(method=self.method, c_thought=self.c_thought, max_latent_stage=self.max_latent_stage,
                               pad_latent_to_max=self.pad_latent_to_max, uniform_prob=self.uniform_prob)
        except ValueError as e:
            raise ConfigError(f"config key {e}") from None

    @property
    def feedback_mode(self) -> str:
        """The feedback LatentLM runs: the pause control always feeds its learned embedding."""
        return "pause" if self.method == "pause_as_thought" else self.feedback

    @property
    def schedule(self) -> dict:
        """The latent schedule arguments of LatentLM.forward and generate."""
        jacobi = self.latent_schedule == "jacobi"
        return {"latent_schedule": self.latent_schedule, "jacobi_iters": self.jacobi_iters if jacobi else None}

    @property
    def uses_latents(self) -> bool:
        return self.method in ("coconut", "pause_as_thought", "no_thoughts")

    def stage_of_epoch(self, epoch: int) -> int:
        """The official schedule: epoch // epochs_per_stage; every stage past max_latent_stage lays the data
        out alike (all steps replaced, max_latent_stage latents), so it is capped at max_latent_stage + 1;
        cot and no_cot stay at stage 0."""
        if not self.uses_latents:
            return 0
        return min(epoch // self.epochs_per_stage, self.max_latent_stage + 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):  # whether this machine has the GPU is checked when the run starts
        raise ConfigError(f"config key 'device': expected a torch device such as cpu, cuda or cuda:1, "
                          f"got {device!r}")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config key {name!r}: expected one of {tuple(choices)}, got {value!r}")


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,), "list": (list,),
          "Any": (object,)}


def _check_type(name: str, value, annotation: str) -> None:
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None:
        if "None" in kinds:
            return
        raise ConfigError(f"config key {name!r}: must not be null")
    for k in kinds:
        if k == "None":
            continue
        allowed = _TYPES[k]
        # bool is an int subclass: true is not a batch size
        if isinstance(value, allowed) and not (k in ("int", "float") and isinstance(value, bool)):
            return
    want = " or ".join(k for k in kinds)
    raise ConfigError(f"config key {name!r}: expected {want}, got {type(value).__name__} {value!r}")


def _unknown_key(key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: config key {key!r} does not exist{hint}; valid keys: {', '.join(names)}")


def _expand(v):
    return os.path.expandvars(os.path.expanduser(v)) if isinstance(v, str) else v


def read_yaml(path, label: str):
    """The YAML document at `path`; ConfigError naming `label` and the path when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{label} {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{label} {path}: not valid YAML ({e})") from None


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) with ``overrides`` on top. Paths may use $VARS and ~."""
    values: dict = {}
    if path is not None:
        data = read_yaml(path, "config file")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of keys to values, got {type(data).__name__}")
        values.update(data)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in names:
            raise _unknown_key(key, f"config file {path}")
    for key, v in (overrides or {}).items():
        if key not in names:
            raise _unknown_key(key, "command line")
        if key == "model" and isinstance(v, dict) and isinstance(values.get("model"), dict):
            v = {**values["model"], **v}  # --model '{d_model: 64}' changes one field of the file's model
        values[key] = v
    for key in ("train_path", "val_path", "tokenizer", "init_from", "save_dir", "resume", "load_model_path"):
        if key in values:
            values[key] = _expand(values[key])
    return TrainConfig(**values)


def config_parser() -> argparse.ArgumentParser:
    """``coconut-train [config.yaml] [--key value ...]``: one flag per config key; values are YAML
    (``--lr 3e-4``, ``--val_path null``, ``--model '{n_layer: 4}'``)."""
    p = argparse.ArgumentParser(
        prog="coconut-train",
        description="COCONUT curriculum trainer: YAML config and/or --key value flags (values parsed as YAML).",
    )
    p.add_argument("config", nargs="?", help="YAML config file (keys: the flags below, without --)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (not a config key)")
    p.add_argument("--official", metavar="ARGS_YAML", default=None,
                   help="an official COCONUT run config (facebookresearch/coconut args/*.yaml), read with run.py's "
                        "meaning of each key; the flags below apply on top")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar=_metavar(f.type),
                       type=_yaml_value, help=f"(default: {_default(f)})")
    return p


def _yaml_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _metavar(annotation) -> str:
    return str(annotation).replace(" ", "").upper()


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(config_parser().parse_args(argv))
    args.pop("debug", None)  # the console script's flag (coconut_kernels._cli), not a config key
    path = args.pop("config")
    official = args.pop("official")
    if official is not None:
        if path is not None:
            raise ConfigError(f"config file {path} and --official {official}: give one of them")
        from ..interop.official import official_config

        return official_config(official, args)
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path}: not found")
    return load_config(path, args)
