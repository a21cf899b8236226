"""Linear layers whose weight gradient is taken once per training step instead of once per pass.

A COCONUT step runs every layer once per pass: a long prefix pass, then one-row latent passes, then the
rest. Autograd would give each pass its own weight gradient dW_p = dY_p^T X_p: for a one-row pass that is a
rank-B product that writes the whole (out, in) matrix, and then an addition of that matrix into the sum.
With the batch of B = 8 rows of a latent pass, those weight-sized writes cost more than the products.

Inside `batched_weight_grads()`, every `Linear` of the models defers its weight (and bias) gradient: the
backward of each pass computes only the input gradient; a large pass's dY^T X is taken there and then, a small
pass's (X, dY) rows are kept (the inputs autograd saves anyway, and their output gradients). One autograd node
per layer, which runs after the backward of every pass that used the layer, multiplies the kept rows as one
concatenated product and returns dW = sum_p dY_p^T X_p (and the bias gradient).
A backward that does not reach the weights (autograd.grad with respect to inputs only) keeps nothing, and a
double backward adds the second-order gradient that reaches the weight through dx = dy W (except through the
cached attention, whose backward raises under create_graph=True).

Outside the context (and for frozen weights, or with grad disabled) `Linear` is `nn.Linear`.

`embedding(ids, module)` defers an nn.Embedding's gradient likewise (GPT-2's learned positions, looked up once per
pass): each pass keeps its (ids, dY) rows and the layer's node adds them all into one (V, d) gradient, where
autograd would zero-fill a (V, d) gradient per pass and add each into the sum (the suite's model, B=1, one thread,
minimum of 15 steps alternated in one process: one more thought 4.3 -> 4.1 ms).

`mlp(x, fc, proj, act)` is a block's feed-forward, proj(act(fc(x))), and `attention(x, qkv, out, cache, ...)` its
attention, out(attend(split(qkv(x)))) through the KV cache. Inside the context each is one autograd node
(forward and backward of both projections and what lies between, weight gradients deferred as above) instead of
five or more: a one-row pass is little work in many small ops (A/B at B=8, the 4-layer model: a few ms less per
step, near the machine's noise; measured at commit 40eaec3, its record in git history). Under autocast, with a
frozen projection, or where hooks or an overridden forward/attend must run, they are the plain compositions.

Consequences to know: with DistributedDataParallel every weight gradient arrives at the end of the backward, so
DDP cannot overlap its all-reduce with the backward of the later layers; the aliases of a layer's weight are
taken once per forward, so FSDP units that reshard their parameters between passes of one forward are not
supported (the trainer wraps the model as one unit).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import AttendedPass, KVCache
from ..ops.gelu import gelu_tanh, gelu_tanh_backward
from ..ops.latent_attention import check_dropout_args, no_double_backward
from ..ops.skinny_linear import input_grad, linear

__all__ = ["Linear", "batched_weight_grads", "embedding", "mlp", "attention", "ACTIVATIONS"]

# A pass with at least this many rows gets its own product; smaller ones are concatenated into one.
_OWN_PRODUCT_ROWS = 512

_SESSION: ContextVar["_Session | None"] = ContextVar("coconut_batched_weight_grads", default=None)


class Linear(nn.Linear):
    """nn.Linear whose weight gradient is batched across passes inside `batched_weight_grads()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = _SESSION.get()
        if session is None or not torch.is_grad_enabled() or not _trainable(self):
            return linear(x, self.weight, self.bias)  # the skinny kernel on a few CPU rows without grad
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
    """One layer's deferred gradient, filled during backward: the (X, dY) rows of the small passes, the summed
    products of the large ones, and the weight cast to the autocast dtype (once per step, not once per pass).
    It holds no alias of the weight: a tensor whose grad_fn is the _Gather node that holds this entry would
    close a reference cycle through autograd's C++ nodes, which the garbage collector cannot see."""

    __slots__ = ("rows", "dw", "db", "casts")

    def __init__(self):
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dw = self.db = None
        self.casts: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def cast(self, weight, bias, dtype: torch.dtype):
        if dtype not in self.casts:
            self.casts[dtype] = (weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
        return self.casts[dtype]

    def add(self, x: torch.Tensor, dy: torch.Tensor, with_bias: bool) -> None:
        """Take one pass's rows: a large pass's product now (its rows are not kept), a small one's later."""
        if x.shape[0] < _OWN_PRODUCT_ROWS:
            self.rows.append((x, dy))
        else:
            self.accumulate(x, dy, with_bias)

    def clear(self) -> None:
        """Drop the kept rows, the summed products and the casts (the step's backward is done with them)."""
        self.rows, self.dw, self.db = [], None, None
        self.casts.clear()

    def accumulate(self, x: torch.Tensor, dy: torch.Tensor, with_bias: bool) -> None:
        """dw += dy^T x, db += sum(dy)."""
        self.dw = dy.t() @ x if self.dw is None else self.dw.addmm_(dy.t(), x)
        if with_bias:
            s = dy.sum(0)
            self.db = s if self.db is None else self.db.add_(s)


class _EmbeddingEntry(_Entry):
    """An embedding's deferred gradient: the passes' (ids, dY) rows, added into one (V, d) gradient."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        self.shape = shape

    def add(self, ids: torch.Tensor, dy: torch.Tensor, with_bias: bool) -> None:
        self.rows.append((ids, dy))

    def accumulate(self, ids: torch.Tensor, dy: torch.Tensor, with_bias: bool) -> None:
        """dw[ids[i]] += dy[i]."""
        if self.dw is None:
            self.dw = dy.new_zeros(self.shape)
        self.dw.index_add_(0, ids, dy)


class _Session:
    def __init__(self):
        self.entries: dict[int, tuple[_Entry, torch.Tensor, torch.Tensor | None]] = {}

    def entry(self, module: nn.Module, make=_Entry) -> tuple[_Entry, torch.Tensor, torch.Tensor | None]:
        """The layer's entry (made by `make()`) and the aliases of its weight and bias that this step's passes
        use."""
        found = self.entries.get(id(module))
        if found is None:
            entry = make()
            found = (entry, *_Gather.apply(entry, module.weight, getattr(module, "bias", None)))
            self.entries[id(module)] = found
        return found

    def linear(self, module: Linear, x: torch.Tensor) -> torch.Tensor:
        entry, weight, bias = self.entry(module)
        return _DeferredLinear.apply(x, weight, bias, entry)

    def abandon(self) -> None:
        """Drop every entry's kept rows: a backward that stops with an error never runs the _Gather nodes that would,
        and rows kept by a double backward hold graphs that reach back to the entries (a cycle the gc cannot see)."""
        for entry, _, _ in self.entries.values():
            entry.clear()


def _trainable(module: Linear) -> bool:
    return module.weight.requires_grad and (module.bias is None or module.bias.requires_grad)


def _give_rows(gather, entry: _Entry, x: torch.Tensor, dy: torch.Tensor, with_bias: bool) -> None:
    """A backward's (input, output gradient) rows of one layer to its entry, when this backward runs the layer's
    _Gather node (else no node would take them: e.g. a gradient w.r.t. the inputs only)."""
    if _in_this_backward(gather):
        entry.add(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), with_bias)


def _in_this_backward(node) -> bool:
    """Whether the running backward will execute `node` (False for e.g. autograd.grad w.r.t. inputs only)."""
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # not in a backward of the engine: assume it will
        return True


class _Gather(torch.autograd.Function):
    """Identity on (weight, bias); its backward runs once every pass that used the aliases has run its
    backward, and returns the summed gradients from what they kept."""

    @staticmethod
    def forward(ctx, entry, weight, bias):
        ctx.entry = entry
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), (None if bias is None else bias.view_as(bias))

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        # grad_weight / grad_bias: None, except in a double backward (the aliases in dx = dy @ W's graph)
        entry = ctx.entry
        if entry.rows:
            xs, dys = zip(*entry.rows)
            entry.accumulate(torch.cat(xs), torch.cat(dys), ctx.needs_input_grad[2])
        dw, db = entry.dw, entry.db
        entry.clear()
        if grad_weight is not None:
            dw = grad_weight if dw is None else dw + grad_weight
        if grad_bias is not None:
            db = grad_bias if db is None else db + grad_bias
        return None, dw, (db if ctx.needs_input_grad[2] else None)


class _DeferredLinear(torch.autograd.Function):
    """y = x W^T + b. Backward returns the input gradient only and gives (x, dy) to the layer's entry."""

    @staticmethod
    def forward(ctx, x, weight, bias, entry):
        ctx.gather = weight.grad_fn  # the layer's _Gather node
        ctx.autocast = False
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
            weight, bias = entry.cast(weight, bias, dtype)
            x = x.to(dtype)
            ctx.autocast = True
        y = linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.entry, ctx.with_bias = entry, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        if ctx.autocast and torch.is_grad_enabled():
            raise RuntimeError("double backward (create_graph=True) through batched_weight_grads() under autocast "
                               "is not supported: the weight cast is not differentiable; run the step outside "
                               "batched_weight_grads() or without autocast")
        dy = dy.to(weight.dtype)
        dx = input_grad(dy, weight) if ctx.needs_input_grad[0] else None
        _give_rows(ctx.gather, ctx.entry, x, dy, ctx.with_bias)
        return dx, None, None, None


# ---- embeddings ------------------------------------------------------------------------------------------------


def embedding(ids: torch.Tensor, module: nn.Embedding) -> torch.Tensor:
    """module(ids); inside batched_weight_grads() its weight gradient is deferred (see the module docstring) when
    the module is a plain nn.Embedding (no padding_idx, max_norm, scale_grad_by_freq, sparse gradient, hooks or
    overridden forward) with a trainable weight."""
    session = _SESSION.get()
    if session is None or not torch.is_grad_enabled() or not _plain_embedding(module):
        return module(ids)
    entry, weight, _ = session.entry(module, lambda: _EmbeddingEntry(tuple(module.weight.shape)))
    return _DeferredEmbedding.apply(ids, weight, entry)


def _plain_embedding(m: nn.Module) -> bool:
    return (type(m) is nn.Embedding and m.weight.requires_grad and m.padding_idx is None and m.max_norm is None
            and not m.scale_grad_by_freq and not m.sparse and not (m._forward_hooks or m._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))


class _DeferredEmbedding(torch.autograd.Function):
    """weight[ids]. Backward gives (ids, dY) to the layer's entry; under create_graph it returns the (differentiable)
    dense gradient instead, which the layer's _Gather node adds."""

    @staticmethod
    def forward(ctx, ids, weight, entry):
        ctx.gather, ctx.entry = weight.grad_fn, entry
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        d = dy.shape[-1]
        if torch.is_grad_enabled():  # double backward: the gradient as a graph of dy
            return None, dy.new_zeros(ctx.entry.shape).index_add(0, ids.reshape(-1), dy.reshape(-1, d)), None
        if _in_this_backward(ctx.gather):
            ctx.entry.add(ids.reshape(-1), dy.reshape(-1, d), False)
        return None, None, None


# ---- the feed-forward as one node ------------------------------------------------------------------------------


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _silu_backward(da: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():  # aten's silu_backward has no derivative: the composite for double backward
        s = torch.sigmoid(h)
        return da * s * (1 + h * (1 - s))
    return torch.ops.aten.silu_backward(da, h)


def _swiglu_backward(da: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return torch.cat([_silu_backward(da * up, gate), da * F.silu(gate)], dim=-1)


# name -> (act(h), d act / dh given (dA, h)); each backward is itself differentiable (double backward)
ACTIVATIONS = {
    "gelu_tanh": (gelu_tanh, gelu_tanh_backward),  # CPU float32: the kernel (ops/gelu.py), else aten's
    "gelu": (F.gelu, lambda da, h: torch.ops.aten.gelu_backward(da, h)),
    "relu": (F.relu, lambda da, h: da * (h > 0).to(da.dtype)),
    "silu": (F.silu, _silu_backward),
    "swiglu": (_swiglu, _swiglu_backward),  # h = [gate, up]: silu(gate) * up
}


def _plain_module(m: nn.Module) -> bool:
    """No forward hooks and no overridden forward: calling the module is F.linear on its parameters."""
    return type(m).forward is Linear.forward and not (m._forward_hooks or m._forward_pre_hooks)


def _fused_session(x: torch.Tensor, *layers: Linear) -> "_Session | None":
    """The session when a fused node may run: grad on, no autocast, every layer trainable and plain (a fused node
    never calls the modules, so their hooks or overrides would be skipped), no global module hooks."""
    session = _SESSION.get()
    if session is None or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or \
            not all(_trainable(m) and _plain_module(m) for m in layers) or \
            nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    return session


def mlp(x: torch.Tensor, fc: Linear, proj: Linear, act: str) -> torch.Tensor:
    """proj(ACTIVATIONS[act][0](fc(x))): one autograd node inside batched_weight_grads() (see the module
    docstring)."""
    session = _fused_session(x, fc, proj)
    if session is None:
        return proj(ACTIVATIONS[act][0](fc(x)))
    e1, w1, b1 = session.entry(fc)
    e2, w2, b2 = session.entry(proj)
    return _DeferredMLP.apply(x, w1, b1, w2, b2, e1, e2, act)


class _DeferredMLP(torch.autograd.Function):
    """y = act(x W1^T + b1) W2^T + b2. Backward returns the input gradient only and gives each projection's
    (input, output gradient) rows to its entry, as _DeferredLinear does."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, e1, e2, act):
        h = linear(x, w1, b1)
        a = ACTIVATIONS[act][0](h)
        ctx.save_for_backward(x, h, a, w1, b1, w2)
        ctx.entries, ctx.gathers, ctx.act = (e1, e2), (w1.grad_fn, w2.grad_fn), act
        ctx.with_bias = (b1 is not None, b2 is not None)
        return linear(a, w2, b2)

    @staticmethod
    def backward(ctx, dy):
        x, h, a, w1, b1, w2 = ctx.saved_tensors
        forward_act, backward_act = ACTIVATIONS[ctx.act]
        if torch.is_grad_enabled():  # double backward: recompute h and a on the graph of x and the weights
            h = F.linear(x, w1, b1)
            a = forward_act(h)
        dh = backward_act(input_grad(dy, w2), h)
        dx = input_grad(dh, w1) if ctx.needs_input_grad[0] else None
        (e1, e2), (g1, g2) = ctx.entries, ctx.gathers
        _give_rows(g2, e2, a, dy, ctx.with_bias[1])
        _give_rows(g1, e1, x, dh, ctx.with_bias[0])
        return dx, None, None, None, None, None, None, None


# ---- the attention as one node ---------------------------------------------------------------------------------


def attention(x: torch.Tensor, qkv: Linear, out: Linear, cache, layer: int, heads: tuple[int, int, int], *,
              new_seqlens=None, softmax_scale=None, rotary_cos=None, rotary_sin=None,
              rotary_interleaved=False, dropout_p=0.0, dropout_seed=None) -> torch.Tensor:
    """out(cache.attend(layer, q, k, v, ...)) with [q | k | v] = qkv(x) (B, n, (Hq + 2 Hkv) D) for heads = (Hq, Hkv,
    D): one autograd node inside batched_weight_grads() (see the module docstring), the same values and gradients
    as the plain composition. dropout_p / dropout_seed: the attention-probability dropout (cache.attend's)."""
    B, n, _ = x.shape
    Hq, _, D = heads
    # a KVCache subclass may override attend: the fused node would skip it
    session = _fused_session(x, qkv, out) if type(cache).attend is KVCache.attend else None
    if session is None:
        q, k, v = _split_heads(qkv(x), heads)
        a = cache.attend(layer, q, k, v, new_seqlens=new_seqlens, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                         rotary_interleaved=rotary_interleaved, softmax_scale=softmax_scale, dropout_p=dropout_p,
                         dropout_seed=dropout_seed)
        return out(a.reshape(B, n, Hq * D))
    e1, w1, b1 = session.entry(qkv)
    e2, w2, b2 = session.entry(out)
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    rot = (rotary_cos, rotary_sin, rotary_interleaved)
    drop = check_dropout_args(dropout_p, dropout_seed)
    return cache.differentiable_pass(layer, n, new_seqlens, lambda chain, lengths: _DeferredAttention.apply(
        chain, x, w1, b1, w2, b2, e1, e2, cache, layer, lengths, heads, rot, scale, drop, session))


def _split_heads(qkv: torch.Tensor, heads: tuple[int, int, int]):
    """q (B, n, Hq, D), k and v (B, n, Hkv, D): views of [q | k | v] (B, n, (Hq + 2 Hkv) D)."""
    B, n, _ = qkv.shape
    Hq, Hkv, D = heads
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    return q.view(B, n, Hq, D), k.view(B, n, Hkv, D), v.view(B, n, Hkv, D)


class _DeferredAttention(torch.autograd.Function):
    """y = attend(split(x W1^T + b1)) W2^T + b2 through the cache (one pass of one layer, like _CachedAttention,
    whose chain token it takes and outputs). Backward returns the input gradient only and gives each projection's
    (input, output gradient) rows to its entry, as _DeferredLinear does."""

    @staticmethod
    def forward(ctx, chain, x, w1, b1, w2, b2, e1, e2, cache, layer, lengths, heads, rot, scale, drop, session):
        B, n, _ = x.shape
        q, k, v = _split_heads(linear(x, w1, b1), heads)
        ctx.pass_, o, lse = AttendedPass.run(cache, layer, lengths, chain, q, k, v, rot, scale, True, drop)
        ctx.save_for_backward(x, q, o, lse, w1, w2)
        ctx.entries, ctx.gathers, ctx.session = (e1, e2), (w1.grad_fn, w2.grad_fn), session
        ctx.with_bias = (b1 is not None, b2 is not None)
        ctx.set_materialize_grads(False)
        return linear(o.reshape(B, n, -1), w2, b2), x.new_zeros(())

    @staticmethod
    def backward(ctx, dy, grad_chain):
        if torch.is_grad_enabled():
            ctx.session.abandon()  # rows the later nodes of this backward already kept
            raise no_double_backward(f"models.linear.attention(layer={ctx.pass_.layer})")
        x, q, o, lse, w1, w2 = ctx.saved_tensors
        B, n, Hq, D = q.shape
        (e1, e2), (g1, g2) = ctx.entries, ctx.gathers
        grad_out = None
        if dy is not None:
            grad_out = input_grad(dy, w2).view(B, n, Hq, D)
            _give_rows(g2, e2, o.reshape(B, n, Hq * D), dy, ctx.with_bias[1])
        dq, dk, dv, chain_grad = ctx.pass_.backward(q, o, lse, grad_out, grad_chain, True, True)
        if dq is None:  # only later passes' attention reached this pass's keys and values
            dq = torch.zeros_like(q)
        dqkv = torch.cat([dq.reshape(B, n, -1), dk.reshape(B, n, -1), dv.reshape(B, n, -1)], dim=-1)
        _give_rows(g1, e1, x, dqkv, ctx.with_bias[0])
        dx = input_grad(dqkv, w1) if ctx.needs_input_grad[1] else None
        return chain_grad, dx, *([None] * 14)
