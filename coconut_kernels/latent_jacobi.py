"""The Jacobi schedule (PCCoT): every example's n thoughts computed together, T times, instead of one per pass.

After the prefill, iteration t = 1..T runs all n thought rows of every example in one pass; row s + i is fed the
feedback of the hidden state iteration t - 1 produced at row s + i - 1, row s always the prefill's last hidden
state. The first iteration has no previous one: its other thought rows keep the <latent> token's embedding (as the
prompt holds it). Iteration t makes rows s .. s + t - 1 exact, so with T >= n the thought rows, their K/V and
everything after them equal the sequential schedule's. The answer pass then runs the rows after the thoughts over
the last iteration's K/V.

The cache: the prefill is written once, and each iteration replaces the thought rows. Without grad the cache is
cropped back to the prefix and the rows re-appended. Under grad a pass's backward reads the K/V rows it wrote from
the cache buffer (and crop ends the generation whose backward it is), so no iteration may overwrite another's:
each iteration runs on a fork of the prefix cache (`KVCache.fork`: a copy of its rows whose backward hands the
gradient of the prefix K/V back to the prefill pass), and the answer pass continues the last iteration's fork.
"""
from __future__ import annotations

import torch

from .feedback import Feedback, HiddenFeedback
from .latent_plan import BatchPlan, JacobiFeeds, PassRows
from .latent_steps import (EmbedRows, feed_hidden, forward_rows, head_logits, pass_input, scale_grad,
                           thought_vector, write_thoughts)
from .ops.latent_feedback import latent_feedback


def feed_previous(model, fb: Feedback, x: torch.Tensor, hidden: torch.Tensor, feeds: JacobiFeeds,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of the thought rows x (B, n, d) with row feeds.dst[i] of example feeds.b[i] set to the feedback of
    hidden (B, n, d, pre-norm) one row up. The "hidden" mode is one fused op (gather, final norm, write)."""
    if not feeds.b.numel():
        return x
    src = feeds.dst - 1
    norm = model.final_norm
    if isinstance(fb, HiddenFeedback):
        return latent_feedback(x, hidden, feeds.b, feeds.dst, src, norm=model.norm_kind, weight=norm.weight,
                               bias=getattr(norm, "bias", None), eps=norm.eps)
    normed = norm(hidden[feeds.b, src])
    vec = thought_vector(model, fb, normed, head_logits(model, normed) if fb.needs_logits else None, generator)
    return x.index_put((feeds.b, feeds.dst), vec.to(x.dtype))


def run_jacobi(model, fb: Feedback, embeds: EmbedRows, position_ids: torch.Tensor | None, plan: BatchPlan,
               passes: list[PassRows], iters: int, keep, grad_scale: float = 1.0) -> None:
    """Run the Jacobi passes (latent_plan.jacobi_passes: prefill, thoughts, answer) with `iters` iterations of the
    thought pass; keep(h, rows) receives the hidden states of the prefill, the last iteration and the answer.
    grad_scale: LatentLM.forward's feedback_grad_scale, on every fed hidden state."""
    pre, thoughts, answer = passes
    B, d = plan.batch, embeds.shape[-1]
    grad = torch.is_grad_enabled()

    def pos(rows):
        return position_ids.gather(1, rows.col) if position_ids is not None else None

    cache = model.new_cache(B, max(plan.max_len, 1), device=embeds.device)
    h = forward_rows(model, pass_input(embeds, pre, None), cache, pre.count, pos(pre))
    keep(h, pre)
    first = feed_hidden(model, fb, h.new_zeros(B, 1, d), scale_grad(h, grad_scale), pre.produce, pre.src)
    x0 = write_thoughts(pass_input(embeds, thoughts, None), first, pre.produce)
    prefix = cache.seqlens.clone()
    feeds = JacobiFeeds.of(plan.n_latents, embeds.device)
    h = None
    prefix_cache = cache
    for t in range(iters):
        if grad:
            cache = prefix_cache.fork()
        elif t > 0:
            cache.crop(prefix)
        x = x0 if h is None else feed_previous(model, fb, x0, scale_grad(h, grad_scale), feeds)
        h = forward_rows(model, x, cache, thoughts.count, pos(thoughts))
    keep(h, thoughts)
    if answer.width:
        keep(forward_rows(model, pass_input(embeds, answer, None), cache, answer.count, pos(answer)), answer)


def jacobi_thoughts(model, fb: Feedback, cache, first: torch.Tensor, thought_embeds: torch.Tensor,
                    n_latents: torch.Tensor, iters: int, generator: torch.Generator | None = None):
    """generate's thought phase (no grad): after the prefill in `cache`, `iters` iterations over every example's
    n_latents[b] thought rows (n_latents on the host; thought_embeds (B, n, d): the <latent> embeddings; first
    (B, d): the first thought's vector), each cropping the cache back to the prefix and re-appending the rows.
    Returns the vectors
    fed to the thought rows by the last iteration (B, n, d), the (normed, logits) of its rows, and the hidden rows
    (before the final norm) of the iteration before it (None after one iteration), which the last iteration's
    vectors were made from."""
    x0 = thought_embeds.clone()
    x0[:, 0] = first.to(x0.dtype)
    feeds = JacobiFeeds.of(n_latents, x0.device)
    prefix = cache.seqlens.clone()
    count = n_latents.to(x0.device)
    x, h, before = x0, None, None
    for t in range(iters):
        if t > 0:
            cache.crop(prefix)
            x = feed_previous(model, fb, x0, h, feeds, generator)
            before = h
        h = forward_rows(model, x, cache, count)
    normed = model.final_norm(h)
    return x, normed, head_logits(model, normed), before
