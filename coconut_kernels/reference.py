"""Plain-PyTorch reference of every op: the oracle of the tests and the "torch" backend.

Depends on torch alone. Written for clarity, not speed; computes in the inputs' dtype unless stated.
"""
from __future__ import annotations

import math

import torch


# ---- latent_attention ---------------------------------------------------------------------------------
# Cache layout as flash-attention: (B, Tmax, Hkv, D); query t of sequence b sits at cache row
# cache_seqlens[b] + t and the rotary position of cache row r is r - cache_leftpad[b].


def _lengths(x: torch.Tensor | None, default: int, batch: int, device) -> torch.Tensor:
    if x is None:
        return torch.full((batch,), default, dtype=torch.long, device=device)
    return x.to(device=device, dtype=torch.long)


def _lse_dtype(dtype):
    """lse is kept in the accumulation type: fp32, or fp64 for fp64 inputs (exact fp64 gradients)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_rotary_reference(x, cos, sin, positions, interleaved: bool = False, inverse: bool = False):
    """Rotary embedding of the first 2 * cos.shape[1] dims of x (B, S, H, D) at positions (B, S).

    NeoX style (interleaved=False) rotates the pairs (i, i + rotary_dim/2); interleaved rotates (2i, 2i+1).
    Positions are clamped into the table (rows that use a clamped position are never attended).
    inverse=True applies the transposed rotation (used to map gradients back to the un-rotated input)."""
    half = cos.shape[1]
    if half == 0:
        return x
    pos = positions.long().clamp(0, cos.shape[0] - 1)
    c = cos.to(x.dtype)[pos][:, :, None, :]  # (B, S, 1, half)
    s = sin.to(x.dtype)[pos][:, :, None, :]
    if inverse:
        s = -s
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        y = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((y, rest), dim=-1)


# Attention dropout: element (b, h, t, j) (sequence, query head, query row of the call, cache row of the key) is
# kept when the first word of Philox-4x32-10 at counter offset = ((b * Hq + h) * Sq + t) * Tmax + j, key = the
# seed, shifted right by 8 bits, is >= floor(p * 2^24) (csrc/dropout.h; Triton's tl.randint draws the same word).
_M32 = 0xFFFFFFFF


def _mul32(a: int, x: torch.Tensor):
    """(high, low) 32-bit words of a * x for a constant a < 2^32 and int64 x in [0, 2^32), without overflowing
    int64: a is split into 16-bit halves."""
    hi_part, lo_part = x * (a >> 16), x * (a & 0xFFFF)
    return (hi_part + (lo_part >> 16)) >> 16, (((hi_part & 0xFFFF) << 16) + lo_part) & _M32


def philox_first_word(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The first word of Philox-4x32-10 with counter (offset low, offset high, 0, 0) and key (seed low, seed
    high), as int64 in [0, 2^32): Triton's tl.randint(seed, offsets)."""
    off = offsets.to(torch.int64)
    c0, c1 = off & _M32, (off >> 32) & _M32
    c2 = c3 = torch.zeros_like(off)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        a_hi, a_lo = _mul32(0xD2511F53, c0)
        b_hi, b_lo = _mul32(0xCD9E8D57, c2)
        c0, c2, c1, c3 = b_hi ^ c1 ^ k0, a_hi ^ c3 ^ k1, b_lo, a_lo
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0


def attention_dropout_keep(seed: int, p: float, B: int, Hq: int, Sq: int, Tmax: int, device=None) -> torch.Tensor:
    """The keep mask (B, Hq, Sq, Tmax) bool that latent_attention's kernels draw for dropout_p = p and
    dropout_seed = seed, for q (B, Sq, Hq, D) over a cache of Tmax rows."""
    offsets = torch.arange(B * Hq * Sq * Tmax, device=device, dtype=torch.int64).view(B, Hq, Sq, Tmax)
    return (philox_first_word(seed, offsets) >> 8) >= int(p * 16777216.0)


