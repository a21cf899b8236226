"""Cross-entropy of the LM head over the labelled positions only, in chunks.

The caller gathers the hidden states whose label is not -100 (M rows, M << B*T); this computes
logits = hidden @ weight.T (+ bias) chunk by chunk and never holds more than one (chunk, V) block. The
gradients of hidden, weight and bias are computed during the forward, chunk by chunk (as Liger's fused
linear cross-entropy does), so backward only scales them: no logits are kept and none are recomputed.
"""
from __future__ import annotations

import torch

from .errors import CoconutError
from .ops.skinny_linear import linear
from .validation import check_int, check_tensor_args, host_checks

# Elements of one (chunk, V) logits block in fp32: 32M -> 128 MiB.
_BLOCK_ELEMENTS = 1 << 25


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    return chunk_size if chunk_size else max(1, _BLOCK_ELEMENTS // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, reduction, grad_enabled):
        M = hidden.shape[0]
        # No gradient work under no_grad (e.g. a validation loss): forward runs with grad mode off, so the
        # caller's mode comes in as an argument.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n_valid = (targets != -100).sum()
        # "mean" divides by the number of labelled rows, as F.cross_entropy(ignore_index=-100) does.
        scale = 1.0 / n_valid.clamp(min=1).to(acc) if reduction == "mean" else torch.ones((), dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # The (V, d) weight gradient is the first block's product, then accumulated in place: no zero-filled
        # buffer and no (V, d) temporary per block (each is a pass over V x d memory, ~51 MB for GPT-2 in fp32).
        grad_w = grad_b = None
        step = _chunk_rows(weight.shape[0], chunk_size)
        for start in range(0, M, step):
            h = hidden[start:start + step]
            t = targets[start:start + step]
            # A chunk of a few float32 CPU rows (a small batch's answer tokens) by the skinny kernel, which
            # streams the (V, d) head once instead of packing it for BLAS; otherwise F.linear.
            logits = linear(h, weight).to(acc)
            if bias is not None:
                logits += bias.to(acc)
            valid = t != -100
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if need_h or need_w or need_b:
                # d loss / d logits = softmax - onehot, on labelled rows only; reuse the logits block.
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
                g *= (valid.to(g.dtype) * scale)[:, None]
                if need_h:
                    grad_h[start:start + step] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w = g.T @ h.to(acc) if grad_w is None else grad_w.addmm_(g.T, h.to(acc))
                if need_b:
                    grad_b = g.sum(0) if grad_b is None else grad_b.add_(g.sum(0))
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        if need_b and grad_b is None:
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        # loss.backward() passes a 1: then the saved weight gradient is the answer and the (V, d) multiplication,
        # a pass over the LM head's size, is skipped. Read only on the CPU (on a GPU the read would sync).
        unit = grad_out.device.type == "cpu" and not grad_out.requires_grad and float(grad_out) == 1.0
        gw = _scaled(grad_w, grad_out, unit, w_dtype)
        gb = _scaled(grad_b, grad_out, unit, b_dtype)
        return gh, gw, gb, None, None, None, None


def _scaled(grad: torch.Tensor | None, grad_out: torch.Tensor, unit: bool, dtype) -> torch.Tensor | None:
    if grad is None:
        return None
    return grad.to(dtype) if unit else (grad * grad_out.to(grad.dtype)).to(dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, chunked over rows.

    hidden (M, d), weight (V, d), bias (V,) or None, targets (M,) int64 with -100 for ignored rows (their range
    is checked for CPU tensors, for CUDA ones under COCONUT_DEBUG=1).
    reduction "mean" (over rows whose target is not -100, 0 when there are none) or "sum". Logits are
    formed in the weight's dtype and reduced in fp32 (fp64 for fp64 inputs). Never materialises more than one (chunk, V) block;
    chunk_size defaults to 32M / V rows. Differentiable w.r.t. hidden, weight and bias (the gradients are
    computed in the forward, so call backward at most once).
    """
    check_tensor_args(("bias",), hidden=hidden, weight=weight, targets=targets, bias=bias)
    if not isinstance(reduction, str) or reduction not in ("mean", "sum"):
        raise CoconutError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None:
        check_int(chunk_size, "chunk_size", low=1)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise CoconutError(f"hidden must be (M, d) and weight (V, d) with the same d, got {tuple(hidden.shape)} "
                           f"and {tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise CoconutError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_floating_point()):
        raise CoconutError(f"bias must be a float ({weight.shape[0]},) tensor (weight's V), got {bias.dtype} "
                           f"{tuple(bias.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise CoconutError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise CoconutError(f"targets must be int64 or int32, got {targets.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise CoconutError(f"{name} must be on hidden's device ({hidden.device}), got {t.device}")
    if host_checks(targets):
        bad = ((targets < 0) | (targets >= weight.shape[0])) & (targets != -100)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise CoconutError(f"targets[{i}] = {int(targets[i])} is out of range: expected -100 or a class in "
                               f"[0, {weight.shape[0]})")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, reduction, torch.is_grad_enabled())
