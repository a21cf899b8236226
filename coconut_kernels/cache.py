"""KVCache: one preallocated key/value cache for all layers, with per-sequence lengths, that multi-pass
latent training can backpropagate through without concatenating caches. The model layer calls
`attend(layer, ...)` in every layer of a pass and `advance(n)` after the pass; kernels are latent_attention's.
"""
from __future__ import annotations

import os

import torch

from .errors import CoconutError
from .ops.latent_attention import (MAX_HEAD_DIM, NewRows, append_and_attend, check_dropout_args, grad_accumulators,
                                   kernels, latent_attention, no_double_backward)
from .validation import check_device, check_dtype, check_int, check_same_device, check_tensor_args, host_checks

__all__ = ["KVCache", "AttendedPass", "set_deferred_kv_grads", "deferred_kv_grads"]


def _as_lengths(x, batch: int, device, name: str, high: int) -> torch.Tensor:
    """x (an int, a sequence of ints or an integer tensor) as a (batch,) int32 tensor on device, its values in
    [0, high] (read on the host: always for host data, for CUDA tensors under COCONUT_DEBUG=1)."""
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CoconutError(f"{name} must be an int or have shape ({batch},), got {x!r} ({e})") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise CoconutError(f"{name} must be an int or integer tensor, got {x!r}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise CoconutError(f"{name} must be an int or have shape ({batch},), got shape {tuple(t.shape)}")
    if t.device.type == "meta" and torch.device(device).type != "meta":
        raise CoconutError(f"{name} must hold values (on the host or the cache's device {device}), got a tensor on "
                           "the meta device")
    if host_checks(t):
        for i, n in enumerate(t.tolist()):  # (B,) values: a Python loop costs less than tensor ops here
            if not 0 <= n <= high:
                raise CoconutError(f"{name}[{i}] = {n} is out of range: expected [0, {high}]")
    return t.to(device=device, dtype=torch.int32)


class _Generation:
    """What the differentiable passes of one cache generation share in their backward: the buffers they read and
    the per-layer gradient accumulators. Passes hold this, not the KVCache: the cache holds each layer's last
    chain token, whose autograd node holds the pass's ctx, and a ctx -> cache reference would close a cycle
    through autograd's C++ nodes that the garbage collector cannot see (every step's cache would leak)."""

    __slots__ = ("k", "v", "leftpad", "grad_kv", "grad_task", "max_new", "valid", "parent", "parent_rows",
                 "started", "frozen", "deferred")

    def __init__(self, k, v, leftpad, n_layers):
        self.k, self.v, self.leftpad = k, v, leftpad
        self.grad_kv = [None] * n_layers  # per layer: (dK, dV) accumulators, alive only during the backward
        self.grad_task = [None] * n_layers  # per layer: the autograd graph task that last wrote them
        # per layer: the rows each sequence holds after the layer's first differentiable pass (int32, CPU) and
        # their max, rows only that pass's backward takes: the one-row passes defer their gradient there
        self.frozen = [None] * n_layers
        self.deferred = [None] * n_layers  # per layer: the _DeferredRows of its backward, while it runs
        self.max_new = 0  # most rows appended by one differentiable pass: the accumulators' padding
        self.valid = True  # False once reset/crop started a new generation
        self.parent = None  # a fork's: the generation it copied its first parent_rows rows of each sequence from
        self.parent_rows = None
        self.started = [False] * n_layers  # per layer: a differentiable pass has run in this generation


# COCONUT_DEFER_KV_GRAD=0 (read at import) or set_deferred_kv_grads(False) turn _DeferredRows off
_defer_enabled = os.environ.get("COCONUT_DEFER_KV_GRAD", "1") not in ("", "0")


def set_deferred_kv_grads(enabled: bool) -> None:
    """Whether the CPU backward of a one-row pass defers its gradient of the first pass's cache rows
    (`_DeferredRows`); on by default. Off: every pass adds into the accumulators itself (A/B runs). Read when a
    pass runs its forward."""
    global _defer_enabled
    _defer_enabled = bool(enabled)


def deferred_kv_grads() -> bool:
    """Whether set_deferred_kv_grads is on."""
    return _defer_enabled


class _DeferredRows:
    """The gradient one-row passes owe the rows of a layer's first pass, added in one product when that pass's
    backward (the layer's last) begins.

    A one-row pass's backward (latent_attention_decode_bwd_deferred) reads K and V once, but adding its
    dS q and P dO into the accumulators reads and writes both of them whole again: three streams over the
    cache where one would do. Those rows are taken only by the first pass's backward, which runs after every
    later pass's, so each one-row pass hands over its P and dS (B, Hq, R), its rotated q and its dO (B, Hq, D)
    instead, and flush() adds dK += dS^T q, dV += P^T dO for all of them at once."""

    __slots__ = ("p", "ds", "q", "do")

    def __init__(self):
        self.p, self.ds, self.q, self.do = [], [], [], []

    def flush(self, grad_kv) -> None:
        if not self.p:
            return
        dk_acc, dv_acc = grad_kv
        B, _, Hkv, D = dk_acc.shape
        n, (_, Hq, R) = len(self.p), self.p[0].shape

        def product(rows, vecs):  # sum over the passes of rows (B, Hq, R) x vecs (B, Hq, D): (B, Hq, R, D)
            # stacked along a new first dim (plain copies), multiplied as (B * Hq) batches of (R x n) @ (n x D)
            r = torch.stack(rows).view(n, B * Hq, R).permute(1, 2, 0)
            v = torch.stack(vecs).view(n, B * Hq, D).transpose(0, 1)
            return torch.bmm(r, v).view(B, Hq, R, D)

        dk, dv = product(self.ds, self.q), product(self.p, self.do)
        if Hq != Hkv:  # the heads of a group share their kv head
            dk, dv = dk.view(B, Hkv, Hq // Hkv, R, D).sum(2), dv.view(B, Hkv, Hq // Hkv, R, D).sum(2)
        dk_acc[:, :R] += dk.transpose(1, 2)
        dv_acc[:, :R] += dv.transpose(1, 2)
        self.__init__()


def _accumulators(state, layer: int, k_cache):
    """The layer's dK/dV accumulators for the running backward: allocated when absent; zeroed (with the deferred
    rows dropped) when another backward wrote them, one that stopped before the layer's first pass. Kept when
    this backward already added into them: a fork's first pass hands its share of the copied rows to its
    parent, possibly before the parent's own last pass (no chain gradient) runs."""
    task = torch._C._current_graph_task_id()
    grad_kv = state.grad_kv[layer]
    if grad_kv is None:
        grad_kv = state.grad_kv[layer] = grad_accumulators(k_cache, state.max_new)
        state.deferred[layer] = None
    elif state.grad_task[layer] != task:
        grad_kv[0].zero_()
        grad_kv[1].zero_()
        state.deferred[layer] = None
    state.grad_task[layer] = task
    return grad_kv


class _PassLengths:
    """The lengths one pass runs at, shared by its layers: copies of cache.seqlens (advance() changes it in place
    before the backward runs) and of new_seqlens, and the NewRows index its backward takes the new rows' gradients
    with, computed by the first layer that needs it."""

    __slots__ = ("key", "seqlens", "new_seqlens", "_rows")

    def __init__(self, key, seqlens, new_seqlens):
        self.key = key
        self.seqlens = seqlens.clone()
        self.new_seqlens = None if new_seqlens is None else new_seqlens.clone()
        self._rows = None

    def rows(self, leftpad, n_rows: int, Tmax: int) -> NewRows:
        r = self._rows
        if r is None or r.n_rows != n_rows or r.Tmax != Tmax or r.leftpad is not leftpad:
            r = self._rows = NewRows(self.seqlens, leftpad, self.new_seqlens, n_rows, Tmax)
        return r


class KVCache:
    """Keys and values of every layer: k, v (n_layers, B, max_len, n_kv_heads, head_dim), allocated once.

    seqlens (B,) int32 counts the rows written per sequence (left padding included); leftpad (B,) int32 marks
    the pad rows [0, leftpad[b]) that are never attended (rotary positions count from leftpad[b]). A pass
    calls attend(layer, ...) for every layer, then advance(n_new) once. Nothing here syncs the host, and
    advance/reset/crop update the length buffers in place (CUDA-graph friendly).

    Training: when grad is enabled and q/k_new/v_new require grad, attend is differentiable, and the
    gradients equal those of concatenating the past keys/values and running full attention in every pass,
    including what a later pass's attention sends to the keys/values written by an earlier pass. Forward memory
    is one cache plus each pass's q, out and lse. Rows a pass has read must not be rewritten before its
    backward: reset() and crop() between a forward and its backward raise in the backward; advance each
    sequence by the number of rows it really appended (new_seqlens), or later passes attend unwritten rows.
    Double backward (create_graph=True) through attend raises: the backward kernels have no derivative.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None, leftpad=None):
        shape = tuple(check_int(v, n, low=1) for v, n in zip((n_layers, batch, max_len, n_kv_heads), (
            "n_layers", "batch", "max_len", "n_kv_heads"))) + (check_int(head_dim, "head_dim", low=1,
                                                                        high=MAX_HEAD_DIM),)
        check_dtype(dtype)
        check_device(device)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.k.device)
        self.leftpad = torch.zeros(batch, dtype=torch.int32, device=self.k.device)
        self.generation = 0  # bumped by reset/crop; a backward of an older generation refuses to run
        self._train = None
        self.reset(leftpad)

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self, leftpad=None) -> None:
        """Empty the cache (seqlens = 0) for a new batch, with new left padding (default none)."""
        if leftpad is not None:
            leftpad = _as_lengths(leftpad, self.batch, self.leftpad.device, "leftpad", self.max_len)
        self.seqlens.zero_()
        if leftpad is None:
            self.leftpad.zero_()
        else:
            self.leftpad.copy_(leftpad)
        self._new_generation()

    def crop(self, lengths) -> None:
        """Keep only the first `lengths` rows (int or (B,) tensor) of each sequence: seqlens = min(seqlens,
        lengths)."""
        lengths = _as_lengths(lengths, self.batch, self.seqlens.device, "lengths", self.max_len)
        torch.minimum(self.seqlens, lengths, out=self.seqlens)
        self._new_generation()

    def fork(self) -> "KVCache":
        """A new cache holding a copy of this one's rows and lengths, to be continued differently (e.g. several
        continuations of one prefix). Under grad, the gradient the fork's passes send to the copied rows is added
        to this cache's, so the passes here that wrote them receive it in their backward (which runs after the
        fork's, autograd orders them). Resetting or cropping this cache before that backward makes it raise;
        reset/crop of the fork ends the link."""
        child = KVCache.__new__(KVCache)
        child.k, child.v = self.k.clone(), self.v.clone()
        child.seqlens, child.leftpad = self.seqlens.clone(), self.leftpad.clone()
        child.generation, child._train = 0, None
        child._new_generation()
        child._train.parent, child._train.parent_rows = self._train, self.seqlens.clone()
        child._chain = list(self._chain)  # the fork's first pass of each layer follows this cache's last
        return child

    def advance(self, n_new) -> None:
        """After all layers of a pass: seqlens += n_new (int or (B,) int tensor, e.g. the pass's new_seqlens).
        n_new >= 0 and seqlens + n_new <= max_len are checked for host data, and for CUDA tensors under
        COCONUT_DEBUG=1 (a host sync)."""
        n = _as_lengths(n_new, self.batch, self.seqlens.device, "n_new", self.max_len)
        if host_checks(self.seqlens):
            for b, (s, m) in enumerate(zip(self.seqlens.tolist(), n.tolist())):
                if s + m > self.max_len:
                    raise CoconutError(f"n_new[{b}] = {m} would take sequence {b} from {s} rows past the cache's "
                                       f"max_len={self.max_len}")
        self.seqlens.add_(n)

    def _new_generation(self) -> None:
        self.generation += 1
        if self._train is not None:
            self._train.valid = False
        self._train = _Generation(self.k, self.v, self.leftpad, self.n_layers)
        self._chain = [None] * self.n_layers  # per layer: the ordering token output by its last differentiable pass
        self._pass = None  # the _PassLengths of the pass being run

    def _pass_lengths(self, new_seqlens) -> _PassLengths:
        """The current pass's lengths: the same object for every layer until seqlens or new_seqlens change (in
        place through torch ops, which bump their version counters, or by rebinding)."""
        if new_seqlens is not None and new_seqlens.is_inference():  # no version counter: nothing to key on
            return _PassLengths(None, self.seqlens, new_seqlens)
        key = (self.seqlens, self.seqlens._version, new_seqlens,
               None if new_seqlens is None else new_seqlens._version)
        p = self._pass
        if p is None or p.key is None or p.key[0] is not key[0] or p.key[1] != key[1] or \
                p.key[2] is not key[2] or p.key[3] != key[3]:
            p = self._pass = _PassLengths(key, self.seqlens, new_seqlens)
        return p

    def attend(self, layer: int, q, k_new, v_new, *, new_seqlens=None, rotary_cos=None, rotary_sin=None,
               rotary_interleaved=False, softmax_scale=None, causal=True, dropout_p=0.0, dropout_seed=None):
        """Append k_new/v_new (B, Sq, Hkv, D) to layer `layer` at seqlens and attend q (B, Sq, Hq, D) to it; see
        coconut_kernels.latent_attention for the mask, rotary, new_seqlens and dropout semantics. Returns out like
        q."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise CoconutError(f"layer must be an int in [0, {self.n_layers}), got {layer!r}")
        check_tensor_args(("new_seqlens", "rotary_cos", "rotary_sin"), q=q, k_new=k_new, v_new=v_new,
                          new_seqlens=new_seqlens, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
        check_same_device(self.k.device, "the cache's", q=q, k_new=k_new, v_new=v_new, new_seqlens=new_seqlens,
                          rotary_cos=rotary_cos, rotary_sin=rotary_sin)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        rot = (rotary_cos, rotary_sin, rotary_interleaved)
        drop = check_dropout_args(dropout_p, dropout_seed)
        if not (torch.is_grad_enabled() and (q.requires_grad or k_new.requires_grad or v_new.requires_grad)):
            return latent_attention(q, k_new, v_new, self.k[layer], self.v[layer], self.seqlens, softmax_scale=scale,
                                    causal=causal, cache_leftpad=self.leftpad, new_seqlens=new_seqlens,
                                    rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                    rotary_interleaved=rotary_interleaved, dropout_p=drop[0], dropout_seed=drop[1])
        return self.differentiable_pass(layer, q.shape[1], new_seqlens, lambda chain, lengths: _CachedAttention.apply(
            chain, q, k_new, v_new, self, layer, lengths, rot, scale, causal, drop))

    def differentiable_pass(self, layer: int, n_rows: int, new_seqlens, node):
        """Run `node(chain, lengths)` as layer `layer`'s next differentiable pass of n_rows new rows; returns its
        output. `node` applies an autograd Function that takes `chain` (the layer's chain token, None for its
        first pass) as an input, runs `AttendedPass.run(cache, layer, lengths, chain, ...)` in its forward and
        the record's backward in its backward, and returns (out, its own chain token): the chain orders the
        passes' backwards (see _CachedAttention). attend() is one such node; the model layer's fused attention
        (models.linear.attention) is another."""
        self._train.max_new = max(self._train.max_new, n_rows)
        out, self._chain[layer] = node(self._chain[layer], self._pass_lengths(new_seqlens))
        return out


class AttendedPass:
    """One differentiable pass of one layer, as its backward needs it: the forward appends k_new/v_new and attends
    q (run); the backward gives the gradients of q, k_new, v_new (backward). The state of every node that
    KVCache.differentiable_pass runs (_CachedAttention's ctx, the model layer's fused attention node)."""

    __slots__ = ("state", "layer", "lengths", "rot", "scale", "causal", "dropout", "first", "handoff", "n_rows",
                 "new_dtype", "defers")

    @classmethod
    def run(cls, cache, layer, lengths, chain, q, k_new, v_new, rot, scale, causal, dropout=(0.0, 0)):
        """(record, out, lse): append + attend for the layer's next pass; `chain` is the layer's chain token;
        dropout = (dropout_p, dropout_seed) of the attention probabilities (the backward regenerates the mask)."""
        self = cls()
        out, lse = append_and_attend(q, k_new, v_new, cache.k[layer], cache.v[layer], lengths.seqlens, cache.leftpad,
                                     lengths.new_seqlens, *rot, scale, causal, *dropout)
        self.state, self.layer, self.lengths = cache._train, layer, lengths
        self.rot, self.scale, self.causal, self.dropout = rot, scale, causal, dropout
        self.first = chain is None
        # A fork's first pass of the layer (after a differentiable pass of its parent): its backward hands the
        # gradient of the rows copied from the parent to the parent's accumulator.
        self.handoff = cache._train.parent is not None and not cache._train.started[layer] and chain is not None
        if chain is None and q.device.type == "cpu":  # the layer's first pass: its rows are the deferred ones
            n_new = lengths.new_seqlens if lengths.new_seqlens is not None else k_new.shape[1]
            ends = (lengths.seqlens + n_new).to(torch.int32)
            cache._train.frozen[layer] = (ends, int(ends.max()))
        cache._train.started[layer] = True
        self.n_rows, self.new_dtype = k_new.shape[1], k_new.dtype
        self.defers = self._defers(q)
        return self, out, lse

    def backward(self, q, out, lse, grad_out, grad_chain, want_dk: bool, want_dv: bool):
        """(dq, dk, dv, chain gradient); see _CachedAttention for the order and the accumulators."""
        state, layer, lengths = self.state, self.layer, self.lengths
        if torch.is_grad_enabled():
            raise no_double_backward(f"KVCache.attend(layer={layer})")
        if not state.valid:
            raise RuntimeError(
                f"KVCache.attend(layer={layer}): the cache was reset or cropped after this pass's forward and "
                "before its backward; the rows it attended are gone. Run backward before reset()/crop().")
        k_cache, v_cache = state.k[layer], state.v[layer]
        grad_kv = _accumulators(state, layer, k_cache)
        dq = None
        if self.first and state.deferred[layer] is not None:  # the rows the later passes deferred are its own
            state.deferred[layer].flush(grad_kv)
        if grad_out is not None and self.defers:
            dq = self._deferred_bwd(q, out, lse, grad_out, grad_kv)
        elif grad_out is not None:
            _, _, bwd = kernels(q.device, self.dropout[0] > 0)
            dq = bwd(grad_out.contiguous(), q, k_cache, v_cache, out, lse, lengths.seqlens, state.leftpad,
                     lengths.new_seqlens, *self.rot, self.scale, self.causal, grad_kv[0], grad_kv[1], *self.dropout)
        dk = dv = None
        if want_dk or want_dv:
            rows = lengths.rows(state.leftpad, self.n_rows, k_cache.shape[1])
            if want_dk:
                dk = rows.take(grad_kv[0], *self.rot, dtype=self.new_dtype)
            if want_dv:
                dv = rows.take(grad_kv[1], dtype=self.new_dtype)
        if self.handoff:
            self._hand_to_parent(grad_kv)
            state.grad_kv[layer] = None
        if self.first:
            state.grad_kv[layer] = state.deferred[layer] = None
        chain_grad = None if self.first else torch.zeros((), dtype=q.dtype, device=q.device)
        return dq, dk, dv, chain_grad

    def _defers(self, q) -> bool:
        """Whether this pass's backward defers its gradient of the first pass's rows (_DeferredRows): a one-row
        pass after the first, of a cache generation that is no fork, on the CPU kernels. Decided in the forward."""
        state = self.state
        return (_defer_enabled and not self.first and q.shape[1] == 1 and q.device.type == "cpu"
                and state.parent is None and state.frozen[self.layer] is not None
                and kernels(q.device, self.dropout[0] > 0)[2] is torch.ops.coconut.latent_attention_bwd.default)

    def _deferred_bwd(self, q, out, lse, grad_out, grad_kv):
        state, layer, lengths = self.state, self.layer, self.lengths
        ends, R = state.frozen[layer]
        B, _, Hq, D = q.shape
        acc = grad_kv[0].dtype
        p, ds, q_rot = (q.new_zeros((B, Hq, R), dtype=acc), q.new_zeros((B, Hq, R), dtype=acc),
                        q.new_empty((B, Hq, D), dtype=acc))
        grad_out = grad_out.contiguous()
        dq = torch.ops.coconut.latent_attention_decode_bwd_deferred.default(
            grad_out, q, state.k[layer], state.v[layer], out, lse, lengths.seqlens, state.leftpad,
            lengths.new_seqlens, *self.rot, self.scale, grad_kv[0], grad_kv[1], ends, p, ds, q_rot, *self.dropout)
        if state.deferred[layer] is None:
            state.deferred[layer] = _DeferredRows()
        rec = state.deferred[layer]
        rec.p.append(p)
        rec.ds.append(ds)
        rec.q.append(q_rot)
        rec.do.append(grad_out.view(B, Hq, D).to(acc))
        # The records grow with the passes: once they outweigh the accumulators, add them in (early is exact:
        # nothing reads those rows before the first pass's backward).
        if len(rec.p) * 2 * B * Hq * (R + D) > 2 * grad_kv[0].numel():
            rec.flush(grad_kv)
        return dq


    def _hand_to_parent(self, grad_kv) -> None:
        """Add the accumulated gradient of the rows a fork copied (each sequence's first parent_rows) into the
        parent generation's accumulator, allocating it when no pass of the parent's backward has yet."""
        state, layer = self.state, self.layer
        parent = state.parent
        if not parent.valid:
            raise RuntimeError(f"KVCache.attend(layer={layer}): the cache this one was forked from was reset or "
                               "cropped before the fork's backward; the rows it copied are gone.")
        _accumulators(parent, layer, parent.k[layer])
        T = grad_kv[0].shape[1]
        copied = (torch.arange(T, device=grad_kv[0].device)[None] < state.parent_rows[:, None])[:, :, None, None]
        for dst, src in zip(parent.grad_kv[layer], grad_kv):
            dst.add_(src * copied)


class _CachedAttention(torch.autograd.Function):
    """One differentiable pass of one layer: append + attend, and in backward the gradients of q, k_new, v_new.

    Backward order: every pass takes the chain token output by the previous pass of the same layer, so autograd
    runs pass j's backward before pass j-1's. Each backward ADDS its attention's gradient w.r.t. all cache rows
    it read into the layer's accumulator; when pass i's backward runs, every later pass (the only ones that read
    its rows besides itself) has added its share, so the rows pass i wrote hold their full gradient and are
    gathered as k_new/v_new's. Accumulators another backward left (one that stopped before the first pass) are
    zeroed first; what this backward added (a fork's hand-off) is kept (_accumulators). The first pass frees the
    accumulator. The cache buffers are held by plain reference (through the generation's shared state), not
    save_for_backward: later passes append in place to rows this pass never reads; a reset/crop invalidates the
    state and the backward refuses to run.
    """

    @staticmethod
    def forward(ctx, chain, q, k_new, v_new, cache, layer, lengths, rot, scale, causal, dropout):
        ctx.pass_, out, lse = AttendedPass.run(cache, layer, lengths, chain, q, k_new, v_new, rot, scale, causal,
                                               dropout)
        ctx.save_for_backward(q, out, lse)
        ctx.set_materialize_grads(False)
        return out, q.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out, grad_chain):
        q, out, lse = ctx.saved_tensors
        dq, dk, dv, chain_grad = ctx.pass_.backward(q, out, lse, grad_out, grad_chain, ctx.needs_input_grad[2],
                                                    ctx.needs_input_grad[3])
        return chain_grad, dq, dk, dv, None, None, None, None, None, None, None
