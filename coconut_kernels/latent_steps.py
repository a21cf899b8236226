"""The named steps that run a latent plan (`latent_plan`), shared by training (`LatentLM.forward`), `generate`
(`latent_decode`) and the schedules built on them: a pass's input rows, the latent step that writes fed
vectors into them, a pass over ragged rows through the cache, the next thought from a hidden state, the LM
head, and the loss over labelled rows.
"""
from __future__ import annotations

import torch

from .cache import KVCache
from .feedback import Feedback, HiddenFeedback
from .latent_plan import PassRows
from .loss import linear_cross_entropy
from .ops.argmax import argmax_last
from .ops.latent_attention import no_double_backward
from .ops.latent_feedback import latent_feedback
from .ops.skinny_linear import applies as skinny_linear_applies, kernel_linear


def head_logits(model, normed: torch.Tensor) -> torch.Tensor:
    """LM-head logits of final-normed hidden states, in fp32 (fp64 kept). A decode step's few rows on the CPU
    (no grad) go through the skinny kernel, which reads the (V, d) head once (`ops.skinny_linear`)."""
    weight, bias = model.lm_head_weight, model.lm_head_bias
    if skinny_linear_applies(normed, weight, bias):  # checked once: the kernel itself, not linear()
        return kernel_linear(normed, weight, bias)
    logits = normed @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits if logits.dtype == torch.float64 else logits.float()


class _RowsGrad:
    """The one (B * T, d) gradient buffer of an EmbedRows, shared by its gathers' backwards, and the autograd
    graph task that wrote it (a backward that raised half way leaves a partial sum for no one). Their ctx hold
    this, not the EmbedRows (no reference cycle through autograd's nodes)."""

    __slots__ = ("buf", "task", "__weakref__")

    def __init__(self):
        self.buf = self.task = None

    def take(self):
        """The buffer this backward wrote (None if none), emptied."""
        buf, self.buf = self.buf, None
        return buf if self.task == torch._C._current_graph_task_id() else None


class _EmbedSink(torch.autograd.Function):
    """embeds, read by every pass's gather: its backward runs after all of theirs (they are its consumers) and
    hands on the buffer they added their rows' gradients into."""

    @staticmethod
    def forward(ctx, embeds, shared):
        ctx.shared, ctx.shape = shared, embeds.shape
        ctx.set_materialize_grads(False)
        return embeds.view_as(embeds)

    @staticmethod
    def backward(ctx, grad):
        buf = ctx.shared.take()
        if buf is None:
            return grad, None
        buf = buf.view(ctx.shape)
        return (buf if grad is None else buf + grad), None


class _GatherRows(torch.autograd.Function):
    """Rows idx of src (B, T, d) flattened to (B * T, d): a pass's input. Its backward adds the rows' gradient
    into the shared buffer (index_add_) and returns none for src: _EmbedSink hands the sum on."""

    @staticmethod
    def forward(ctx, src, idx, shared, width):
        B, T, d = src.shape
        ctx.save_for_backward(idx)
        ctx.shared, ctx.shape = shared, (B * T, d)
        ctx.set_materialize_grads(False)
        return src.reshape(B * T, d).index_select(0, idx).view(B, width, d)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise no_double_backward("the latent passes' input rows")
        if grad is not None:
            (idx,) = ctx.saved_tensors
            shared, task = ctx.shared, torch._C._current_graph_task_id()
            if shared.buf is None or shared.task != task:
                shared.buf, shared.task = grad.new_zeros(ctx.shape), task
            shared.buf.index_add_(0, idx, grad.reshape(-1, ctx.shape[1]))
        return None, None, None, None


