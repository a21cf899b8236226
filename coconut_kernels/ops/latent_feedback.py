"""latent_feedback_ / latent_feedback: write (normed) hidden states into the input embeddings of the next
latent pass. Python entry points, fake kernels, autograd and the backend choice; the kernels are in
csrc/cpu, csrc/cuda (torch.ops.coconut.*) and coconut_kernels/triton/latent_feedback.py.
"""
from __future__ import annotations

import torch

from ..backend import debug_checks, get_backend
from ..errors import CoconutError, library_error
from ..validation import check_real, check_tensor_args

_NORMS = ("none", "layernorm", "rmsnorm")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# The backend depends on the device and process-wide settings only: under torch.compile it is read once
# while tracing instead of being traced into.
_backend_of = torch.compiler.assume_constant_result(get_backend)


def _check_args(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps, out_name="embeds"):
    """Shape/dtype/device checks, no look at index values (the compiled kernels make the same checks in
    csrc/latent_feedback.cpp; this copy serves the fake kernels and the Triton path)."""
    if norm not in _NORMS:
        raise CoconutError(f'norm must be "none", "layernorm" or "rmsnorm", got {norm!r}')
    batched = batch_idx is not None
    rank = 3 if batched else 2
    for t, name, layout in ((embeds, out_name, "(B, T, d)"), (hidden, "hidden", "(B, S, d)")):
        if t.dim() != rank:
            layout = layout + " when batch_idx is given" if batched else "(rows, d) when batch_idx is None"
            raise CoconutError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if hidden.dtype not in _FLOATS:
        raise CoconutError(f"hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if embeds.dtype != hidden.dtype:
        raise CoconutError(f"{out_name} must have hidden's dtype ({hidden.dtype}), got {embeds.dtype}")
    if embeds.device != hidden.device:
        raise CoconutError(f"{out_name} must be on hidden's device ({hidden.device}), got {embeds.device}")
    d = hidden.shape[-1]
    if embeds.shape[-1] != d:
        raise CoconutError(f"{out_name}'s last dim ({embeds.shape[-1]}) must equal hidden's ({d})")
    if d < 1:
        raise CoconutError(f"hidden's last dim d must be >= 1, got {d}")
    if batched and embeds.shape[0] != hidden.shape[0]:
        raise CoconutError(f"{out_name} and hidden must have the same batch size B, got {embeds.shape[0]} and "
                           f"{hidden.shape[0]}")
    n = dst_pos.shape[0] if dst_pos.dim() == 1 else -1
    for t, name in ((dst_pos, "dst_pos"), (src_pos, "src_pos")) + (((batch_idx, "batch_idx"),) if batched else ()):
        if t.dim() != 1:
            raise CoconutError(f"{name} must be 1-D (N,), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise CoconutError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != hidden.device:
            raise CoconutError(f"{name} must be on hidden's device ({hidden.device}), got {t.device}")
        if t.shape[0] != n:
            raise CoconutError(f"{name} must have N = {n} elements (dst_pos's length), got {t.shape[0]}")
    if norm == "none" and (weight is not None or bias is not None):
        raise CoconutError('weight and bias must be None when norm="none"')
    if norm == "rmsnorm" and bias is not None:
        raise CoconutError('bias must be None when norm="rmsnorm" (RMSNorm has no bias)')
    for p, name in ((weight, "weight"), (bias, "bias")):
        if p is None:
            continue
        if p.dim() != 1:
            raise CoconutError(f"{name} must be 1-D (d,), got shape {tuple(p.shape)}")
        if p.shape[0] != d:
            raise CoconutError(f"{name} must have d = {d} elements (hidden's last dim), got {p.shape[0]}")
        if p.device != hidden.device:
            raise CoconutError(f"{name} must be on hidden's device ({hidden.device}), got {p.device}")
        if p.dtype not in (hidden.dtype, torch.float32):
            raise CoconutError(f"{name} must have hidden's dtype ({hidden.dtype}) or float32, got {p.dtype}")
    if eps < 0:
        raise CoconutError(f"eps must be >= 0, got {eps}")


def _check_types(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps):
    """Python types of the arguments, before the op's schema parser (whose errors say less)."""
    check_tensor_args(("batch_idx", "weight", "bias"), embeds=embeds, hidden=hidden, batch_idx=batch_idx,
                      dst_pos=dst_pos, src_pos=src_pos, weight=weight, bias=bias)
    if not isinstance(norm, str):
        raise CoconutError(f'norm must be "none", "layernorm" or "rmsnorm", got {norm!r}')
    check_real(eps, "eps", low=0.0)


def _check_no_overlap(embeds, hidden) -> None:
    """embeds shares no element with hidden: the kernels read hidden's rows while they write embeds', so a shared
    element would be read before or after it is overwritten depending on the launch order. Views of one buffer
    that do not share elements (e.g. two halves of the last dim) pass. Free unless both are views of one
    storage whose spans meet; then one mark pass over the span (a host sync on CUDA). Skipped while tracing
    under torch.compile (fake tensors have no memory)."""
    if torch.compiler.is_compiling() or embeds.device != hidden.device or embeds.device.type == "meta" or \
            embeds.dtype != hidden.dtype or embeds.numel() == 0 or hidden.numel() == 0:
        return  # a device or dtype mix is reported by the other checks
    if embeds.untyped_storage().data_ptr() != hidden.untyped_storage().data_ptr():
        return

    def span(t):  # [first, last] element of the storage that t can touch
        return t.storage_offset(), t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))

    (e0, e1), (h0, h1) = span(embeds), span(hidden)
    if e1 < h0 or h1 < e0:
        return
    lo = min(e0, h0)
    marks = torch.zeros(max(e1, h1) - lo + 1, dtype=torch.bool, device=embeds.device)
    marks.as_strided(embeds.shape, embeds.stride(), e0 - lo).fill_(True)
    if bool(marks.as_strided(hidden.shape, hidden.stride(), h0 - lo).any()):
        raise CoconutError("embeds and hidden share memory (the same tensor, or overlapping views of one): "
                           "latent_feedback_ reads hidden while it writes embeds in place; pass hidden.clone() or "
                           "use latent_feedback, which writes a copy")


