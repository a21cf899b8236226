"""`coconut-eval`: a model evaluated as the official run reports it, and more.

``coconut-eval SOURCE --data FILE`` (SOURCE: a coconut-train checkpoint folder or save folder (its newest
checkpoint), a Hugging Face folder, or an official checkpoint_N file with ``--base``) decodes the stage's
prompts greedily and reports answer exact match and CoT exact match (the official extraction:
`coconut_kernels.data.eval`), the validation loss of the stage's training layout, the latents run per example
and, with ``--samples k --temperature t``, pass@k over k sampled decodings; ``--out`` gets every example's
output as JSON. The curriculum knobs come from ``--official ARGS_YAML``, else a coconut-train checkpoint's own
run config, else the flags. ``--precision`` has the trainer's meanings: fp32, bf16 (the whole model cast to
bf16, as run.py's ``bf16: true``; ``--bf16`` is its alias) or bf16-autocast (fp32 weights under bf16 autocast);
by default the run config's, else fp32. The latent schedule too (``--latent_schedule jacobi --jacobi_iters T``
as in coconut-train; default: the checkpoint's, else sequential), which both the decoding and the validation
loss run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .._cli import run_cli
from ..errors import CheckpointError, CoconutError
from ..validation import LATENT_SCHEDULES, MIN_TEMPERATURE, check_device, check_int, check_real, check_writable

__all__ = ["main", "run_eval"]


def _stage_setup(args) -> tuple:
    """(StageConfig, stage, max_new_tokens, data path, precision, latent schedule) from --official, the
    checkpoint's run config or the flags; explicit flags win."""
    from ..data import StageConfig
    from ..training.checkpoint import read_run_config
    from ..training.config import TrainConfig
    from .official import official_config

    cfg = None
    if args.official is not None:
        overrides = {"only_eval": True}
        if args.base is not None or Path(args.source).is_dir():  # else run.py's model_id is the base
            overrides["init_from"] = args.base or str(args.source)
        cfg = official_config(args.official, overrides)
        if args.base is None and Path(args.source).is_file():
            args.base = cfg.init_from
    elif (Path(args.source) / "config.yaml").is_file() and (Path(args.source) / "model_config.json").is_file():
        saved = read_run_config(args.source)
        known = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
        try:
            cfg = TrainConfig(**{**known, "resume": False})
        except ValueError as e:
            raise CheckpointError(f"{Path(args.source) / 'config.yaml'}: {e}") from None
    knobs = {}
    if cfg is not None:
        sc = cfg.stage_config()
        knobs = {"method": sc.method, "c_thought": sc.c_thought, "max_latent_stage": sc.max_latent_stage,
                 "pad_latent_to_max": sc.pad_latent_to_max}
    for key in ("method", "c_thought", "max_latent_stage", "pad_latent_to_max"):
        if getattr(args, key) is not None:
            knobs[key] = getattr(args, key)
    knobs.setdefault("method", "coconut")
    if knobs["method"] == "no_thoughts":
        knobs["c_thought"] = 1  # unused: no_thoughts prompts hold no latents
    try:
        stage_config = StageConfig(**knobs)
    except ValueError as e:
        raise CoconutError(f"curriculum flags: {e}") from None
    if args.stage is not None:
        stage = args.stage
    elif cfg is not None:
        stage = cfg.eval_stage if cfg.eval_stage is not None else cfg.stage_of_epoch(max(cfg.num_epochs - 1, 0))
    else:
        stage = stage_config.max_latent_stage
    data = args.data or (cfg.val_path if cfg is not None else None)
    if data is None:
        raise CoconutError("--data: no evaluation file (give --data FILE, or --official with a val_path)")
    max_new = args.max_new_tokens or (cfg.max_new_tokens if cfg is not None and args.official else None) or \
        (64 if "gsm" in str(data) else 128)
    if args.bf16 and args.precision not in (None, "bf16"):
        raise CoconutError(f"--bf16 means --precision bf16 (the whole model cast), not {args.precision!r}; give one")
    precision = "bf16" if args.bf16 else args.precision or (cfg.compute_precision if cfg is not None else "fp32")
    return stage_config, stage, max_new, data, precision, _schedule(args, cfg)


def _check_flags(args) -> torch.device:
    """The flags' types and ranges, before any file is read (the device: --device or the default)."""
    check_int(args.samples, "--samples", low=0)
    check_int(args.batch_size, "--batch_size", low=1)
    check_int(args.top_k, "--top_k", low=0)
    check_real(args.temperature, "--temperature", low=MIN_TEMPERATURE)
    check_real(args.top_p, "--top_p", low=0.0, high=1.0, low_open=True)
    for flag, low in (("max_records", 1), ("max_new_tokens", 1), ("stage", 0)):
        if getattr(args, flag) is not None:
            check_int(getattr(args, flag), f"--{flag}", low=low)
    if args.out:
        check_writable(args.out, "--out", folder=False)
    return check_device(args.device, "--device", meta=False) or \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _schedule(args, cfg) -> dict:
    """LatentLM's latent_schedule / jacobi_iters: the flags over the run config's (TrainConfig's defaults when
    there is none), checked before any work."""
    from ..training.config import TrainConfig
    from ..validation import check_schedule

    schedule = args.latent_schedule or (cfg.latent_schedule if cfg is not None else "sequential")
    iters = args.jacobi_iters if args.jacobi_iters is not None else \
        (cfg.jacobi_iters if cfg is not None else TrainConfig.jacobi_iters)
    try:
        check_schedule(schedule, iters if schedule == "jacobi" else args.jacobi_iters)
    except ValueError as e:
        raise CoconutError(f"--latent_schedule / --jacobi_iters: {e}") from None
    return {"latent_schedule": schedule, "jacobi_iters": iters if schedule == "jacobi" else None}


