"""Models and ProsQA-shaped batches shared by the training and generation scenarios.

Token ids are random (no tokenizer is needed) but the layout is ProsQA's: a ~300-token question, <bot>,
k latents, <eot>, then the answer ("### ... ." and <eos>), labels on the answer only; T is about 350.
The special ids sit at the top of the vocabulary, as when they are added to GPT-2's tokenizer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from coconut_kernels.data import AlignedCollator, RaggedCollator


@dataclass(frozen=True)
class Special:
    eos: int
    bot: int
    latent: int
    eot: int
    pad: int

    @classmethod
    def for_vocab(cls, vocab: int) -> "Special":
        # GPT-2's <|endoftext|> is the last id; the three markers follow it once added.
        return cls(eos=vocab - 4, bot=vocab - 3, latent=vocab - 2, eot=vocab - 1, pad=vocab - 4)


MODEL_SIZES = {
    # name: (n_layer, d_model, n_head)
    "gpt2-4x256": (4, 256, 4),
    "gpt2-small": (12, 768, 12),
    "gpt2-tiny": (2, 64, 4),
}


def make_models(size: str, vocab: int = 50257, n_positions: int = 1024, seed: int = 0, dtype=torch.float32,
                device="cpu"):
    """A transformers GPT-2 with random weights and this library's GPT-2 loaded from it (same weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from coconut_kernels.models import from_pretrained

    n_layer, d, n_head = MODEL_SIZES[size]
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=d, n_layer=n_layer, n_head=n_head,
                     bos_token_id=vocab - 4, eos_token_id=vocab - 4, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
    ours = from_pretrained(hf, dtype=dtype, device=device).eval()
    return hf, ours


def prosqa_examples(n: int, vocab: int, *, n_latents: int | list[int] = 6, q_len=(280, 330), answer_len=(7, 10),
                    seed: int = 0, with_labels: bool = True) -> list[dict]:
    """n training examples (or prompts, with_labels=False: question <bot> latents <eot>)."""
    sp = Special.for_vocab(vocab)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = n_latents[i % len(n_latents)] if isinstance(n_latents, list) else n_latents
        q = [rng.randrange(vocab - 4) for _ in range(rng.randint(*q_len))]
        head = q + [sp.bot] + [sp.latent] * k + [sp.eot]
        if not with_labels:
            out.append({"input_ids": head})
            continue
        ans = [rng.randrange(vocab - 4) for _ in range(rng.randint(*answer_len))] + [sp.eos]
        out.append({"input_ids": head + ans, "labels": [-100] * len(head) + ans})
    return out


def collate(examples: list[dict], vocab: int, layout: str = "aligned", device="cpu") -> dict:
    sp = Special.for_vocab(vocab)
    coll = (AlignedCollator if layout == "aligned" else RaggedCollator)(sp.pad, sp.latent)
    batch = coll(examples)
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels", "position_ids") if k in batch}


def official_coconut(path: str, hf_model, sp: Special, eos: int | None = None):
    """The `Coconut` class of a checkout of the reference repository at `path` (its coconut.py), wrapping the
    same transformers model. Its current coconut.py crops the cache through transformers' `Cache.layers` (runs
    with transformers 5.x); checkouts from before that change pass cache tuples and need transformers 4.46."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("official_coconut", Path(path) / "coconut.py")
    if spec is None or not (Path(path) / "coconut.py").exists():
        raise FileNotFoundError(f"--official {path}: no coconut.py there")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Coconut(hf_model, sp.latent, sp.bot, sp.eot, sp.eos if eos is None else eos)
