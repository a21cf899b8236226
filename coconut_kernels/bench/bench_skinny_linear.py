"""skinny_linear on the CPU: the products of a latent pass or a decode step (one row per sequence) against
`F.linear` (BLAS) and the floor, reading the weights once (`weight.sum()`), all in one run.

Two weight sets of the suite's default model (gpt2-4x256): one block's four projections (qkv 768 x 256, out
256 x 256, fc 1024 x 256, proj 256 x 1024: forward, and the input gradient `dy @ W` of a latent pass's backward)
and the LM head (50257 x 256, a decode step's logits). The block's weights are drawn as 16 copies taken in turn
(50 MB, past the last-level cache), as a pass meets them after the KV cache has gone through the cache; the
head is 51 MB on its own. The rate column is the weight bytes read per second.

Then what it changes end to end, side by side in the same run: `generate` (ProsQA-shaped prompts of 280-330
tokens, 4 thoughts, 64 answer tokens; B = 1 and 8) and a training step at 16 thoughts (B = 8) on that model,
with the kernel and with it switched off (`ops.skinny_linear.set_enabled(False)`: BLAS everywhere).

    python -m coconut_kernels.bench --scenario skinny_linear
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..ops import skinny_linear as sk
from ..ops.skinny_linear import MAX_ROWS
from .bench_latent_scaling import VOCAB, suite_models, train_step
from .harness import Case, Scenario, register, switched
from .workloads import collate, prosqa_examples

D = 256
BLOCK = ((3 * D, D), (D, D), (4 * D, D), (D, 4 * D))  # (out, in) of qkv, attention out, fc, proj
COPIES = 16


def _weights(shapes, copies, seed, device, dtype):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(o, i, generator=g).to(device, dtype) for o, i in shapes] for _ in range(copies)]


def _steps(which: str, rows: int, device, dtype):
    """name -> (role, setup) for one weight set at `rows` rows."""
    shapes, copies = (BLOCK, COPIES) if which != "head" else (((VOCAB, D),), 1)
    g = torch.Generator().manual_seed(rows)

    def setup(kind):
        sets = _weights(shapes, copies, seed=1, device=device, dtype=dtype)
        xs = [torch.randn(rows, i, generator=g).to(device, dtype) for _, i in shapes]
        dys = [torch.randn(rows, o, generator=g).to(device, dtype) for o, _ in shapes]
        turn = itertools.cycle(sets)
        if kind == "skinny":
            if which == "block_input_grad":
                return lambda: [torch.ops.coconut.skinny_linear_input_grad(dy, w) for dy, w in zip(dys, next(turn))]
            return lambda: [torch.ops.coconut.skinny_linear(x, w, None) for x, w in zip(xs, next(turn))]
        if kind == "blas":
            if which == "block_input_grad":
                return lambda: [dy @ w for dy, w in zip(dys, next(turn))]
            return lambda: [F.linear(x, w) for x, w in zip(xs, next(turn))]
        return lambda: [w.sum() for w in next(turn)]

    return {"skinny_linear": ("impl", lambda: setup("skinny")), "BLAS (torch)": ("reference", lambda: setup("blas")),
            "read the weights": ("floor", lambda: setup("floor"))}, sum(o * i for o, i in shapes)


def cases(settings):
    device, dtype, quick = settings["device"], settings["dtype"], settings["quick"]
    if device.type != "cpu" or dtype != torch.float32:
        return  # a CPU float32 kernel: on a GPU the BLAS of the device serves these shapes
    sizes = [r for r in (settings["sizes"] or ([1, 8] if quick else [1, 8, 16])) if 1 <= r <= MAX_ROWS]
    reps = 3 if quick else 15
    for which in ("block", "block_input_grad", "head"):
        for rows in sizes:
            steps, n_weights = _steps(which, rows, device, dtype)
            for provider, (role, setup) in steps.items():
                yield Case(f"skinny_linear_{which}", provider, "rows", rows, setup, role=role, reps=reps, warmup=3,
                           extra={"memory": False, "metric:weights": (n_weights * 4 / 1e9, "GB/s")})
    yield from _end_to_end(settings, quick)


def _switched(flag: bool, step):
    """step() with the model layer's use of the kernel set to flag (restored after)."""
    return switched(sk.set_enabled, sk.enabled, flag, step)


def _end_to_end(settings, quick):
    device, dtype = settings["device"], settings["dtype"]
    size = settings.get("model") or ("gpt2-tiny" if quick else "gpt2-4x256")
    q_len, answer, thoughts = ((40, 60), 8, 2) if quick else ((280, 330), 64, 16)
    reps = 2 if quick else 5
    state: dict = {}  # the models, built once

    def gen_setup(B, flag):
        def setup():
            s = suite_models(state, size, device, dtype)
            ex = prosqa_examples(B, VOCAB, n_latents=4, seed=B, with_labels=False, q_len=q_len)
            p = collate(ex, VOCAB, layout="ragged", device=device)
            return _switched(flag, lambda: s["gen_lm"].generate(p["input_ids"], p["attention_mask"],
                                                                 max_new_tokens=answer))
        return setup

    def train_setup(B, flag):
        def setup():
            s = suite_models(state, size, device, dtype)
            b = collate(prosqa_examples(B, VOCAB, n_latents=thoughts, seed=B + thoughts, q_len=q_len), VOCAB,
                        device=device)
            return _switched(flag, train_step(s["lm"], b))
        return setup

    for B in ([2] if quick else [1, 8]):
        for name, flag, role in (("generate", True, "impl"), ("generate, skinny_linear off", False, "reference")):
            yield Case("skinny_linear_generate", name, "B", B, gen_setup(B, flag), role=role, reps=reps,
                       extra={"memory": False, "metric:tokens/s": (B * answer, "tok/s")})
    B = 2 if quick else 8
    for name, flag, role in (("train step", True, "impl"), ("train step, skinny_linear off", False, "reference")):
        yield Case(f"skinny_linear_train_step_{thoughts}_thoughts", name, "B", B, train_setup(B, flag), role=role,
                   reps=reps, extra={"memory": False})


SCENARIO = register(Scenario("skinny_linear", "a linear layer on a few rows: one block's projections (forward, "
                             "input gradient) and the LM head of gpt2-4x256, fp32 CPU", cases, x_label="rows"))
