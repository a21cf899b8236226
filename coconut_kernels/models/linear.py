"""Linear layers whose weight gradient is taken once per training step instead of once per pass.

A COCONUT step runs every layer once per pass: a long prefix pass, then one-row latent passes, then the
rest. Autograd would give each pass its own weight gradient dW_p = dY_p^T X_p: for a one-row pass that is a
rank-B product that writes the whole (out, in) matrix, and then an addition of that matrix into the sum.
With the batch of B = 8 rows of a latent pass, those weight-sized writes cost more than the products.

Inside `batched_weight_grads()`, every `Linear` of the models defers its weight (and bias) gradient: the
backward of each pass computes only the input gradient and keeps the pass's (X_p, dY_p) rows; one autograd
node per layer, which runs after the backward of every pass that used the layer, computes
dW = sum_p dY_p^T X_p as one product over the concatenated small passes (plus one product per large pass).
The rows kept are the inputs autograd saves anyway and the output gradients of the passes between a layer's
last and first use in backward, which are the small ones.

Outside the context (and for frozen weights, or with grad disabled) `Linear` is `nn.Linear`.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "batched_weight_grads"]

# A pass with at least this many rows gets its own product; smaller ones are concatenated into one.
_OWN_PRODUCT_ROWS = 512

_SESSION: ContextVar["_Session | None"] = ContextVar("coconut_batched_weight_grads", default=None)


class Linear(nn.Linear):
    """nn.Linear whose weight gradient is batched across passes inside `batched_weight_grads()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = _SESSION.get()
        if session is None or not torch.is_grad_enabled() or not self.weight.requires_grad or \
                (self.bias is not None and not self.bias.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return session.linear(self, x)


@contextmanager
def batched_weight_grads():
    """Defer the weight gradients of every `Linear` called inside the block to one product per layer in
    backward. Values and gradients are those of nn.Linear; the backward may run after the block exits."""
    token = _SESSION.set(_Session())
    try:
        yield
    finally:
        _SESSION.reset(token)


class _Entry:
    """One layer's deferred gradient: its weight/bias aliases (outputs of _Gather, which every pass uses)
    and the (X, dY) rows of each pass, filled during backward."""

    __slots__ = ("weight", "bias", "rows", "casts")

    def __init__(self):
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.casts: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def cast(self, dtype: torch.dtype):
        """The weight and bias in the autocast dtype, cast once per step (not once per pass)."""
        if dtype not in self.casts:
            b = None if self.bias is None else self.bias.detach().to(dtype)
            self.casts[dtype] = (self.weight.detach().to(dtype), b)
        return self.casts[dtype]


class _Session:
    def __init__(self):
        self.entries: dict[int, _Entry] = {}

    def linear(self, module: Linear, x: torch.Tensor) -> torch.Tensor:
        entry = self.entries.get(id(module))
        if entry is None:
            entry = _Entry()
            entry.weight, entry.bias = _Gather.apply(entry, module.weight, module.bias)
            self.entries[id(module)] = entry
        return _DeferredLinear.apply(x, entry.weight, entry.bias, entry)


class _Gather(torch.autograd.Function):
    """Identity on (weight, bias); its backward runs once every pass that used the aliases has run its
    backward, and returns the summed gradients from the rows they kept."""

    @staticmethod
    def forward(ctx, entry, weight, bias):
        ctx.entry = entry
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), (None if bias is None else bias.view_as(bias))

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        # grad_weight / grad_bias: None (the passes return no gradient for the aliases)
        rows, ctx.entry.rows = ctx.entry.rows, []
        if not rows:
            return None, None, None
        big = [r for r in rows if r[0].shape[0] >= _OWN_PRODUCT_ROWS]
        small = [r for r in rows if r[0].shape[0] < _OWN_PRODUCT_ROWS]
        if small:
            big.append((torch.cat([x for x, _ in small]), torch.cat([dy for _, dy in small])))
        dw = db = None
        for x, dy in big:
            dw = dy.t() @ x if dw is None else dw.addmm_(dy.t(), x)
            if ctx.needs_input_grad[2]:
                s = dy.sum(0)
                db = s if db is None else db.add_(s)
        return None, dw, db


class _DeferredLinear(torch.autograd.Function):
    """y = x W^T + b. Backward returns the input gradient only and keeps (x, dy) for _Gather."""

    @staticmethod
    def forward(ctx, x, weight, bias, entry):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
            weight, bias = entry.cast(dtype)
            x = x.to(dtype)
        y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.entry = entry
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        ctx.entry.rows.append((x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])))
        return dx, None, None, None
