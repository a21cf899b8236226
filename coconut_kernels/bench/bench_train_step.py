"""Training step (forward + backward) at ProsQA shape: LatentLM vs the reference algorithm vs the floor.

- coconut_kernels: `LatentLM` on this library's GPT-2 (ragged passes over one KVCache, fused feedback,
  loss over labelled rows only);
- reference: the reference algorithm on a `transformers` GPT-2 with the same weights (coconut_kernels/bench/
  reference_coconut.py: list-and-stack rebuild, concatenated caches, full-vocabulary logits);
- floor: one plain pass of LatentLM's own model over the same batch with the same loss (latents fed their
  token embedding: no sequential structure);
- transformers: what users run today, the same `transformers` GPT2LMHeadModel called on the same batch with
  labels (one pass, logits and cross-entropy over the whole vocabulary at every position), forward + backward.
Run: `python -m coconut_kernels.bench --scenario train_step [--sizes 8,32]`, or under pytest-benchmark.
"""
from __future__ import annotations

import pytest
import torch

from coconut_kernels import LatentLM

from .harness import Case, Scenario, register
from .reference_coconut import ReferenceCoconut
from .workloads import Special, collate, make_models, official_coconut, prosqa_examples

VOCAB = 50257


def _steps(size: str, B: int, n_latents: int, device, dtype, seed: int = 0, official: str | None = None,
           q_len=(280, 330)):
    """name -> (role, setup) for one point; the models are built once per point and shared."""
    state = {}

    def models():
        if not state:
            hf, ours = make_models(size, VOCAB, dtype=dtype, device=device, seed=seed)
            sp = Special.for_vocab(VOCAB)
            state["ref"] = ReferenceCoconut(hf, sp.latent, sp.bot, sp.eot, sp.eos)
            state["lm"] = LatentLM(ours, sp.latent, sp.bot, sp.eot, sp.eos)
            state["floor"] = LatentLM(ours, sp.latent, sp.bot, sp.eot, sp.eos, feedback="pause")
            if official:
                state["official"] = official_coconut(official, hf, sp)
            examples = prosqa_examples(B, VOCAB, n_latents=n_latents, seed=seed + B, q_len=q_len)
            state["batch"] = collate(examples, VOCAB, device=device)
            state["transformers"] = hf
        return state

    def make(name):
        def setup():
            s = models()
            module, batch = s[name], s["batch"]

            def step():
                module.zero_grad(set_to_none=True)
                if name == "transformers":
                    out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"], position_ids=batch["position_ids"])
                else:
                    out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
                loss = out[0] if isinstance(out, tuple) else out.loss  # (reference) / LatentOutput / Outputs
                loss.backward()
                return loss
            return step
        return setup

    providers = {"coconut_kernels": ("impl", make("lm")), "reference": ("reference", make("ref")),
                 "floor": ("floor", make("floor")), "transformers": ("external", make("transformers"))}
    if official:
        providers["official checkout"] = ("other", make("official"))
    return providers


def cases(settings: dict):
    device, dtype, quick = settings["device"], settings["dtype"], settings["quick"]
    size = settings.get("model") or ("gpt2-tiny" if quick else "gpt2-4x256")
    sizes = settings["sizes"] or ([2] if quick else [8, 32] if device.type == "cuda" else [4, 8])
    # Small batches repeat more (seconds per rep, and a noisier median); the reference at B=32 takes ~35-45 s a step.
    reps_for = (lambda B: 2) if quick else (lambda B: 7 if B <= 8 else 3)
    q_len = (40, 60) if quick else (280, 330)  # --quick: short questions, a smoke run of the same code
    for B in sizes:
        for name, (role, setup) in _steps(size, B, 6, device, dtype, official=settings["official"],
                                          q_len=q_len).items():
            yield Case("train_step", name, "B", B, setup, role=role, reps=reps_for(B), warmup=2)
    # The number of latents, at the smallest batch.
    if not settings["sizes"]:
        for k in ([1, 3] if quick else [1, 3, 6]):
            for name, (role, setup) in _steps(size, sizes[0], k, device, dtype, q_len=q_len).items():
                yield Case("train_step_latents", name, "latents", k, setup, role=role, reps=reps_for(sizes[0]))


SCENARIO = register(Scenario("train_step", "fwd+bwd of one COCONUT training step, ProsQA shape (T~350)", cases))


@pytest.mark.parametrize("provider", ["coconut_kernels", "reference", "floor", "transformers"])
@pytest.mark.parametrize("B", [8])
def test_train_step(benchmark, provider, B):
    torch.set_num_threads(2)
    role, setup = _steps("gpt2-4x256", B, 6, torch.device("cpu"), torch.float32)[provider]
    benchmark.pedantic(setup(), rounds=3, warmup_rounds=1)