def kv_cache_append_reference(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad=None,
                              new_seqlens=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    """In place: cache rows cache_seqlens[b] + t (t < new_seqlens[b]) <- k_new (rotated) / v_new rows t.

    Built from masks over the whole cache (no host sync); rows past Tmax are skipped."""
    B, Sq = k_new.shape[:2]
    Tmax = k_cache.shape[1]
    dev = k_cache.device
    seqlens = cache_seqlens.to(dev, torch.long)
    leftpad = _lengths(cache_leftpad, 0, B, dev)
    n_new = _lengths(new_seqlens, Sq, B, dev)
    if rotary_cos is not None:
        pos = seqlens[:, None] + torch.arange(Sq, device=dev) - leftpad[:, None]
        k_new = apply_rotary_reference(k_new, rotary_cos, rotary_sin, pos, rotary_interleaved)
    rows = torch.arange(Tmax, device=dev)
    src = rows[None, :] - seqlens[:, None]  # (B, Tmax): which new row lands on each cache row
    written = (src >= 0) & (src < n_new[:, None])
    idx = src.clamp(0, Sq - 1)[:, :, None, None].expand(-1, -1, *k_cache.shape[2:])
    mask = written[:, :, None, None]
    k_cache.copy_(torch.where(mask, k_new.to(k_cache.dtype).gather(1, idx), k_cache))
    v_cache.copy_(torch.where(mask, v_new.to(v_cache.dtype).gather(1, idx), v_cache))


def latent_attention_fwd_reference(q, k_cache, v_cache, cache_seqlens, cache_leftpad=None, new_seqlens=None,
                                   rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
                                   softmax_scale=None, causal=True, dropout_p=0.0, dropout_seed=0):
    """(out, lse): attention of q (B, Sq, Hq, D) to the cache rows [cache_leftpad[b], cache_seqlens[b] + n_new)
    (causal: up to the query's own row). Computes in q's dtype; lse (B, Hq, Sq) is fp32 (fp64 for fp64 q); rows
    t >= new_seqlens[b] give out = 0 and lse = -inf. dropout_p > 0 drops the probabilities with the mask of
    attention_dropout_keep(dropout_seed, ...) and scales the kept ones by 1 / (1 - dropout_p) (lse is the
    undropped one). Does not change the cache."""
    B, Sq, Hq, D = q.shape
    Tmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    dev = q.device
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    seqlens = cache_seqlens.to(dev, torch.long)
    leftpad = _lengths(cache_leftpad, 0, B, dev)
    n_new = _lengths(new_seqlens, Sq, B, dev)
    t = torch.arange(Sq, device=dev)
    if rotary_cos is not None:
        q = apply_rotary_reference(q, rotary_cos, rotary_sin, seqlens[:, None] + t - leftpad[:, None],
                                   rotary_interleaved)
    k = k_cache.to(q.dtype).repeat_interleave(Hq // Hkv, dim=2)
    v = v_cache.to(q.dtype).repeat_interleave(Hq // Hkv, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale  # (B, Hq, Sq, Tmax)
    r = torch.arange(Tmax, device=dev)
    end = seqlens[:, None] + (t[None, :] if causal else (n_new[:, None] - 1).expand(-1, Sq))  # last row seen
    allowed = (r[None, None, :] >= leftpad[:, None, None]) & (r[None, None, :] <= end[:, :, None])
    allowed &= (t[None, :] < n_new[:, None])[:, :, None]  # (B, Sq, Tmax)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores.to(_lse_dtype(q.dtype)), dim=-1)  # (B, Hq, Sq)
    # Rows with no key (pad queries, t >= new_seqlens) get a finite softmax then 0, so no NaN reaches autograd.
    has_key = allowed.any(-1)[:, None, :, None]
    p = torch.softmax(scores.masked_fill(~has_key, 0), dim=-1) * allowed[:, None]
    if dropout_p > 0:
        keep = attention_dropout_keep(dropout_seed, dropout_p, B, Hq, Sq, Tmax, dev)
        p = p * keep * (1.0 / (1.0 - dropout_p))
    out = torch.einsum("bhst,bthd->bshd", p, v)
    return out, lse


def latent_attention_reference(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cache_leftpad=None,
                               new_seqlens=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
                               softmax_scale=None, causal=True, dropout_p=0.0, dropout_seed=0):
    """kv_cache_append_reference (in place) followed by latent_attention_fwd_reference: (out, lse)."""
    kv_cache_append_reference(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, new_seqlens,
                              rotary_cos, rotary_sin, rotary_interleaved)
    return latent_attention_fwd_reference(q, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens,
                                          rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, causal,
                                          dropout_p, dropout_seed)


def latent_attention_bwd_reference(grad_out, q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad,
                                   new_seqlens, rotary_cos, rotary_sin, rotary_interleaved, softmax_scale,
                                   causal, grad_k_cache, grad_v_cache, dropout_p=0.0, dropout_seed=0):
    """Backward of latent_attention_fwd_reference by autograd: returns dq (w.r.t. the un-rotated q) and adds
    the cache rows' gradients into grad_k_cache / grad_v_cache in place. out and lse are not needed."""
    with torch.enable_grad():
        qg = q.detach().requires_grad_()
        kg = k_cache.detach().requires_grad_()
        vg = v_cache.detach().requires_grad_()
        o, _ = latent_attention_fwd_reference(qg, kg, vg, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos,
                                              rotary_sin, rotary_interleaved, softmax_scale, causal, dropout_p,
                                              dropout_seed)
        dq, dk, dv = torch.autograd.grad(o, (qg, kg, vg), grad_out.to(o.dtype))
    grad_k_cache.add_(dk.to(grad_k_cache.dtype))
    grad_v_cache.add_(dv.to(grad_v_cache.dtype))
    return dq


def latent_attention_decode_bwd_deferred_reference(grad_out, q, k_cache, v_cache, out, lse, cache_seqlens,
                                                   cache_leftpad, new_seqlens, rotary_cos, rotary_sin,
                                                   rotary_interleaved, softmax_scale, grad_k_cache, grad_v_cache,
                                                   defer_end, p_out, ds_out, q_out, dropout_p=0.0, dropout_seed=0):
    """latent_attention_bwd_reference for one query row per sequence (q (B, 1, Hq, D)), with the cache rows
    j < defer_end[b] left out of grad_k_cache / grad_v_cache: instead their attention probabilities (dropped, as
    the forward applied them) go to p_out[b, h, j], the gradients of their scaled scores times the scale
    (P (dP - rowsum(dO out)) scale) to ds_out[b, h, j], and the rotated q to q_out (B, Hq, D), so that
    dK[b, j] = sum over the group's heads of ds_out[b, h, j] q_out[b, h] and dV[b, j] = sum of
    p_out[b, h, j] dO[b, h] restore them (the compiled op leaves the rows it does not attend as given; here they
    are written as zeros). Returns dq."""
    B, _, Hq, D = q.shape
    Tmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    acc = grad_k_cache.dtype
    dk, dv = torch.zeros_like(grad_k_cache), torch.zeros_like(grad_v_cache)
    dq = latent_attention_bwd_reference(grad_out, q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad,
                                        new_seqlens, rotary_cos, rotary_sin, rotary_interleaved, softmax_scale,
                                        True, dk, dv, dropout_p, dropout_seed)
    dev = q.device
    seqlens = cache_seqlens.to(dev, torch.long)
    leftpad = _lengths(cache_leftpad, 0, B, dev)
    n_new = _lengths(new_seqlens, 1, B, dev)
    qr = q.to(acc)
    if rotary_cos is not None:
        qr = apply_rotary_reference(qr, rotary_cos.to(acc), rotary_sin.to(acc), (seqlens - leftpad)[:, None],
                                    rotary_interleaved)
    qr = qr[:, 0]                                                     # (B, Hq, D)
    k = k_cache.to(acc).repeat_interleave(Hq // Hkv, dim=2)          # (B, Tmax, Hq, D)
    v = v_cache.to(acc).repeat_interleave(Hq // Hkv, dim=2)
    dO = grad_out.to(acc)[:, 0]
    r = torch.arange(Tmax, device=dev)
    allowed = (r[None] >= leftpad[:, None]) & (r[None] <= seqlens[:, None]) & (n_new[:, None] >= 1)  # (B, Tmax)
    live = torch.isfinite(lse[:, :, 0].to(acc))[:, :, None] & allowed[:, None]                      # (B, Hq, Tmax)
    p = torch.where(live, torch.exp(torch.einsum("bhd,bthd->bht", qr, k) * softmax_scale
                                    - lse[:, :, 0].to(acc)[:, :, None].masked_fill(~live.any(-1, keepdim=True), 0)),
                    0.0)
    dp = torch.einsum("bhd,bthd->bht", dO, v)
    if dropout_p > 0:
        f = attention_dropout_keep(dropout_seed, dropout_p, B, Hq, 1, Tmax, dev)[:, :, 0].to(acc) / (1 - dropout_p)
        dp, p_dropped = dp * f, p * f
    else:
        p_dropped = p
    ds = p * (dp - (dO * out.to(acc)[:, 0]).sum(-1, keepdim=True)) * softmax_scale
    deferred = r[None] < defer_end.to(dev, torch.long)[:, None]      # (B, Tmax)
    R = p_out.shape[-1]
    p_out.copy_(torch.where(deferred[:, None, :R], p_dropped[..., :R], p_out))
    ds_out.copy_(torch.where(deferred[:, None, :R], ds[..., :R], ds_out))
    q_out.copy_(qr)
    keep = ~deferred[:, :, None, None]
    grad_k_cache.add_(dk * keep)
    grad_v_cache.add_(dv * keep)
    return dq


# ---- latent_feedback ---------------------------------------------------------------------------------
def _feedback_rows(hidden, batch_idx, src_pos, norm, weight, bias, eps):
    """f(hidden[batch_idx[i], src_pos[i]]) for every i; the norm runs in fp32 for fp16/bf16 (the op's
    contract), in the input's dtype otherwise."""
    rows = hidden[src_pos.long()] if batch_idx is None else hidden[batch_idx.long(), src_pos.long()]
    if norm == "none":
        return rows
    compute = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
    x = rows.to(compute)
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    if norm == "layernorm":
        y = torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)
    elif norm == "rmsnorm":
        y = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)
    else:
        raise ValueError(f'norm must be "none", "layernorm" or "rmsnorm", got {norm!r}')
    return y.to(rows.dtype)


def _feedback_index(batch_idx, dst_pos):
    return (dst_pos.long(),) if batch_idx is None else (batch_idx.long(), dst_pos.long())


def latent_feedback_reference(embeds, hidden, batch_idx, dst_pos, src_pos, *, norm="none", weight=None, bias=None,
                              eps=1e-5):
    """Out of place: a copy of embeds with embeds[batch_idx[i], dst_pos[i]] = f(hidden[batch_idx[i], src_pos[i]])
    (packed (rows, d) tensors indexed by the positions when batch_idx is None). Differentiable by autograd."""
    rows = _feedback_rows(hidden, batch_idx, src_pos, norm, weight, bias, eps)
    return embeds.index_put(_feedback_index(batch_idx, dst_pos), rows)


def latent_feedback_reference_(embeds, hidden, batch_idx, dst_pos, src_pos, *, norm="none", weight=None, bias=None,
                               eps=1e-5):
    """In-place twin of latent_feedback_reference (autograd handles the in-place write itself)."""
    rows = _feedback_rows(hidden, batch_idx, src_pos, norm, weight, bias, eps)
    return embeds.index_put_(_feedback_index(batch_idx, dst_pos), rows)


def soft_embedding_reference(
    logits: torch.Tensor,
    weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    return_probs: bool = False,
):
    """Σ_i softmax(filtered(logits) / temperature)_i · weight[i] by sort, mask, softmax and matmul.

    The kept set is value-closed: the logits >= the top_k-th largest (top_k = 0: all), then among those the
    logits >= t for the largest t whose set {x >= t} has probability >= top_p (top_p = 1: all). The
    probabilities are computed in logits' dtype and cast to weight's for the matmul; `probs` (on request) is
    returned in at least float32.
    """
    lead, V = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, V)
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < V:
        keep = x >= x.topk(top_k, dim=-1).values[:, -1:]
    if top_p < 1.0:
        xs = x.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=True).values
        cum = torch.softmax(xs / temperature, dim=-1).cumsum(dim=-1)
        # First sorted position whose cumulative probability reaches top_p; its value is the threshold
        # (all its ties are kept). If rounding keeps cum below top_p to the end, the index lands on a masked
        # -inf entry and nothing more is removed.
        first = (cum < top_p).sum(dim=-1, keepdim=True).clamp(max=V - 1)
        keep = keep & (x >= xs.gather(-1, first))
    probs = torch.softmax((x / temperature).masked_fill(~keep, float("-inf")), dim=-1)
    out = (probs.to(weight.dtype) @ weight).reshape(*lead, weight.shape[-1])
    if return_probs:
        return out, probs.to(torch.promote_types(probs.dtype, torch.float32)).reshape(logits.shape)
    return out


# ---- skinny_linear ------------------------------------------------------------------------------------


def skinny_linear_reference(x, weight, bias=None):
    """x @ weight.T + bias (x (M, K), weight (N, K), bias (N,) or None)."""
    out = x @ weight.T
    return out if bias is None else out + bias


def skinny_linear_input_grad_reference(grad_out, weight):
    """grad_out @ weight: the input gradient of skinny_linear (grad_out (M, N), weight (N, K))."""
    return grad_out @ weight


# ---- gelu_tanh ---------------------------------------------------------------------------------------------


def gelu_tanh_reference(x):
    """x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's activation, written out."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_tanh_backward_reference(grad_out, x):
    """grad_out * d gelu_tanh / dx, by autograd through gelu_tanh_reference."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        (dx,) = torch.autograd.grad(gelu_tanh_reference(x), x, grad_out)
    return dx


def argmax_last_reference(x):
    """Each row's index (last dimension) of its first NaN where it has one, else of its first maximum: torch.argmax's
    rules, written out (a comparison per element, no aten argmax)."""
    isnan = torch.isnan(x)

    def first(mask):
        return torch.where(mask, torch.arange(x.shape[-1], device=x.device), x.shape[-1]).amin(-1)

    at_max = x == torch.where(isnan, -math.inf, x).amax(-1, keepdim=True)
    return torch.where(isnan.any(-1), first(isnan), first(at_max))


def draw_categorical_reference(probs, uniforms):
    """(index, ok) of each row of probs (n, V) at its uniform: the first index whose float64 cumulative sum exceeds
    min(u * total, the float64 below total), clamped into the row; ok where the total is finite and positive."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1), ((total > 0) & torch.isfinite(total))[:, 0]
