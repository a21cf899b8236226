"""argmax_last on the CPU: the greedy token of a decode step, argmax over a vocabulary-wide logits row, against
torch's `x.argmax(-1)` and the floor: `x.amax(-1)`, the same bytes read once by a plain reduction, all in one
run, on (rows, 50257) float32 logits (GPT-2's vocabulary; 8 and 32 rows: a static batch, the engine's slots).

Then what it changes end to end, side by side in the same run: greedy `generate` of 32 ProsQA-shaped prompts
(6 thoughts, 64 answer tokens) with the kernel and with it switched off (`ops.argmax.set_enabled(False)`).

    python -m coconut_kernels.bench --scenario argmax
"""
from __future__ import annotations

import torch

from coconut_kernels import LatentLM

from ..ops import argmax as am
from .harness import Case, Scenario, register, switched
from .workloads import Special, collate, make_models, prosqa_examples

VOCAB = 50257
NEVER = -1  # an EOS id no token has: every example decodes max_new_tokens


def _step(kind: str, rows: int, device, dtype):
    def setup():
        g = torch.Generator().manual_seed(rows)
        x = (torch.randn(rows, VOCAB, generator=g) * 4).to(device, dtype)
        if kind == "kernel":
            return lambda: torch.ops.coconut.argmax_last(x)
        if kind == "aten":
            return lambda: x.argmax(-1)
        return lambda: x.amax(-1)
    return setup


def cases(settings):
    device, dtype, quick = settings["device"], settings["dtype"], settings["quick"]
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return  # a CPU kernel: on a GPU torch's own argmax serves
    sizes = settings["sizes"] or ([8] if quick else [8, 32])
    reps = 5 if quick else 30
    for rows in sizes:
        for provider, kind, role in (("argmax_last", "kernel", "impl"), ("aten (torch)", "aten", "reference"),
                                     ("amax: the same bytes read once", "floor", "floor")):
            yield Case("argmax", provider, "rows", rows, _step(kind, rows, device, dtype), role=role, reps=reps,
                       warmup=3, extra={"memory": False})
    yield from _end_to_end(settings, quick)


def _end_to_end(settings, quick):
    device, dtype = settings["device"], settings["dtype"]
    size = settings.get("model") or ("gpt2-tiny" if quick else "gpt2-4x256")
    B, q_len, answer = (4, (40, 60), 8) if quick else (32, (280, 330), 64)
    state: dict = {}

    def setup(flag):
        def make():
            if not state:
                _, ours = make_models(size, VOCAB, dtype=dtype, device=device)
                sp = Special.for_vocab(VOCAB)
                state["lm"] = LatentLM(ours, sp.latent, sp.bot, sp.eot, NEVER)
                prompts = prosqa_examples(B, VOCAB, n_latents=6, seed=B, with_labels=False, q_len=q_len)
                state["batch"] = collate(prompts, VOCAB, layout="ragged", device=device)
            lm, b = state["lm"], state["batch"]
            return switched(am.set_enabled, am.enabled, flag,
                            lambda: lm.generate(b["input_ids"], b["attention_mask"], max_new_tokens=answer))
        return make

    for name, flag, role in (("generate", True, "impl"), ("generate, argmax_last off", False, "reference")):
        yield Case(f"argmax_greedy_generate_{answer}_tokens", name, "B", B, setup(flag), role=role,
                   reps=2 if quick else 5, extra={"memory": False})


SCENARIO = register(Scenario("argmax", "greedy argmax over a (rows, 50257) logits batch, fp32 CPU", cases,
                             x_label="rows"))
