"""Gradient accumulation, proven on the trainer itself: the gradient of the first optimizer step of
`coconut-train` with k micro-batches of B/k equals that of one batch of B (fp32, 1e-6 relative) when every
labelled token weighs the same (`loss_average: tokens`), with ragged and aligned collation, and across two
DDP processes on gloo. run.py's own averaging (`micro_batch`: each micro-batch's mean / k) differs from
it as soon as the micro-batches hold different numbers of labelled tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coconut_kernels.train import run
from coconut_kernels.training import TrainConfig

from .test_train import one_thread  # noqa: F401  (the trainer tests' autouse fixture: one thread)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"family": "gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "max_position": 512}
# stage 1 (start_epoch 1): every example carries a latent, so each step is a multi-pass forward
BASE = dict(generate_train=16, generate_val=2, data_seed=4, model=TINY, method="coconut", max_latent_stage=2,
            epochs_per_stage=1, start_epoch=1, num_epochs=2, max_steps=1, eval_every=0, lr=1e-3, max_grad_norm=None,
            progress=False, tensorboard=False, seed=0)

# The step body the gloo test runs in each process: the first step's gradients, saved by rank 0.
_DRIVER = """
import os, sys, torch
from coconut_kernels.train import main
grads = []
step = torch.optim.AdamW.step
def record(self, *a, **k):
    if not grads:
        grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
    return step(self, *a, **k)
torch.optim.AdamW.step = record
rc = main(sys.argv[2:])
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(grads[0], sys.argv[1])
sys.exit(rc)
"""


def first_step_grads(tmp_path, monkeypatch, **kw) -> list[torch.Tensor]:
    grads = []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        if not grads:
            grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    run(TrainConfig(**{**BASE, **kw, "save_dir": str(tmp_path / "run")}))
    monkeypatch.undo()
    return grads[0]


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest, over the parameters, of |a - b| / |b| (Frobenius norms)."""
    assert len(a) == len(b)
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b) if y.norm() > 0)


@pytest.mark.parametrize("collate", ["ragged", "aligned"])
def test_k_micro_batches_equal_one_batch(tmp_path, monkeypatch, collate):
    one = first_step_grads(tmp_path / "one", monkeypatch, batch_size=8, grad_accum_steps=1, collate=collate,
                           loss_average="tokens")
    figures = {}
    for k in (2, 4, 8):
        acc = first_step_grads(tmp_path / f"k{k}", monkeypatch, batch_size=8 // k, grad_accum_steps=k,
                               collate=collate, loss_average="tokens")
        figures[k] = rel_err(acc, one)
    print(f"{collate}: relative gradient difference, k micro-batches of 8/k vs one batch of 8: {figures}")
    assert all(e <= 1e-6 for e in figures.values()), figures
    # run.py's averaging: the mean of the micro-batches' means is another (token-reweighted) gradient
    official = first_step_grads(tmp_path / "mb", monkeypatch, batch_size=2, grad_accum_steps=4, collate=collate)
    print(f"{collate}: run.py's averaging (micro_batch), 4 micro-batches of 2 vs one batch of 8: "
          f"{rel_err(official, one):.2e}")
    assert rel_err(official, one) > 1e-4
    # ... and equal to the one batch's when k = 1
    same = first_step_grads(tmp_path / "mb1", monkeypatch, batch_size=8, grad_accum_steps=1, collate=collate)
    assert rel_err(same, one) <= 1e-6


@pytest.mark.slow
def test_two_gloo_processes_equal_one_batch(tmp_path, monkeypatch):
    one = first_step_grads(tmp_path / "one", monkeypatch, batch_size=8, grad_accum_steps=1, loss_average="tokens")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = [x for key, value in BASE.items() for x in (f"--{key}", json.dumps(value))]  # YAML reads JSON
    figures = {}
    for per_rank, k in ((4, 1), (2, 2)):  # 2 processes x k micro-batches x per_rank = 8 examples
        out = tmp_path / f"grads-{k}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
               str(out), *flags, "--batch_size", str(per_rank), "--grad_accum_steps", str(k), "--loss_average",
               "tokens", "--save_dir", str(tmp_path / f"run{k}")]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        figures[k] = rel_err(torch.load(out, weights_only=True), one)
    print(f"gloo, 2 processes x k micro-batches vs one batch of 8: {figures}")
    assert all(e <= 1e-6 for e in figures.values()), figures
