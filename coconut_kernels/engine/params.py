"""A request's parameters (`SamplingParams`) and its results (`Sample`, `RequestOutput`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .. import validation
from ..errors import CoconutError


@dataclass
class SamplingParams:
    """How one prompt is generated.

    n: samples of the prompt (one prefill, the cache forked into n slots); max_tokens: new tokens per sample;
    do_sample / temperature / top_k / top_p: as `LatentLM.generate` (greedy by default); stop: the thought's
    stop rule as `LatentLM.generate`'s `stop` (None: the prompt's <latent> count); feedback: None (the
    model's mode) or a mode name / Feedback module; stop_token_ids: tokens that end a sample besides the
    model's EOS; stop_strings: strings that end a sample once its decoded text contains one (the engine needs
    a tokenizer; the text is cut before the string, as OpenAI's `stop`); seed: sample i draws from
    torch.Generator().manual_seed(seed + i) (None: torch's global generator, not reproducible);
    return_latents: keep the vector fed at every latent step and what it reads as (the `latent_topk` most
    likely tokens of the LM head on the state it was made from, as `LatentLM.generate`); logprobs: report each
    token's log-probabilities (Sample.logprobs and model_logprobs; False leaves them empty and saves a pass over
    the step's logits, as `generate` reports none).
    """
    n: int = 1
    max_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: object = None
    feedback: object = None
    stop_token_ids: tuple = ()
    stop_strings: tuple = ()
    seed: int | None = None
    return_latents: bool = False
    latent_topk: int = 5
    logprobs: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """From a mapping of field names; an unknown name is a CoconutError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CoconutError(f"unknown sampling parameter(s) {unknown}: expected some of {sorted(names)}")
        return cls(**d)

    def check(self, vocab_size: int, max_batch: int) -> None:
        """Types and ranges of every field (CoconutError naming the field)."""
        validation.check_int(self.n, "n", low=1, high=max_batch)
        validation.check_sampling(vocab_size=vocab_size, max_new_tokens=self.max_tokens, do_sample=self.do_sample,
                                  temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                  eos_token_id=None, pad_token_id=None, return_latents=self.return_latents,
                                  use_cuda_graph=False, generator=None, stop=self.stop,
                                  max_new_tokens_name="max_tokens")
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise CoconutError(f"stop_token_ids must be a tuple or list of token ids, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            validation.check_int(t, "stop_token_ids[i]", low=0, high=vocab_size - 1)
        if not isinstance(self.stop_strings, (tuple, list)) or not all(
                isinstance(x, str) and x for x in self.stop_strings):
            raise CoconutError(f"stop_strings must be a tuple or list of non-empty strings, got {self.stop_strings!r}")
        validation.check_int(self.latent_topk, "latent_topk", low=1, high=vocab_size)
        if not isinstance(self.logprobs, bool):
            raise CoconutError(f"logprobs must be a bool, got {self.logprobs!r}")
        if self.seed is not None:
            validation.check_int(self.seed, "seed", low=0)


@dataclass
class Sample:
    """One generated answer. logprobs: log-probability of each token under the distribution it was drawn from
    (temperature / top-k / top-p applied; 0.0 for greedy, a point mass); model_logprobs: under the raw model
    (softmax of the logits); both empty when the request asked for no log-probs. latents (n_latents, d): the
    vector fed at every latent step; latent_states (n_latents, d): the normed hidden state each was made from
    ("hidden" feedback: the same vector); latent_topk_ids and latent_topk_probs (n_latents, latent_topk): the
    tokens that state reads as under the LM head (return_latents).
    text: the decoded answer, cut before the stop string that ended it (set when the request has stop_strings)."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    model_logprobs: list[float] = field(default_factory=list)
    n_latents: int = 0
    latents: torch.Tensor | None = None
    latent_states: torch.Tensor | None = None
    latent_topk_ids: torch.Tensor | None = None
    latent_topk_probs: torch.Tensor | None = None
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS or a stop id), "length" (max_tokens) or "error"


@dataclass
class RequestOutput:
    """A finished request: its samples (n of them, in seed order), or the error that failed it."""
    request_id: int
    prompt_ids: list[int]
    samples: list[Sample]
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or all(s.finish_reason is not None for s in self.samples)
