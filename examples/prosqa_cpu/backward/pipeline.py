"""One method's whole run on the backward chain, as README "Walking back from the options" measured it.

    python examples/prosqa_cpu/backward/pipeline.py coconut --seed 0          # or cot, no_cot, pause_as_thought

Each phase is a fresh process (``pretrain_lookup.py``, then ``coconut-train`` on this folder's configs), and a
phase whose checkpoint is already in ``--runs`` is skipped, so the four methods and three seeds share their
common phases:

1. ``lookup``: ``pretrain_lookup.py`` teaches the backward lookup (1200 lookup steps, 1000 backward walks),
   once for every method and seed, as the paper's runs all start from one pretrained GPT-2;
2. ``cot``: ``cot.yaml`` from it, 5 epochs at lr 1e-3, then resumed for 2 more at 3e-4 (its own seed);
3. ``coconut`` / ``pause_as_thought``: their config from that seed's CoT run, stages 1-5;
   ``no_cot``: ``no_cot.yaml`` from the lookup checkpoint.

It prints each phase's wall time and last validation accuracy (its ``eval_log.csv``) and writes them to
``--runs``/``pipeline_<method>_s<seed>.json``. ``--threads`` sets the threads of every phase (``OMP_NUM_THREADS``
and the pretraining's ``--threads``); ``--smoke`` shrinks every phase to a few steps (the test's run, which
checks that the recipe still runs, not what it reaches). Arguments after ``--`` go to every ``coconut-train``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from coconut_kernels.training.metrics import read_csv

HERE = Path(__file__).resolve().parent
METHODS = ("coconut", "cot", "no_cot", "pause_as_thought")
PRETRAIN = ["--lookup_direction", "backward", "--walk_direction", "backward",
            "--lookup_steps", "1200", "--walk_steps", "1000"]
SMOKE_PRETRAIN = ["--lookup_steps", "3", "--walk_steps", "3", "--batch", "4", "--every", "3"]
SMOKE_TRAIN = ["--generate_train", "16", "--generate_val", "4", "--max_val_records", "4", "--batch_size", "8",
               "--eval_batch_size", "4", "--max_new_tokens", "4", "--log_every", "1", "--warmup_steps", "1"]


def _last_eval(folder: Path) -> dict | None:
    """The last row of a save folder's evaluation log (None: no log yet)."""
    log = folder / "eval_log.csv"
    rows = read_csv(log) if log.is_file() else []
    return rows[-1] if rows else None


def _ran(folder: Path, last_epoch: int | None) -> bool:
    """Whether a command already ran: the pretraining's checkpoint is there (last_epoch None), or the save
    folder's evaluation log reached last_epoch (a run stopped before it is resumed: `_command`)."""
    if last_epoch is None:
        return (folder / "latest").exists()
    row = _last_eval(folder)
    return row is not None and int(row["epoch"]) >= last_epoch


def _command(command: list[str], folder: Path) -> list[str]:
    """A coconut-train command whose save folder already holds a checkpoint of it (a run stopped early) resumes
    that run (coconut-train refuses a fresh run in a used folder)."""
    if "coconut_kernels.train" in command and "--resume" not in command and (folder / "latest").exists():
        return [*command, "--resume", "true"]
    return command


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=METHODS)
    p.add_argument("--seed", type=int, default=0, help="the seed of the method's runs (the pretraining: 0)")
    p.add_argument("--runs", default="runs/prosqa_backward", help="where every phase saves (shared)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every phase")
    p.add_argument("--smoke", action="store_true", help="a few steps per phase (tests)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    runs = Path(args.runs)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    train = [sys.executable, "-m", "coconut_kernels.train"]
    extra = (SMOKE_TRAIN if args.smoke else []) + extra
    lookup, cot = runs / "lookup", runs / f"cot_s{args.seed}"
    # (phase, save folder, [(command, the last epoch it evaluates)])
    phases: list[tuple[str, Path, list[tuple[list[str], int | None]]]] = [
        ("lookup", lookup, [([sys.executable, str(HERE.parent / "pretrain_lookup.py"), "--out", str(lookup),
                              "--threads", str(args.threads), *(SMOKE_PRETRAIN if args.smoke else PRETRAIN)], None)])]
    seeded = ["--seed", str(args.seed)]
    if args.method == "no_cot":
        out = runs / f"no_cot_s{args.seed}"
        phases.append(("no_cot", out, [([*train, str(HERE / "no_cot.yaml"), "--init_from", str(lookup),
                                         "--save_dir", str(out), *seeded, *extra], 4)]))
    else:
        first = [*train, str(HERE / "cot.yaml"), "--init_from", str(lookup), "--save_dir", str(cot), *seeded, *extra]
        phases.append(("cot", cot, [(first, 4), ([*first, "--num_epochs", "7", "--lr", "3e-4", "--resume", "true",
                                                  "--resume_override", "[num_epochs, lr]"], 6)]))
        if args.method != "cot":
            out = runs / f"{args.method}_s{args.seed}"
            phases.append((args.method, out, [([*train, str(HERE / f"{args.method}.yaml"), "--init_from", str(cot),
                                                "--save_dir", str(out), *seeded, *extra], 5)]))
    record: dict = {"method": args.method, "seed": args.seed, "threads": args.threads, "smoke": args.smoke,
                    "phases": []}
    for name, folder, commands in phases:
        pending = [command for command, last in commands if not _ran(folder, last)]
        done = not pending
        t0 = time.perf_counter()
        for command in pending:
            command = _command(command, folder)
            print(f"[pipeline] {name}: {' '.join(command)}", flush=True)
            subprocess.run(command, env=env, check=True)
        wall = time.perf_counter() - t0
        row = None if name == "lookup" else _last_eval(folder)
        acc = None if row is None else float(row["accuracy"])
        record["phases"].append({"phase": name, "folder": str(folder), "skipped": done, "wall_s": round(wall, 1),
                                 "accuracy": acc})
        print(f"[pipeline] {name}: {'already there' if done else f'{wall:.0f} s'}"
              + ("" if acc is None else f", validation accuracy {100 * acc:.1f}%"), flush=True)
    record["wall_s"] = round(sum(ph["wall_s"] for ph in record["phases"]), 1)
    record["accuracy"] = record["phases"][-1]["accuracy"]
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"pipeline_{args.method}_s{args.seed}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[pipeline] {args.method} seed {args.seed}: {record['wall_s']:.0f} s for the phases run here, "
          f"validation accuracy {100 * (record['accuracy'] or 0):.1f}%", flush=True)
    return record


if __name__ == "__main__":
    main()
