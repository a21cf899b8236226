"""gelu_tanh on the CPU: GPT-2's activation (the tanh approximation) and its gradient on a block's (tokens, 4d)
activations against torch's `F.gelu(x, approximate="tanh")` + `aten.gelu_backward`, and the floor: the same bytes
read and written by plain elementwise ops (`-x` for the forward, `g * x` for the backward), all in one run.

Sizes of the suite's default model (gpt2-4x256, 4d = 1024) at ProsQA-shaped batches: 340 tokens (B=1) and 2720
(B=8). Then what it changes end to end, side by side in the same run: a training step (B=8, 6 thoughts) with the
kernel and with it switched off (`ops.gelu.set_enabled(False)`: aten's GELU everywhere).

    python -m coconut_kernels.bench --scenario gelu
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import gelu as gl
from .bench_latent_scaling import VOCAB, suite_models, train_step
from .harness import Case, Scenario, register, switched
from .workloads import collate, prosqa_examples

WIDTH = 4 * 256  # the MLP's inner width of gpt2-4x256


def _step(kind: str, tokens: int, device, dtype):
    def setup():
        g = torch.Generator().manual_seed(tokens)
        x = (torch.randn(tokens, WIDTH, generator=g) * 2).to(device, dtype)
        dy = torch.randn(tokens, WIDTH, generator=g).to(device, dtype)
        if kind == "kernel":
            return lambda: (torch.ops.coconut.gelu_tanh(x), torch.ops.coconut.gelu_tanh_backward(dy, x))
        if kind == "aten":
            return lambda: (F.gelu(x, approximate="tanh"), torch.ops.aten.gelu_backward(dy, x, approximate="tanh"))
        return lambda: (torch.neg(x), torch.mul(dy, x))
    return setup


def cases(settings):
    device, dtype, quick = settings["device"], settings["dtype"], settings["quick"]
    if device.type != "cpu" or dtype != torch.float32:
        return  # a CPU float32 kernel: on a GPU torch's own GELU serves
    sizes = settings["sizes"] or ([340] if quick else [340, 2720])
    reps = 3 if quick else 15
    for tokens in sizes:
        for provider, kind, role in (("gelu_tanh", "kernel", "impl"), ("aten (torch)", "aten", "reference"),
                                     ("read and write the same bytes", "floor", "floor")):
            yield Case("gelu_fwd_bwd", provider, "tokens", tokens, _step(kind, tokens, device, dtype), role=role,
                       reps=reps, warmup=3, extra={"memory": False})
    yield from _end_to_end(settings, quick)


def _end_to_end(settings, quick):
    device, dtype = settings["device"], settings["dtype"]
    size = settings.get("model") or ("gpt2-tiny" if quick else "gpt2-4x256")
    q_len, thoughts, B = ((40, 60), 2, 2) if quick else ((280, 330), 6, 8)
    state: dict = {}  # the models, built once

    def setup(flag):
        def make():
            s = suite_models(state, size, device, dtype)
            b = collate(prosqa_examples(B, VOCAB, n_latents=thoughts, seed=B + thoughts, q_len=q_len), VOCAB,
                        device=device)
            return switched(gl.set_enabled, gl.enabled, flag, train_step(s["lm"], b))
        return make

    for name, flag, role in (("train step", True, "impl"), ("train step, gelu_tanh off", False, "reference")):
        yield Case(f"gelu_train_step_{thoughts}_thoughts", name, "B", B, setup(flag), role=role,
                   reps=2 if quick else 7, extra={"memory": False})


SCENARIO = register(Scenario("gelu", "GPT-2's activation (tanh GELU) and its gradient on (tokens, 1024), fp32 CPU",
                             cases, x_label="tokens"))
