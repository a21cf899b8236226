"""Generation at ProsQA shape (6 latents, 16 answer tokens): LatentLM.generate vs the reference vs the floor.

- coconut_kernels: batched `generate` (ragged prefill, one step per latent, KV-cached answer decoding;
  CUDA graphs on a GPU);
- reference: the reference `generate`, one example at a time, no KV cache after the latent phase, run over
  min(B, 4) examples (its throughput does not depend on B: it never batches);
- floor: a plain KV-cached decode of the same length with the same model (prefill up to <bot>, then
  6 + 1 + 16 token steps fed their own tokens, no feedback);
- transformers: what users run today, `model.generate` of the same `transformers` GPT2LMHeadModel with its KV
  cache, greedy, over the floor's prompts left-padded into one batch, 6 + 1 + 16 new tokens each.
Rate: (latents + <eot> + answer tokens) per second. EOS is disabled so every example decodes 16 tokens.
"""
from __future__ import annotations

import pytest
import torch

from coconut_kernels import LatentLM

from .harness import Case, Scenario, register
from .reference_coconut import ReferenceCoconut
from .workloads import Special, collate, make_models, official_coconut, prosqa_examples

VOCAB = 50257
N_LATENTS, N_ANSWER = 6, 16
NEVER = -1  # an EOS id no token has


def _providers(size: str, B: int, device, dtype, graphs: bool = True, official: str | None = None,
               q_len=(280, 330)):
    state = {}
    steps = N_LATENTS + 1 + N_ANSWER

    def build():
        if not state:
            hf, ours = make_models(size, VOCAB, dtype=dtype, device=device)
            sp = Special.for_vocab(VOCAB)
            state["lm"] = LatentLM(ours, sp.latent, sp.bot, sp.eot, NEVER)
            state["ref"] = ReferenceCoconut(hf, sp.latent, sp.bot, sp.eot, NEVER)
            prompts = prosqa_examples(B, VOCAB, n_latents=N_LATENTS, seed=B, with_labels=False, q_len=q_len)
            state["prompts"] = collate(prompts, VOCAB, layout="ragged", device=device)
            # The floor's prompts stop at <bot>: the latents and <eot> become decode steps.
            plain = [{"input_ids": p["input_ids"][: p["input_ids"].index(sp.bot) + 1]} for p in prompts]
            state["plain"] = collate(plain, VOCAB, layout="ragged", device=device)
            state["hf"], state["hf_prompts"] = hf, left_padded(plain, sp.pad, device)
            state["floor"] = LatentLM(ours, sp.latent, sp.bot, sp.eot, NEVER, feedback="pause")
            if official:
                state["official"] = official_coconut(official, hf, sp, eos=NEVER)
        return state

    def ours():
        s = build()
        b = s["prompts"]
        return lambda: s["lm"].generate(b["input_ids"], b["attention_mask"], max_new_tokens=N_ANSWER,
                                        use_cuda_graph=graphs)

    def floor():
        s = build()
        b = s["plain"]
        return lambda: s["floor"].generate(b["input_ids"], b["attention_mask"], max_new_tokens=steps,
                                           use_cuda_graph=graphs)

    def transformers():
        s = build()
        ids, mask = s["hf_prompts"]
        # min_new_tokens keeps EOS out, so every example decodes exactly `steps` tokens.
        return lambda: s["hf"].generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                                        min_new_tokens=steps, do_sample=False, num_beams=1, use_cache=True,
                                        pad_token_id=Special.for_vocab(VOCAB).pad)

    def one_at_a_time(name):
        def setup():
            s = build()
            ids, mask = s["prompts"]["input_ids"], s["prompts"]["attention_mask"]
            rows = [ids[b, : int(mask[b].sum())][None] for b in range(min(B, 4))]
            gen = s[name].generate
            return lambda: [gen(r, torch.ones_like(r), max_new_tokens=N_ANSWER) for r in rows]
        return setup

    providers = [("coconut_kernels", "impl", ours, B * steps),
                 ("reference", "reference", one_at_a_time("ref"), min(B, 4) * steps),
                 ("floor", "floor", floor, B * steps),
                 ("transformers", "external", transformers, B * steps)]
    if official:
        providers.append(("official checkout", "other", one_at_a_time("official"), min(B, 4) * steps))
    return providers


def left_padded(prompts: list[dict], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the prompts left-padded to one length, as `transformers` generates."""
    n = max(len(p["input_ids"]) for p in prompts)
    ids = torch.tensor([[pad] * (n - len(p["input_ids"])) + p["input_ids"] for p in prompts], device=device)
    mask = torch.tensor([[0] * (n - len(p["input_ids"])) + [1] * len(p["input_ids"]) for p in prompts],
                        device=device)
    return ids, mask


def cases(settings: dict):
    device, dtype, quick = settings["device"], settings["dtype"], settings["quick"]
    size = settings.get("model") or ("gpt2-tiny" if quick else "gpt2-4x256")
    sizes = settings["sizes"] or ([1, 4] if quick else [1, 8, 32, 64] if device.type == "cuda" else [1, 8, 32])
    q_len = (40, 60) if quick else (280, 330)  # --quick: short prompts, a smoke run of the same code
    for B in sizes:
        for name, role, setup, tokens in _providers(size, B, device, dtype, official=settings["official"],
                                                    q_len=q_len):
            yield Case("generate", name, "B", B, setup, role=role, reps=2 if quick or name == "reference" else 3,
                       extra={"memory": False, "metric:tokens/s": (tokens, "tok/s")})
        if device.type == "cuda":
            for name, role, setup, tokens in _providers(size, B, device, dtype, graphs=False, q_len=q_len):
                if name in ("coconut_kernels", "floor"):
                    yield Case("generate", f"{name} (no CUDA graphs)", "B", B, setup, role="other", reps=3,
                               extra={"memory": False, "metric:tokens/s": (tokens, "tok/s")})


SCENARIO = register(Scenario("generate", "latents + 16 answer tokens per example, ProsQA prompts", cases))


@pytest.mark.parametrize("provider", ["coconut_kernels", "reference", "floor", "transformers"])
@pytest.mark.parametrize("B", [1, 8, 32, 64])
def test_generate(benchmark, provider, B):
    torch.set_num_threads(2)
    if provider == "reference" and B > 1:
        pytest.skip("the reference decodes one example at a time: its rate is measured at B=1")
    setup = {n: s for n, _, s, _ in _providers("gpt2-4x256", B, torch.device("cpu"), torch.float32)}[provider]
    benchmark.pedantic(setup(), rounds=3, warmup_rounds=1)
