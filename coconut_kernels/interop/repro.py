"""`coconut-repro DATASET --method METHOD`: one row of the paper's Table 1 (Hao et al. 2024, "Training Large
Language Models to Reason in a Continuous Latent Space", arXiv:2412.06769), reproduced with the official
recipe and scored beside the paper's number.

The recipe is the official `args/*.yaml` of facebookresearch/coconut (GPT-2, c_thought, epochs_per_stage,
max_latent_stage, 128 examples per optimizer step, AdamW 1e-4, weight decay 0.01, 50 epochs for ProsQA and
ProntoQA, 25 for GSM8k), written as an official YAML file that `coconut-train --official` runs (under torchrun
when several GPUs are present; the per-GPU batch and gradient accumulation keep the 128). The trainer
evaluates every epoch's checkpoint on the validation split (run.py's selection data); the kept checkpoints are
then scored on the test split with `coconut-eval`, and the one with the best validation accuracy is the
measured number. GSM8k's latent rows start, as the official README says, from a CoT checkpoint (the `cot` row
is run first when none is given). ``--dry-run`` prints the recipe and the commands; ``--tiny`` runs the whole
pipeline on a tiny random GPT-2 and a few generated ProsQA-style problems, one optimizer step per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from .._cli import run_cli
from ..errors import ConfigError

__all__ = ["DATASETS", "METHODS", "PAPER", "main", "recipe"]

DATASETS = ("prosqa", "prontoqa", "gsm8k")
# Table 1's rows this library trains (the "pause" of the command line is the "pause as thought" row)
METHODS = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought")
ROW_NAMES = {"coconut": "COCONUT", "cot": "CoT", "no_cot": "No-CoT", "no_thoughts": "COCONUT w/o thought",
             "pause_as_thought": "pause as thought"}
# Accuracy (%) on the test split, mean over the paper's runs: Table 1 of arXiv:2412.06769 (the same in v1 and v3;
# run-to-run spreads there, ProsQA: COCONUT ±0.3, CoT ±1.9, No-CoT ±1.0, w/o thought ±1.1, pause as thought ±0.8).
PAPER = {
    "gsm8k": {"cot": 42.9, "no_cot": 16.5, "coconut": 34.1, "no_thoughts": 21.6, "pause_as_thought": 24.1},
    "prontoqa": {"cot": 98.8, "no_cot": 93.8, "coconut": 99.8, "no_thoughts": 99.9, "pause_as_thought": 100.0},
    "prosqa": {"cot": 77.5, "no_cot": 76.7, "coconut": 97.0, "no_thoughts": 95.5, "pause_as_thought": 96.6},
}
_FILE_PREFIX = {"prosqa": "prosqa", "prontoqa": "prontoqa", "gsm8k": "gsm"}  # the official data/ names
EFFECTIVE_BATCH = 128  # the official runs: batch_size_training 32 on 4 GPUs
TINY_MODEL = {"family": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "max_position": 1024}


def recipe(dataset: str, method: str, *, n_gpus: int = 1, model_id: str = "openai-community/gpt2",
           data_dir: str = "data", save_path: str = "runs/repro/row", cot_checkpoint: str | None = None) -> dict:
    """The official run config (run.py's keys) of one Table 1 row for `n_gpus` processes. Sources: ProsQA and
    ProntoQA latent rows args/{prosqa,prontoqa}_coconut.yaml, GSM8k args/gsm_cot.yaml and args/gsm_coconut.yaml;
    ProsQA/ProntoQA cot and no_cot (no official file) take gsm_cot.yaml's stage-0 settings with the dataset's
    50 epochs. `cot_checkpoint`: an official checkpoint_N file for GSM8k's latent rows (load_model_path)."""
    _check_choice("dataset", dataset, DATASETS)
    _check_choice("--method", method, METHODS)
    batch, accum = per_gpu_batch(n_gpus)
    prefix = _FILE_PREFIX[dataset]
    r = {"project": "coconut", "save_path": save_path, "name": "run", "only_eval": False,
         "coconut": method == "coconut", "cot": method == "cot", "no_thoughts": method == "no_thoughts",
         "no_cot": method == "no_cot", "c_thought": 1, "epochs_per_stage": 5, "max_latent_stage": 6,
         "pad_latent_to_max": True, "save_only_improve": False, "uniform_prob": 0.0, "model_id": model_id,
         "load_model_path": "None", "seed": 0, "resume": 0, "bf16": False,
         "train_path": f"{data_dir}/{prefix}_train.json", "val_path": f"{data_dir}/{prefix}_valid.json",
         "reset_optimizer": True, "batch_size_training": batch, "debug": False,
         "gradient_accumulation_steps": accum, "num_epochs": 25 if dataset == "gsm8k" else 50, "lr": 1e-4,
         "weight_decay": 0.01}
    if method in ("cot", "no_cot"):  # gsm_cot.yaml: stage 0 throughout, the best epoch kept
        r.update(c_thought=0, epochs_per_stage=1, max_latent_stage=0, save_only_improve=True, reset_optimizer=False)
    elif dataset == "gsm8k":  # gsm_coconut.yaml: two thoughts per step, from the CoT checkpoint at stage 1
        r.update(c_thought=2, epochs_per_stage=3, max_latent_stage=3, resume=3)
        if cot_checkpoint is not None and Path(cot_checkpoint).is_file():
            r["load_model_path"] = str(cot_checkpoint)
    return r


def per_gpu_batch(n_gpus: int) -> tuple[int, int]:
    """(batch_size_training, gradient_accumulation_steps) giving 128 examples per optimizer step on `n_gpus`."""
    if not isinstance(n_gpus, int) or n_gpus < 1:
        raise ConfigError(f"--gpus: expected an int >= 1, got {n_gpus!r}")
    if EFFECTIVE_BATCH % n_gpus:
        raise ConfigError(f"--gpus: {n_gpus} GPUs cannot share the official 128 examples per step evenly; use a "
                          f"divisor of 128 (1, 2, 4, 8, ...)")
    share = EFFECTIVE_BATCH // n_gpus
    batch = min(32, share)  # the official per-GPU batch, accumulated up to the share
    return batch, share // batch


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def _tiny(r: dict, out: Path) -> tuple[dict, list[str]]:
    """The row's recipe shrunk to one optimizer step per stage on a tiny random GPT-2: 4 generated ProsQA-style
    problems per split (standing in for every dataset), one epoch per stage, at most 3 latent stages, every
    epoch's checkpoint saved (a random model's accuracy need not rise above 0, which save_only_improve asks);
    and the trainer flags that shrink the evaluation."""
    from ..data import generate_dataset, save_records

    data = out / "tiny_data"
    data.mkdir(parents=True, exist_ok=True)
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        save_records(generate_dataset(4, seed=seed), data / f"{split}.json")  # every record has >= 3 steps
    r = dict(r, train_path=str(data / "train.json"), val_path=str(data / "valid.json"), batch_size_training=4,
             gradient_accumulation_steps=1, model_id="tiny (a random GPT-2, --model below)", save_only_improve=False)
    if r["max_latent_stage"]:
        start_stage = r["resume"] // r["epochs_per_stage"]
        r.update(epochs_per_stage=1, max_latent_stage=min(r["max_latent_stage"], 3), resume=start_stage)
        r["num_epochs"] = r["max_latent_stage"] + 2  # every stage, then one epoch at the last
    else:
        r["num_epochs"] = 2
    return r, ["--max_new_tokens", "16", "--eval_batch_size", "4", "--tensorboard", "false"]


class Row:
    """One Table 1 row: its folder (`out/<dataset>-<method>/`: recipe.yaml, the run, the test scores), recipe
    and commands."""

    def __init__(self, args, method: str, cot_from: str | None = None):
        self.dataset, self.method, self.args = args.dataset, method, args
        self.dir = Path(args.out) / f"{self.dataset}-{method}"
        self.recipe = recipe(self.dataset, method, n_gpus=args.gpus, model_id=args.model or "openai-community/gpt2",
                             data_dir=args.data, save_path=str(self.dir), cot_checkpoint=cot_from)
        self.flags: list[str] = []
        if args.tiny:
            self.recipe, self.flags = _tiny(self.recipe, self.dir)
        if cot_from is not None and self.recipe["load_model_path"] == "None":
            # a coconut-train checkpoint folder (the cot row's): its weights and tokenizer
            self.flags += ["--init_from", cot_from]
        elif args.tiny:
            self.flags += ["--init_from", "null", "--model", json.dumps(TINY_MODEL)]
        elif args.model:
            self.flags += ["--init_from", args.model]
        self.flags += ["--keep_checkpoints", str(args.keep), "--progress", "true", "--log_every", "50"]
        self.run_dir = self.dir / "run"
        self.test_path = (self.dir / "tiny_data" / "test.json" if args.tiny
                          else Path(args.data) / f"{_FILE_PREFIX[self.dataset]}_test.json")

    def train_command(self) -> list[str]:
        n = self.args.gpus
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                    if n > 1 else [sys.executable])
        return launcher + ["-m", "coconut_kernels.train", "--official", str(self.dir / "recipe.yaml")] + self.flags

    def eval_command(self, checkpoint: Path, stage: int) -> list[str]:
        cmd = [sys.executable, "-m", "coconut_kernels.interop.evaluate", str(checkpoint), "--data", str(self.test_path),
               "--stage", str(stage), "--out", str(self.dir / f"test_{checkpoint.name}.json")]
        if self.args.tiny:
            cmd += ["--max_new_tokens", "16", "--device", "cpu"]
        return cmd

    def recipe_text(self) -> str:
        head = (f"# {ROW_NAMES[self.method]} on {self.dataset}: the official recipe (facebookresearch/coconut "
                f"args/*.yaml) for {self.args.gpus} GPU(s), {EFFECTIVE_BATCH} examples per optimizer step.\n"
                f"# Written by coconut-repro; run it with coconut-train --official (or the official run.py).\n")
        return head + yaml.safe_dump(self.recipe, sort_keys=False)


