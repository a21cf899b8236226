"""What a latent step feeds back as the next input: COCONUT and its relatives differ only here.

A feedback maps the final-normed hidden state of the position before a latent (and, for the modes that
need them, that position's logits and sampled token) to the latent's input embedding. `LatentLM` uses
it in training and in `generate`; the "hidden" mode is fused into the `latent_feedback` op.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CoconutError
from .validation import check_int, check_real


class Feedback(nn.Module):
    """Base: `forward(normed, logits, token, embedding, generator) -> (n, d)`.

    normed (n, d): final-normed hidden states; logits (n, V) fp32 or None (only passed when
    `needs_logits`); token (n,) the token sampled from those logits (only when `needs_token`);
    embedding: the model's input embedding matrix (V, d)."""
    name = "base"
    needs_logits = False
    needs_token = False
    sequential = True  # False: the latent's input does not depend on earlier positions (one plain pass)


class HiddenFeedback(Feedback):
    """COCONUT: the final-normed last hidden state itself."""
    name = "hidden"

    def forward(self, normed, logits=None, token=None, embedding=None, generator=None):
        return normed


class ProjectedFeedback(Feedback):
    """CODI: a trainable Linear-GELU-Linear-LayerNorm projection of the hidden state."""
    name = "projected"

    def __init__(self, d_model: int, d_hidden: int | None = None, eps: float = 1e-5):
        super().__init__()
        check_int(d_model, "d_model", low=1)
        d_hidden = check_int(d_model if d_hidden is None else d_hidden, "d_hidden", low=1)
        check_real(eps, "eps", low=0.0)
        self.proj = nn.Sequential(nn.Linear(d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model),
                                  nn.LayerNorm(d_model, eps=eps))

    def forward(self, normed, logits=None, token=None, embedding=None, generator=None):
        return self.proj(normed.to(self.proj[0].weight.dtype))


def _gumbel(shape, device, generator):
    u = torch.rand(shape, device=device, generator=generator).clamp_(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))


class SoftFeedback(Feedback):
    """Soft Thinking: sum_i softmax(logits / temperature)_i * E_i over the top-k / top-p tokens, with optional
    Gumbel noise on the logits (scaled by `noise_scale`) or Dirichlet noise on the probabilities (concentration
    `noise_scale` * p)."""
    name = "soft"
    needs_logits = True

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, noise: str | None = None,
                 noise_scale: float = 1.0):
        super().__init__()
        if noise is not None and (not isinstance(noise, str) or noise not in ("gumbel", "dirichlet")):
            raise CoconutError(f"noise must be None, 'gumbel' or 'dirichlet', got {noise!r}")
        check_real(temperature, "temperature", low=0.0, low_open=True)
        check_int(top_k, "top_k", low=0)
        check_real(top_p, "top_p", low=0.0, high=1.0, low_open=True)
        check_real(noise_scale, "noise_scale", low=0.0, low_open=noise == "dirichlet")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.noise, self.noise_scale = noise, noise_scale

    def mixture(self, logits, embedding, generator=None):
        from .ops.soft_embedding import soft_embedding
        if self.noise == "gumbel":
            logits = logits + self.noise_scale * self.temperature * _gumbel(logits.shape, logits.device, generator)
        if self.noise == "dirichlet":
            # p' ~ Dirichlet(noise_scale * p) over the kept tokens, then sum_i p'_i E_i.
            _, p = soft_embedding(logits, embedding, temperature=self.temperature, top_k=self.top_k,
                                  top_p=self.top_p, return_probs=True)
            kept = p > 0
            alpha = (self.noise_scale * p).clamp_min(1e-6).double()
            g = torch._standard_gamma(alpha, generator=generator) * kept
            p = (g / g.sum(-1, keepdim=True).clamp_min(1e-300)).to(embedding.dtype)
            return p @ embedding
        return soft_embedding(logits, embedding, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def forward(self, normed, logits=None, token=None, embedding=None, generator=None):
        return self.mixture(logits, embedding, generator).to(normed.dtype)


class MixtureFeedback(SoftFeedback):
    """Mixture of Inputs: w * soft mixture + (1 - w) * E[token], with w the entropy of softmax(logits /
    temperature) normalised by log V (uncertain steps lean on the mixture, confident ones on the token)."""
    name = "mixture"
    needs_token = True

    def forward(self, normed, logits=None, token=None, embedding=None, generator=None):
        soft = self.mixture(logits, embedding, generator).float()
        logp = F.log_softmax(logits.float() / self.temperature, dim=-1)
        w = (-(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1]))[:, None]
        return (w * soft + (1 - w) * embedding[token].float()).to(normed.dtype)


class PauseFeedback(Feedback):
    """Pause tokens (the control): the latent token keeps its own learned embedding; nothing is fed back."""
    name = "pause"
    sequential = False

    def forward(self, normed, logits=None, token=None, embedding=None, generator=None):
        raise RuntimeError("pause feedback feeds nothing back")


MODES = {"hidden": HiddenFeedback, "projected": ProjectedFeedback, "soft": SoftFeedback,
         "mixture": MixtureFeedback, "pause": PauseFeedback}


def resolve_feedback(feedback, d_model: int) -> Feedback:
    """A Feedback from a mode name (`projected` gets a fresh d_model x d_model projection) or a module."""
    if isinstance(feedback, Feedback):
        return feedback
    if not isinstance(feedback, str) or feedback not in MODES:
        raise CoconutError(f"feedback must be one of {sorted(MODES)} or a Feedback module, got {feedback!r}")
    return MODES[feedback](d_model) if feedback == "projected" else MODES[feedback]()