def run_eval(args) -> dict:
    from ..data import RaggedCollator, load_records, tokenize_records
    from ..training.evaluate import evaluate, validation_loss
    from .hf_export import load_source

    device = _check_flags(args)
    stage_config, stage, max_new_tokens, data, precision, schedule = _stage_setup(args)
    if not Path(data).is_file():
        raise CoconutError(f"--data: {data} not found")
    lm = load_source(args.source, args.base).to(device=device, dtype=torch.bfloat16 if precision == "bf16"
                                                  else torch.float32)
    autocast = precision == "bf16-autocast"
    tok = lm.tokenizer
    if tok is None:
        raise CoconutError(f"{args.source}: no tokenizer to build prompts with")
    records = tokenize_records(load_records(data, args.max_records), tok)
    if not records:
        raise CoconutError(f"--data: {data} holds no records")
    collator = RaggedCollator.from_tokenizer(tok)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    res = evaluate(lm, records, stage, stage_config, tok, collator, batch_size=args.batch_size,
                   max_new_tokens=max_new_tokens, device=device, autocast=autocast, outputs=True, samples=args.samples,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, generator=generator,
                   schedule=schedule)
    loss = validation_loss(lm, records, stage, stage_config, tok, collator, batch_size=args.batch_size, device=device,
                           autocast=autocast, schedule=schedule)
    summary = {"source": str(args.source), "data": str(data), "method": stage_config.method, "stage": stage,
               "n": res["n"], "accuracy": res["accuracy"], "cot_accuracy": res["cot_accuracy"],
               "val_loss": loss["val_loss"], "mean_latents": res["mean_latents"],
               "mean_new_tokens": res["mean_new_tokens"], "max_new_tokens": max_new_tokens, "precision": precision,
               **schedule}
    if args.samples:
        summary.update({"samples": args.samples, "temperature": args.temperature,
                        f"pass@{args.samples}": res[f"pass@{args.samples}"],
                        "sample_accuracy": res["sample_accuracy"]})
    out = {**summary, "examples": res["outputs"]}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


def parser() -> argparse.ArgumentParser:
    from ..training.config import PRECISIONS

    p = argparse.ArgumentParser(prog="coconut-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a coconut-train checkpoint folder or save folder (its newest checkpoint), a "
                                  "Hugging Face folder, or an official checkpoint_N file (with --base)")
    p.add_argument("--data", help="records in the official JSON format (default: --official's val_path)")
    p.add_argument("--base", help="for an official checkpoint file: the Hugging Face folder of its model_id")
    p.add_argument("--official", help="an official args/*.yaml: its method, curriculum and evaluated stage")
    p.add_argument("--method", choices=["coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought"])
    p.add_argument("--c_thought", type=int)
    p.add_argument("--max_latent_stage", type=int)
    p.add_argument("--pad_latent_to_max", type=lambda s: s.lower() in ("1", "true", "yes"))
    p.add_argument("--latent_schedule", choices=list(LATENT_SCHEDULES),
                   help="sequential (a pass per thought) or jacobi (PCCoT, --jacobi_iters passes over all thoughts); "
                        "default: the checkpoint's run config, else sequential")
    p.add_argument("--jacobi_iters", type=int, help="Jacobi iterations (default: the checkpoint's, else 3)")
    p.add_argument("--stage", type=int, help="the curriculum stage of the prompts (default: the run's last)")
    p.add_argument("--max_records", type=int)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, help="default: as run.py (64 for GSM8k files, else 128)")
    p.add_argument("--samples", type=int, default=0, help="k sampled decodings per prompt for pass@k")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="of the sampling")
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="as the trainer's key: fp32, bf16 (the whole model cast), bf16-autocast (fp32 weights under "
                        "autocast); default: the run config's (--official or the checkpoint's), else fp32")
    p.add_argument("--bf16", action="store_true", help="--precision bf16, as the trainer's bf16: true")
    p.add_argument("--out", default="coconut_eval.json", help="the JSON file of per-example outputs ('' for none)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    """The console script: a user error prints ``coconut-eval: error: ...`` and returns 2 (the traceback only
    with ``--debug``)."""
    return run_cli("coconut-eval", _main, argv)


def _main(argv: list[str]) -> int:
    from ..training.checkpoint import resolve_source

    args = parser().parse_args(argv)
    args.source = resolve_source(args.source)
    res = run_eval(args)
    print(f"{res['method']} stage {res['stage']} on {res['data']} ({res['n']} examples)")
    print(f"  answer exact match {100 * res['accuracy']:.1f}%   CoT exact match {100 * res['cot_accuracy']:.1f}%   "
          f"validation loss {res['val_loss']:.4f}")
    print(f"  latents per example {res['mean_latents']:.2f}   new tokens per example {res['mean_new_tokens']:.1f}")
    if args.samples:
        k = args.samples
        print(f"  pass@{k} {100 * res[f'pass@{k}']:.1f}%   sampled accuracy {100 * res['sample_accuracy']:.1f}% "
              f"(temperature {args.temperature})")
    if args.out:
        print(f"  per-example outputs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