def _shell(cmd: list[str]) -> str:
    """The command as a shell line (this interpreter shown as `python`)."""
    return " ".join("python" if c == sys.executable else shlex.quote(c) for c in cmd)


def _run(cmd: list[str]) -> None:
    print(f"coconut-repro: $ {_shell(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise ConfigError(f"command failed with status {done.returncode}: {_shell(cmd)}")


def _score(row: Row) -> dict:
    """Score the run's kept checkpoints on the test split; the measured number is the test accuracy of the
    one with the best validation accuracy (the later one on a tie), as the paper selects."""
    from ..training.metrics import read_csv

    evals = {int(r["step"]): r for r in read_csv(row.run_dir / "eval_log.csv")}
    scored = []
    for ckpt in sorted(row.run_dir.glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        if step not in evals:  # a mid-epoch checkpoint has no validation row
            continue
        ev = evals[step]
        _run(row.eval_command(ckpt, int(ev["stage"])))
        test = json.loads((row.dir / f"test_{ckpt.name}.json").read_text())
        scored.append({"checkpoint": str(ckpt), "epoch": int(ev["epoch"]), "stage": int(ev["stage"]),
                       "val_accuracy": float(ev["accuracy"]), "test_accuracy": test["accuracy"], "n_test": test["n"]})
    if not scored:
        raise ConfigError(f"{row.run_dir}: no checkpoint with a validation row to score (keep_checkpoints "
                          f"{row.args.keep})")
    best = max(scored, key=lambda s: (s["val_accuracy"], s["epoch"]))
    return {"dataset": row.dataset, "method": row.method, "row": ROW_NAMES[row.method],
            "paper": PAPER[row.dataset][row.method], "measured": round(100 * best["test_accuracy"], 1),
            "selected": best, "checkpoints": scored, "tiny": row.args.tiny}


def _cot_checkpoint(cot: Row) -> Path | None:
    """The cot row's best checkpoint: the latest kept (the cot recipe saves only improvements)."""
    from ..training.checkpoint import latest_checkpoint

    return latest_checkpoint(cot.run_dir)


def _print_result(res: dict) -> None:
    sel = res["selected"]
    what = "tiny pipeline check, not a reproduction" if res["tiny"] else "test split"
    print(f"{res['dataset']} {res['row']}: paper {res['paper']:.1f}%   measured {res['measured']:.1f}% "
          f"({what}; epoch {sel['epoch']}, stage {sel['stage']}, validation {100 * sel['val_accuracy']:.1f}%, "
          f"{sel['n_test']} test problems)")
    for s in res["checkpoints"]:
        print(f"  {Path(s['checkpoint']).name}: epoch {s['epoch']} stage {s['stage']}: validation "
              f"{100 * s['val_accuracy']:.1f}%, test {100 * s['test_accuracy']:.1f}%")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coconut-repro", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--method", default="coconut", type=lambda s: "pause_as_thought" if s == "pause" else s,
                   help=f"one of {', '.join(METHODS)} (pause = pause_as_thought); default coconut")
    p.add_argument("--data", default="data", help="the folder of the official data files, e.g. prosqa_train.json, "
                                                  "prosqa_valid.json, prosqa_test.json (gsm_*.json for GSM8k)")
    p.add_argument("--model", help="a local GPT-2 folder (default: openai-community/gpt2 from the Hugging Face cache)")
    p.add_argument("--out", default="runs/repro", help="the rows' folders go here (default runs/repro)")
    p.add_argument("--gpus", type=int, default=None, help="processes to train with (default: the visible GPUs, "
                                                          "at least 1)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept for the test evaluation (default 3; "
                                                        "each GPT-2 checkpoint with its AdamW state is ~1.5 GB)")
    p.add_argument("--cot_checkpoint", help="GSM8k latent rows: the CoT checkpoint to start from (an official "
                                            "checkpoint_N file or a coconut-train checkpoint folder)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the recipe and commands only")
    p.add_argument("--tiny", action="store_true", help="a tiny random GPT-2 on 4 generated problems, one step per "
                                                       "stage: checks the pipeline end to end on a CPU")
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    _check_choice("--method", args.method, METHODS)
    if args.gpus is None:
        import torch

        args.gpus = 1 if args.tiny else max(1, torch.cuda.device_count())
    if args.keep < 1:
        raise ConfigError(f"--keep: expected an int >= 1, got {args.keep}")
    cot_from = None
    if args.dataset == "gsm8k" and args.method not in ("cot", "no_cot"):
        # the official GSM8k recipe: the latent rows start from a CoT checkpoint (the cot row, run first)
        if args.cot_checkpoint is not None:
            if not Path(args.cot_checkpoint).exists():
                raise ConfigError(f"--cot_checkpoint: {args.cot_checkpoint} not found")
            cot_from = args.cot_checkpoint
        else:
            cot = Row(args, "cot")
            found = _cot_checkpoint(cot)
            if found is None:
                print(f"coconut-repro: {args.dataset} {args.method} starts from a CoT checkpoint: the cot row first "
                      f"({cot.dir})", file=sys.stderr)
                _go(cot, args, score=False)
                found = cot.run_dir / "step-N" if args.dry_run else _cot_checkpoint(cot)  # a dry run's placeholder
                if found is None:
                    raise ConfigError(f"{cot.run_dir}: the cot row wrote no checkpoint (it keeps an epoch only when "
                                      f"its validation accuracy rises above the best so far, and none rose above 0)")
            cot_from = str(found)
    _go(Row(args, args.method, cot_from), args, score=True)
    return 0


def _go(row: Row, args, score: bool) -> None:
    """Print (--dry-run) or run one row: write its recipe, train, and score it on the test split."""
    if args.dry_run:
        print(f"# {row.dir / 'recipe.yaml'}\n{row.recipe_text()}")
        print(f"# train, evaluating every epoch's checkpoint on the validation split:\n{_shell(row.train_command())}")
        if score:
            print(f"# then each kept checkpoint on the test split (S: the stage of its epoch):\n"
                  f"{_shell(row.eval_command(row.run_dir / 'step-N', 0)).replace(' --stage 0', ' --stage S')}")
        print()
        return
    if not args.tiny:
        for key in ("train_path", "val_path"):
            if not Path(row.recipe[key]).is_file():
                raise ConfigError(f"--data: {row.recipe[key]} not found (the official data files; see the "
                                  f"facebookresearch/coconut README for GSM8k and ProntoQA)")
    row.dir.mkdir(parents=True, exist_ok=True)
    (row.dir / "recipe.yaml").write_text(row.recipe_text())
    _run(row.train_command())
    if score:
        res = _score(row)
        (row.dir / "repro.json").write_text(json.dumps(res, indent=1) + "\n")
        _print_result(res)


def main(argv: list[str] | None = None) -> int:
    return run_cli("coconut-repro", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
