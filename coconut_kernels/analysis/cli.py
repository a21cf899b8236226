"""`coconut-analyze CHECKPOINT --data valid.json`: what the continuous thoughts of a trained checkpoint hold
on ProsQA-style problems (Hao et al. 2024, §5).

Runs the checkpoint's latent prompts (its last curriculum stage unless ``--stage``) through
`LatentLM.generate(return_latents=True)`, reads every fed thought out through the LM head and writes to
``--out``: ``nodes.csv`` (per question, latent step and graph node: depth, frontier, height, reach of the
target, probability), ``thoughts.csv`` (per question and step: norm, nearest token embedding by cosine,
top read-out token, frontier / other-node mass), ``questions.csv`` (generated answer, correct),
``steps.csv`` (the aggregate per step), ``aggregate.png`` and ``question_<record>.png`` for the first
``--plots`` questions.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from ..data import RaggedCollator, StageConfig, build_prompt, is_correct, tokenize_record
from .._cli import run_cli
from ..errors import CheckpointError, CoconutError
from ..validation import check_device, check_int, check_writable
from .graph import graph_info
from .plots import plot_aggregate, plot_question
from .thoughts import aggregate_steps, node_token_ids, step_node_sets, thought_rows

__all__ = ["main", "analyze", "load_checkpoint"]

# Methods whose prompts carry latent tokens (no_thoughts drops the steps without feeding any thought).
_LATENT_METHODS = ("coconut", "pause_as_thought")


def load_checkpoint(path: str | Path):
    """(LatentLM in eval mode, tokenizer, StageConfig, checkpoint folder) of a coconut-train checkpoint folder
    (or a save folder, whose newest checkpoint is taken)."""
    from ..data import load_tokenizer
    from ..training.build import build_lm
    from ..training.checkpoint import TOKENIZER, is_checkpoint, read_run_config, resolve_source

    path = Path(resolve_source(path))
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: neither a coconut-train checkpoint nor a save folder holding one")
    cfg_file = path / "config.yaml"
    cfg = read_run_config(path)
    method = cfg.get("method", "coconut")
    if method not in _LATENT_METHODS:
        raise CheckpointError(f"{cfg_file}: field 'method' is {method!r}, which feeds no continuous thoughts; "
                              f"analyse a checkpoint of {' or '.join(_LATENT_METHODS)}")
    try:
        stage_config = StageConfig(method=method, c_thought=cfg.get("c_thought", 1),
                                   max_latent_stage=cfg.get("max_latent_stage", 6),
                                   pad_latent_to_max=cfg.get("pad_latent_to_max", True))
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    tokenizer = load_tokenizer(path / TOKENIZER)
    feedback = "pause" if method == "pause_as_thought" else cfg.get("feedback", "hidden")
    lm = build_lm(SimpleNamespace(init_from=None, seed=0, model=None, feedback_mode=feedback, dropout=None),
                  tokenizer, path)
    vocab = lm.model.embed_tokens.weight.shape[0]
    for name in ("bot_id", "latent_id", "eot_id"):
        if getattr(tokenizer, name) >= vocab:
            raise CheckpointError(f"{path / TOKENIZER}: field {name!r} ({getattr(tokenizer, name)}): the model's "
                                  f"{vocab}-row embedding has no latent token there")
    return lm.eval(), tokenizer, stage_config, path


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _vocab(tokenizer) -> list[str]:
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]


@torch.no_grad()
def analyze(lm, tokenizer, stage_config: StageConfig, records: list[dict], out_dir: str | Path, *,
            data_name: str = "data", stage: int | None = None, batch_size: int = 32, max_new_tokens: int = 64,
            plots: int = 5, device: str = "cpu") -> dict:
    """Run the analysis and write its files; returns {"steps": aggregate rows, "files": [paths]}."""
    if stage is not None:
        check_int(stage, "stage", low=0)
    check_int(batch_size, "batch_size", low=1)
    check_int(plots, "plots", low=0)
    device = check_device(device, meta=False)
    if not records:
        raise CoconutError(f"{data_name}: no records to analyse")
    out = check_writable(out_dir, "out_dir", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    stage = stage_config.max_latent_stage if stage is None else stage
    infos = [graph_info(r, f"{data_name}: record {i}") for i, r in enumerate(records)]
    node_ids = [node_token_ids(g, tokenizer, f"{data_name}: record {i}") for i, g in enumerate(infos)]
    for i, r in enumerate(records):
        for field, kind in (("steps", list), ("answer", str)):
            if not isinstance(r.get(field), kind):
                raise CoconutError(f"{data_name}: record {i}: field {field!r}: "
                                   f"{'missing' if field not in r else 'wrong type'} (expected a {kind.__name__})")
    tokenized = [tokenize_record(r, tokenizer, i) for i, r in enumerate(records)]
    collator = RaggedCollator.from_tokenizer(tokenizer)
    model = lm.model
    lm.to(device)
    vocab = _vocab(tokenizer)
    nodes, thoughts, questions = [], [], []
    for start in range(0, len(records), batch_size):
        chunk = tokenized[start:start + batch_size]
        prompts = [build_prompt(r, stage, stage_config, tokenizer) for r in chunk]
        if not any(p.n_latents for p in prompts):
            raise CoconutError(f"stage {stage}: the prompts hold no latent token (stage 0 or max_latent_stage 0)")
        batch = collator(prompts)
        res = lm.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                          max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, return_latents=True)
        for j, rec in enumerate(chunk):
            i = rec.idx
            k = int(res.n_latents[j])
            n_rows, t_rows = thought_rows(res.latents[j, :k].cpu(), model.lm_head_weight.detach().cpu(),
                                          None if model.lm_head_bias is None else model.lm_head_bias.detach().cpu(),
                                          model.embed_tokens.weight.detach().cpu(), infos[i], node_ids[i],
                                          stage_config.c_thought, vocab, record=i,
                                          states=res.latent_states[j, :k].cpu(),
                                          step_nodes=step_node_sets(records[i], infos[i]))
            nodes += n_rows
            thoughts += t_rows
            text = tokenizer.decode(prompts[j].input_ids + res.tokens[j, :int(res.lengths[j])].tolist(),
                                    skip_special_tokens=True)
            questions.append({"record": i, "n_latents": k, "correct": int(is_correct(text, rec.answer_text)),
                              "answer": rec.answer_text, "output": text.split("\n", 1)[-1].replace("\n", " | ")})
    steps = aggregate_steps(nodes, thoughts)
    files = []
    for name, rows in (("nodes.csv", nodes), ("thoughts.csv", thoughts), ("questions.csv", questions),
                       ("steps.csv", steps)):
        _write_csv(out / name, rows)
        files.append(out / name)
    files.append(plot_aggregate(steps, nodes, out / "aggregate.png"))
    for i in range(min(plots, len(records))):
        files.append(plot_question(infos[i], [r for r in nodes if r["record"] == i], out / f"question_{i}.png",
                                   title=f"{data_name} record {i}"))
    return {"steps": steps, "files": files, "accuracy": sum(q["correct"] for q in questions) / len(questions)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coconut-analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a coconut-train checkpoint folder (or its save folder: the newest one)")
    p.add_argument("--data", required=True, help="ProsQA-style JSON records (with idx_to_symbol, edges, root, ...)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>/analysis)")
    p.add_argument("--stage", type=int, default=None, help="curriculum stage of the prompts (default: the last)")
    p.add_argument("--max-records", type=int, default=None, help="analyse only the first N records")
    p.add_argument("--plots", type=int, default=5, help="per-question plots for the first N records")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    """The console script: a user error prints ``coconut-analyze: error: ...`` and returns 2 (the traceback only
    with ``--debug``)."""
    return run_cli("coconut-analyze", _main, argv)


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    # every flag before the files are read and the model is loaded
    for flag, low in (("stage", 0), ("max_records", 1), ("plots", 0), ("batch_size", 1), ("max_new_tokens", 1)):
        if getattr(args, flag) is not None:
            check_int(getattr(args, flag), "--" + flag.replace("_", "-"), low=low)
    device = check_device(args.device, "--device", meta=False)
    if args.out:
        check_writable(args.out, "--out", folder=True)
    data = Path(args.data)
    if not data.is_file():
        raise CoconutError(f"--data {data}: file not found")
    try:
        records = json.loads(data.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CoconutError(f"{data}: not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise CoconutError(f"{data}: expected a non-empty JSON list of records")
    if args.max_records is not None:
        records = records[:args.max_records]
    lm, tokenizer, stage_config, ckpt = load_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else check_writable(ckpt / "analysis", "--out (default)", folder=True)
    res = analyze(lm, tokenizer, stage_config, records, out, data_name=str(data), stage=args.stage,
                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, plots=args.plots, device=device)
    print(f"{len(records)} questions, answer accuracy {100 * res['accuracy']:.1f}%; per latent step:")
    print("step  frontier mass  other-node mass  corr(p, height)  corr(p, reaches target)  step-node mass  norm  "
          "cos to nearest emb")
    for s in res["steps"]:
        print(f"{s['step']:>4}  {s['frontier_mass']:>13.4f}  {s['nonfrontier_mass']:>15.4f}  "
              f"{s['corr_prob_height']:>15.3f}  {s['corr_prob_reaches_target']:>23.3f}  {s['step_mass']:>14.4f}  "
              f"{s['norm']:>4.1f}  {s['nearest_cosine']:>18.3f}")
    print("wrote " + ", ".join(str(f) for f in res["files"][:6]) + (" ..." if len(res["files"]) > 6 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