def _check_indices(embeds, hidden, batch_idx, dst_pos, src_pos):
    """Index ranges and unique destinations; syncs the host (only called under COCONUT_DEBUG=1)."""
    batched = batch_idx is not None
    t_len, s_len = embeds.shape[-2], hidden.shape[-2]
    n_batch = hidden.shape[0] if batched else 1
    checks = [(dst_pos, "dst_pos", t_len), (src_pos, "src_pos", s_len)]
    if batched:
        checks.append((batch_idx, "batch_idx", n_batch))
    for t, name, size in checks:
        bad = ((t < 0) | (t >= size)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise CoconutError(f"{name}[{i}] = {int(t[i])} is out of range [0, {size})")
    key = dst_pos.long() + (batch_idx.long() * t_len if batched else 0)
    if key.unique().numel() != key.numel():
        raise CoconutError("duplicate destination: two (batch_idx, dst_pos) entries write the same row of embeds; "
                           "destinations must be unique")


def _forward_(backend, embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps):
    if backend == "triton":
        from ..triton.latent_feedback import latent_feedback_fwd

        _check_args(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)
        if debug_checks():
            _check_indices(embeds, hidden, batch_idx, dst_pos, src_pos)
        latent_feedback_fwd(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)
    else:
        try:
            torch.ops.coconut.latent_feedback_.default(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight,
                                                       bias, eps)
        except ValueError as e:
            raise library_error(e) from None


def _backward(backend, grad, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps):
    if backend == "triton":
        from ..triton.latent_feedback import latent_feedback_bwd

        _check_args(grad, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps, "grad_embeds")
        return latent_feedback_bwd(grad, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)
    return torch.ops.coconut.latent_feedback_backward.default(grad, hidden, batch_idx, dst_pos, src_pos, norm,
                                                              weight, bias, eps)


def _input_grads(ctx, grad, backend):
    """Gradients of (embeds, hidden, weight, bias): the overwritten rows of embeds get zero."""
    hidden, batch_idx, dst_pos, src_pos, weight, bias = ctx.saved_tensors
    need_e, need_h, need_w, need_b = ctx.needs_grad
    g_embeds = g_hidden = g_weight = g_bias = None
    if need_e:
        index = (dst_pos.long(),) if batch_idx is None else (batch_idx.long(), dst_pos.long())
        g_embeds = grad.index_put(index, grad.new_zeros(()))
    if need_h or need_w or need_b:
        gh, gw, gb = _backward(backend, grad, hidden, batch_idx, dst_pos, src_pos, ctx.norm, weight, bias, ctx.eps)
        g_hidden = gh if need_h else None
        g_weight = gw.to(weight.dtype) if need_w else None
        g_bias = gb.to(bias.dtype) if need_b else None
    return g_embeds, g_hidden, g_weight, g_bias


def _save(ctx, embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps, needs):
    ctx.save_for_backward(hidden, batch_idx, dst_pos, src_pos, weight, bias)
    ctx.norm, ctx.eps = norm, eps
    ctx.needs_grad = needs


class _LatentFeedbackInplace(torch.autograd.Function):
    """Autograd of the in-place form (torch cannot register autograd on a mutable op)."""

    @staticmethod
    def forward(ctx, embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps, backend):
        _forward_(backend, embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)
        ctx.mark_dirty(embeds)
        n = ctx.needs_input_grad
        _save(ctx, embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps, (n[0], n[1], n[6], n[7]))
        ctx.backend = backend
        return embeds

    @staticmethod
    def backward(ctx, grad):
        ge, gh, gw, gb = _input_grads(ctx, grad, ctx.backend)
        return ge, gh, None, None, None, None, gw, gb, None, None


def _setup_context(ctx, inputs, output):
    embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps = inputs
    needs = tuple(t is not None and t.requires_grad for t in (embeds, hidden, weight, bias))
    _save(ctx, embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps, needs)


def _functional_backward(ctx, grad):
    # The compiled op runs the compiled kernels on every device, so its backward does too.
    ge, gh, gw, gb = _input_grads(ctx, grad, "cpu")
    return ge, gh, None, None, None, None, gw, gb, None


torch.library.register_autograd("coconut::latent_feedback", _functional_backward, setup_context=_setup_context)


@torch.library.register_fake("coconut::latent_feedback_")
def _latent_feedback_inplace_fake(embeds, hidden, batch_idx, dst_pos, src_pos, norm="none", weight=None, bias=None,
                                  eps=1e-5):
    _check_args(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)


@torch.library.register_fake("coconut::latent_feedback")
def _latent_feedback_fake(embeds, hidden, batch_idx, dst_pos, src_pos, norm="none", weight=None, bias=None,
                          eps=1e-5):
    _check_args(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)
    return torch.empty_like(embeds, memory_format=torch.contiguous_format)


@torch.library.register_fake("coconut::latent_feedback_backward")
def _latent_feedback_backward_fake(grad_embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps):
    _check_args(grad_embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps, "grad_embeds")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    d = hidden.shape[-1]
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            hidden.new_empty(d if weight is not None else 0, dtype=acc),
            hidden.new_empty(d if bias is not None else 0, dtype=acc))


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def latent_feedback_(embeds: torch.Tensor, hidden: torch.Tensor, batch_idx: torch.Tensor | None,
                     dst_pos: torch.Tensor, src_pos: torch.Tensor, *, norm: str = "none",
                     weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     eps: float = 1e-5) -> torch.Tensor:
    """Write f(hidden[batch_idx[i], src_pos[i]]) into embeds[batch_idx[i], dst_pos[i]] for i < N, in place.

    The COCONUT feedback step: the hidden state at each latent's previous position becomes the latent's input
    embedding, in one launch instead of the official B x T list-and-stack rebuild.

    Layouts:
        padded: embeds (B, T, d), hidden (B, S, d), batch_idx (N,); dst_pos indexes T and src_pos indexes S.
        packed: batch_idx=None, embeds (R_e, d), hidden (R_h, d); dst_pos / src_pos index rows.
    Indices: 1-D (N,), int32 or int64 (each may have its own), on the tensors' device, in range, no
        negative wrap-around; (batch_idx, dst_pos) pairs must be unique. N = 0 is a no-op.
    norm: "none" (f = identity), "layernorm" (weight and bias optional, biased variance, eps) or "rmsnorm"
        (weight optional, eps), fused in the kernel and computed in fp32 for fp16/bf16 (fp64 for fp64), then
        rounded once to embeds' dtype. weight/bias: (d,), hidden's dtype or float32. Pass the *pre-norm*
        hidden state with the model's final norm to get what the LM head sees.
    dtypes: float32, float16, bfloat16, float64 (embeds and hidden the same); any d >= 1; embeds and hidden
        may be strided views as long as rows are addressable (a non-unit last stride costs a copy).
    Autograd (when grad is enabled and any of embeds/hidden/weight/bias requires grad): gradients flow to
        hidden (through the norm), weight and bias; the overwritten rows of embeds get zero gradient. The usual
        in-place rules apply: embeds may not be a leaf that requires grad (use latent_feedback).
    Backends: CPU tensors run the C++ kernels; CUDA tensors run coconut_kernels.get_backend(device)
        ("cuda" C++, "triton", or "torch" = reference.py).
    Errors (CoconutError, a ValueError, naming the argument): ranks, dtypes, devices, d, weight/bias shape, norm
        name, index dtype; index range and duplicate destinations are checked always on CPU and under
        COCONUT_DEBUG=1 on CUDA (a host sync). Without it a GPU kernel skips bad rows: it never writes out of bounds.
    Not supported: embeds and hidden sharing elements (rows read while being written: a CoconutError),
        negative indices.
    Returns embeds.
    """
    _check_types(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)
    _check_no_overlap(embeds, hidden)
    if torch.is_grad_enabled() and embeds.requires_grad and embeds.is_leaf:
        raise CoconutError("embeds is a leaf tensor that requires grad: latent_feedback_ would write it in place; "
                           "use latent_feedback")
    backend = _backend_of(embeds.device)
    if backend == "torch":
        from .. import reference  # the "torch" backend (backend.py) runs the tests' oracle itself, for debugging

        return reference.latent_feedback_reference_(embeds, hidden, batch_idx, dst_pos, src_pos, norm=norm,
                                                    weight=weight, bias=bias, eps=eps)
    if _needs_autograd(embeds, hidden, weight, bias):
        return _LatentFeedbackInplace.apply(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps,
                                            backend)
    _forward_(backend, embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)
    return embeds