class EmbedRows:
    """The batch's token embeddings (B, T, d), looked up once per step, as the passes read them (`pass_input`).

    A gather per pass through autograd gives each pass a dense, zero-filled (B, T, d) gradient and autograd a
    (B, T, d) sum per pass: with many one-row latent passes, that is two full passes over the embeddings per
    thought. Here each pass's backward adds only its own rows' gradient into one buffer, handed to embeds once
    (the sum of the same per-row values: a batch position is read by one pass, the clamped pad columns carry
    zero gradient). Without grad it is a plain gather."""

    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds
        self.shape, self.device = embeds.shape, embeds.device
        self._src = None
        self._shared = None
        if embeds.requires_grad and torch.is_grad_enabled():
            self._shared = _RowsGrad()
            self._src = _EmbedSink.apply(embeds, self._shared)

    def gather(self, col: torch.Tensor) -> torch.Tensor:
        """(B, width, d): embeds[b, col[b, i]]."""
        B, width = col.shape
        if self._src is None:
            return self.embeds.gather(1, col[:, :, None].expand(B, width, self.shape[-1]))
        T = self.shape[1]
        idx = (col + torch.arange(B, device=col.device)[:, None] * T).reshape(-1)
        return _GatherRows.apply(self._src, idx, self._shared, width)


def pass_input(embeds: EmbedRows, rows: PassRows, fed: torch.Tensor | None) -> torch.Tensor:
    """A pass's input (B, width, d): the batch's token embeddings at the pass's columns, with the fed vectors
    at its latent rows. The embeddings are looked up once for the whole batch (a lookup per pass would cost a
    dense (V, d) gradient per pass in backward) and read through `EmbedRows` (one gradient buffer for all the
    passes, not a dense gradient per pass)."""
    x = embeds.gather(rows.col)
    if rows.feed_rows.numel():
        x = write_thoughts(x, fed, rows.feed_rows)
    return x


def write_thoughts(x: torch.Tensor, fed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The latent step: a copy of x (B, n, d) whose first row of the examples `rows` is their fed vector
    fed[b, 0] (fed (B, 1, d))."""
    zeros = torch.zeros_like(rows)
    return latent_feedback(x, fed.to(x.dtype), rows, zeros, zeros)


def forward_rows(model, x: torch.Tensor, cache: KVCache, count: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One pass: example b appends and computes its first count[b] rows of x (ragged, no compute on the rest)
    after what the cache holds, then the cache advances by count. Returns the last hidden states (pre-norm)."""
    n = count.int()
    h = model.forward_embeds(x, cache, position_ids=position_ids, new_seqlens=n)
    cache.advance(n)
    return h


def thought_vector(model, fb: Feedback, normed: torch.Tensor, logits: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """What feedback `fb` feeds for final-normed rows (n, d): logits (n, V) are needed when fb.needs_logits;
    its token is their argmax."""
    token = argmax_last(logits) if fb.needs_token else None
    return fb(normed, logits if fb.needs_logits else None, token, model.embed_tokens.weight, generator)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x unchanged in forward, its gradient times `scale` in backward (feedback_grad_scale: the hidden states a
    thought is made from; 1 returns x itself, 0 a detached x)."""
    if scale == 1.0 or not x.requires_grad:
        return x
    return x.detach() if scale == 0.0 else _ScaleGrad.apply(x, scale)


def feed_hidden(model, fb: Feedback, dst: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor,
                src: torch.Tensor) -> torch.Tensor:
    """A copy of dst (B, 1, d) with dst[b, 0] = fb(hidden[b, src]) for b in rows. The "hidden" mode is one
    fused op (gather, final norm, write); the others normalise the gathered rows first."""
    zeros = torch.zeros_like(rows)
    norm = model.final_norm
    if isinstance(fb, HiddenFeedback):
        return latent_feedback(dst, hidden, rows, zeros, src, norm=model.norm_kind, weight=norm.weight,
                               bias=getattr(norm, "bias", None), eps=norm.eps)
    normed = norm(hidden[rows, src])
    vec = thought_vector(model, fb, normed, head_logits(model, normed) if fb.needs_logits else None)
    # vec has a row per example in `rows` only (not all B): scattered by example, not through the batched op.
    return dst.index_copy(0, rows, vec.to(dst.dtype)[:, None])


def labelled_loss(model, hidden: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy, count) over the labelled rows the passes kept (pre-norm hidden states, their next
    tokens), in chunks: the (rows, V) logits are never held at once."""
    normed = model.final_norm(torch.cat(hidden))
    target = torch.cat(targets)
    return linear_cross_entropy(normed, model.lm_head_weight, target, model.lm_head_bias), target.numel()