def latent_feedback(embeds: torch.Tensor, hidden: torch.Tensor, batch_idx: torch.Tensor | None,
                    dst_pos: torch.Tensor, src_pos: torch.Tensor, *, norm: str = "none",
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    eps: float = 1e-5) -> torch.Tensor:
    """Out-of-place latent_feedback_: returns a contiguous copy of embeds with the rows written.

    Same arguments, layouts, dtypes, errors and gradients as latent_feedback_; embeds may be a leaf that
    requires grad. This is the form for training code: e.g. GPT-2
    `latent_feedback(embeds, h_pre_ln_f, b, p, p - 1, norm="layernorm", weight=ln_f.weight, bias=ln_f.bias,
    eps=ln_f.eps)` or Llama `norm="rmsnorm", weight=norm.weight, eps=norm.eps`. On CPU and with the "cuda"
    backend it is the single op torch.ops.coconut.latent_feedback (autograd and fake kernel registered, so
    it traces under torch.compile(fullgraph=True)).
    """
    _check_types(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps)
    backend = _backend_of(embeds.device)
    if backend in ("cpu", "cuda"):
        try:
            return torch.ops.coconut.latent_feedback.default(embeds, hidden, batch_idx, dst_pos, src_pos, norm,
                                                             weight, bias, eps)
        except ValueError as e:
            raise library_error(e) from None
    if backend == "torch":
        from .. import reference  # the "torch" backend (backend.py) runs the tests' oracle itself, for debugging

        return reference.latent_feedback_reference(embeds, hidden, batch_idx, dst_pos, src_pos, norm=norm,
                                                   weight=weight, bias=bias, eps=eps)
    return latent_feedback_(embeds.clone(memory_format=torch.contiguous_format), hidden, batch_idx, dst_pos,
                            src_pos, norm=norm, weight=weight, bias=bias, eps=eps)
