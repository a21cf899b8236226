"""latent_attention: incremental attention over a preallocated KV cache, with backward.

Python entry point, fake kernels of the four ops, backend choice and the autograd Function of the standalone
op. Multi-pass training through the cache (gradients into rows written by earlier passes) is KVCache's job
(coconut_kernels/cache.py), built on the helpers here.
"""
from __future__ import annotations

import importlib.util

import torch

from ..backend import get_backend
from ..errors import CoconutError, library_error
from ..validation import check_bool, check_dropout, check_int, check_real, check_same_device, check_tensor_args

__all__ = ["latent_attention", "draw_dropout_seed"]


def draw_dropout_seed() -> int:
    """A seed for the attention dropout, drawn from torch's default CPU generator (so torch.manual_seed makes
    it reproducible, and no device is synchronised)."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))

# The kernels' largest head dimension (csrc/latent_attention_checks.h; the CUDA kernels' register tiles are sized
# for it): KVCache and the model configs refuse a larger one when they are built, not at the first attention.
MAX_HEAD_DIM = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation type of lse and of the cache-gradient accumulators: fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels (shapes only: torch.compile, opcheck, meta tensors) ---------------------------------------


@torch.library.register_fake("coconut::kv_cache_append_")
def _append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin,
                 rotary_interleaved):
    return None


@torch.library.register_fake("coconut::latent_attention_fwd")
def _fwd_fake(q, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin,
              rotary_interleaved, softmax_scale, causal, dropout_p=0.0, dropout_seed=0):
    B, Sq, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, Sq),
                                                                                   dtype=_acc_dtype(q.dtype))


@torch.library.register_fake("coconut::latent_attention_bwd")
def _bwd_fake(grad_out, q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos,
              rotary_sin, rotary_interleaved, softmax_scale, causal, grad_k_cache, grad_v_cache, dropout_p=0.0,
              dropout_seed=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("coconut::latent_attention_decode_bwd_deferred")
def _decode_bwd_deferred_fake(grad_out, q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad, new_seqlens,
                              rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, grad_k_cache, grad_v_cache,
                              defer_end, p_out, ds_out, q_out, dropout_p=0.0, dropout_seed=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("coconut::latent_attention")
def _composite_fake(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cache_leftpad=None, new_seqlens=None,
                    rotary_cos=None, rotary_sin=None, rotary_interleaved=False, softmax_scale=None, causal=True,
                    dropout_p=0.0, dropout_seed=0):
    return _fwd_fake(q, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin,
                     rotary_interleaved, softmax_scale, causal)


# ---- backend choice ------------------------------------------------------------------------------------------

# Query rows per sequence up to which the "cuda" backend runs its CUDA C++ split-KV forward. That kernel gives
# every query row (b, t, kv head) its own blocks, each streaming the row's whole key range: its K/V reads grow
# with Sq, and pay off only while the key splits are what keeps the SMs busy (decode, latent passes, Jacobi
# passes of a few thoughts). The tiled Triton forward reads each K/V tile once for 16-64 query rows, so passes
# with more rows (prefix passes, Sq = 300) run there. The crossover is a design estimate until
# benchmarks/gpu_check.sh times both on a GPU.
SPLIT_KV_MAX_QUERIES = 8
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def cuda_forward_kernel(Sq: int, triton_available: bool) -> str:
    """The forward the "cuda" backend runs for Sq query rows: "split_kv" (CUDA C++, flash-decoding) or "tiled"
    (Triton); split-KV serves every Sq where Triton is not installed."""
    return "split_kv" if Sq <= SPLIT_KV_MAX_QUERIES or not triton_available else "tiled"


def _routes_to_tiled(q) -> bool:
    return cuda_forward_kernel(q.shape[1], _HAS_TRITON) == "tiled"


def _cuda_fwd(q, k_cache, v_cache, *args):
    """latent_attention_fwd of the "cuda" backend: split-KV or tiled by cuda_forward_kernel. Both return lse
    (B, Hq, Sq) fp32 and out in q's dtype, so the CUDA C++ backward takes either."""
    if _routes_to_tiled(q):
        from ..triton import latent_attention as tri

        return tri.latent_attention_fwd_triton(q, k_cache, v_cache, *args)
    return torch.ops.coconut.latent_attention_fwd.default(q, k_cache, v_cache, *args)


def _backend(device: torch.device, dropout: bool) -> str:
    """The backend that runs a call on `device`: the CUDA C++ kernels have no attention dropout, so a call with
    dropout goes to Triton there (to the reference where Triton is not installed)."""
    backend = get_backend(device)
    if backend == "cuda" and dropout:
        return "triton" if _HAS_TRITON else "torch"
    return backend


def kernels(device: torch.device, dropout: bool = False):
    """(append, fwd, bwd) callables with the op signatures for the backend that runs on `device` (a call with
    attention dropout when `dropout`)."""
    backend = _backend(device, dropout)
    if backend in ("cpu", "cuda"):
        ops = torch.ops.coconut
        fwd = ops.latent_attention_fwd.default if backend == "cpu" else _cuda_fwd
        return ops.kv_cache_append_.default, fwd, ops.latent_attention_bwd.default
    if backend == "triton":
        from ..triton import latent_attention as tri  # imported lazily: needs triton and a GPU (or the interpreter)

        return tri.kv_cache_append_triton, tri.latent_attention_fwd_triton, tri.latent_attention_bwd_triton
    from .. import reference  # the "torch" backend (backend.py) runs the tests' oracle itself, for debugging

    return (reference.kv_cache_append_reference, reference.latent_attention_fwd_reference,
            reference.latent_attention_bwd_reference)


def append_and_attend(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos,
                      rotary_sin, rotary_interleaved, softmax_scale, causal, dropout_p=0.0, dropout_seed=0):
    """kv_cache_append_ then latent_attention_fwd: (out, lse). Every argument is checked before the cache is
    written (the compiled composite op does it in C++; here q, and the append checks the rest before writing),
    so a rejected call leaves the cache unchanged."""
    args = (cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin, rotary_interleaved)
    # The compiled ops check devices too, but a mix with the meta device dispatches to the fake kernels, which
    # return meta tensors: so the devices are checked here, for every backend, as the C++ checks name them.
    check_same_device(k_cache.device, "k_cache's", q=q, k_new=k_new, v_new=v_new, v_cache=v_cache,
                      cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad, new_seqlens=new_seqlens,
                      rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    try:
        backend = _backend(q.device, dropout_p > 0)
        if backend == "cpu" or (backend == "cuda" and not _routes_to_tiled(q)):
            return torch.ops.coconut.latent_attention.default(q, k_new, v_new, k_cache, v_cache, *args,
                                                              softmax_scale, causal, dropout_p, dropout_seed)
        if q.dim() != 4 or k_new.dim() != 4 or q.shape[:2] != k_new.shape[:2] or q.shape[3] != k_new.shape[3] \
                or q.shape[2] % k_new.shape[2] != 0:
            raise CoconutError(f"q {tuple(q.shape)} must be (B, Sq, Hq, D) with B, Sq, D as k_new "
                               f"{tuple(k_new.shape)} and Hq a multiple of its head count")
        if q.dtype != k_new.dtype or q.device != k_new.device:
            raise CoconutError(f"q must have k_new's dtype and device ({k_new.dtype}, {k_new.device}), got "
                               f"{q.dtype}, {q.device}")
        append, fwd, _ = kernels(q.device, dropout_p > 0)
        append(k_cache, v_cache, k_new, v_new, *args)
        return fwd(q, k_cache, v_cache, *args, softmax_scale, causal, dropout_p, dropout_seed)
    except ValueError as e:  # the kernels' own argument checks (C++ TORCH_CHECK_VALUE, Triton wrappers)
        raise library_error(e) from None


def check_dropout_args(dropout_p, dropout_seed) -> tuple[float, int]:
    """(dropout_p, dropout_seed) checked, the seed drawn (draw_dropout_seed) when None and dropout_p > 0."""
    p = check_dropout(dropout_p, "dropout_p")
    if dropout_seed is None:
        return p, draw_dropout_seed() if p > 0 else 0
    return p, check_int(dropout_seed, "dropout_seed", low=0, high=2 ** 63 - 1)


def no_double_backward(where: str) -> RuntimeError:
    """The error of a backward run with create_graph=True through the attention."""
    return RuntimeError(f"{where}: double backward (create_graph=True) through the attention is not supported: "
                        "its backward kernels have no derivative")


def grad_accumulators(k_cache, pad_rows: int):
    """Zeroed dK, dV accumulators (the cache's shape; fp32, fp64 for fp64 caches) for latent_attention_bwd.

    Each is the head of a flat buffer with `pad_rows` spare rows behind it, so that NewRows.take can take any
    sequence's new rows as one window of the buffer even where they run past Tmax (masked rows)."""
    B, T, H, D = k_cache.shape

    def one():
        buf = torch.zeros(B * T + pad_rows, H * D, dtype=_acc_dtype(k_cache.dtype), device=k_cache.device)
        return buf[: B * T].view(B, T, H, D)

    return one(), one()


def unrotate(x, cos, sin, positions, interleaved: bool = False):
    """The inverse rotary rotation (angle -θ) of the first 2 * cos.shape[1] dims of x (B, S, H, D) at positions
    (B, S): maps the gradient of rotated keys back to the un-rotated ones. NeoX pairs (i, i + half), or (2i, 2i+1)
    when interleaved, as the kernels rotate. Positions are clamped into the table (their rows are masked)."""
    half = cos.shape[1]
    if half == 0:
        return x
    pos = positions.long().clamp(0, cos.shape[0] - 1)
    c = cos.to(x.dtype)[pos][:, :, None, :]  # (B, S, 1, half)
    s = sin.to(x.dtype)[pos][:, :, None, :]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack((x1 * c + x2 * s, x2 * c - x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        y = torch.cat((x1 * c + x2 * s, x2 * c - x1 * s), dim=-1)
    return torch.cat((y, rest), dim=-1)


class NewRows:
    """Where a pass's new rows sit in accumulators made by grad_accumulators: sequence b's rows
    cache_seqlens[b] + t, t < n_rows, are the window of the flat (B * Tmax + pad, Hkv * D) buffer that starts at
    row b * Tmax + cache_seqlens[b]; rows t >= new_seqlens[b] or past Tmax are masked. Computed once per pass
    and reused by every layer (KVCache) and for both accumulators. No host sync."""

    __slots__ = ("n_rows", "Tmax", "start", "valid", "rows", "leftpad", "_masks")

    def __init__(self, cache_seqlens, cache_leftpad, new_seqlens, n_rows: int, Tmax: int):
        device = cache_seqlens.device
        B = cache_seqlens.shape[0]
        self.n_rows, self.Tmax, self.leftpad = n_rows, Tmax, cache_leftpad
        t = torch.arange(n_rows, device=device)
        self.rows = cache_seqlens.long()[:, None] + t  # (B, n_rows)
        valid = self.rows < Tmax
        if new_seqlens is not None:
            valid &= t < new_seqlens.long()[:, None]
        self.valid = valid[:, :, None, None]
        self.start = torch.arange(0, B * Tmax, Tmax, device=device) + cache_seqlens.long().clamp(0, Tmax)
        self._masks = {}

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        m = self._masks.get(dtype)
        if m is None:
            m = self._masks[dtype] = self.valid.to(dtype)
        return m

    def take(self, acc, rotary_cos=None, rotary_sin=None, rotary_interleaved=False, dtype=None):
        """The new rows of one accumulator (B, n_rows, Hkv, D), un-rotated when rotary tables are given (keys),
        cast to dtype (default: the accumulator's)."""
        B, Tmax = acc.shape[:2]
        row = acc[0, 0].numel()
        if Tmax != self.Tmax or acc.storage_offset() != 0 or \
                acc.untyped_storage().nbytes() < (B * Tmax + self.n_rows) * row * acc.element_size():
            raise RuntimeError("NewRows.take needs accumulators from grad_accumulators padded by n_rows rows")
        # One index_select copies whole windows (an elementwise gather was ~10x slower on CPU). B * Tmax + 1
        # windows: the last sequence's starts at row B * Tmax when its cache is full (cache_seqlens = Tmax, a
        # sequence sitting out the pass), and its n_rows rows lie in the padding.
        windows = acc.as_strided((B * Tmax + 1, self.n_rows * row), (row, 1))
        g = windows.index_select(0, self.start).view(B, self.n_rows, *acc.shape[2:]).mul_(self.mask(acc.dtype))
        if rotary_cos is not None:
            pos = self.rows if self.leftpad is None else self.rows - self.leftpad.long()[:, None]
            g = unrotate(g, rotary_cos, rotary_sin, pos, rotary_interleaved)
        return g if dtype is None else g.to(dtype)


# ---- standalone op with autograd ----------------------------------------------------------------------------


class _LatentAttention(torch.autograd.Function):
    """Append + attend; gradients for q, k_new, v_new. The earlier cache contents are constants, and the cache
    is held by plain reference (rows this call reads are not rewritten by later appends at larger seqlens)."""

    @staticmethod
    def forward(ctx, q, k_new, v_new, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos,
                rotary_sin, rotary_interleaved, softmax_scale, causal, dropout_p, dropout_seed):
        out, lse = append_and_attend(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens,
                                     rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, causal, dropout_p,
                                     dropout_seed)
        ctx.save_for_backward(q, out, lse)
        # Lengths are cloned: callers advance cache_seqlens in place before the backward runs.
        ctx.lengths = (cache_seqlens.clone(), None if cache_leftpad is None else cache_leftpad.clone(),
                       None if new_seqlens is None else new_seqlens.clone())
        ctx.cache = (k_cache, v_cache)
        ctx.args = (rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, causal)
        ctx.dropout = (dropout_p, dropout_seed)
        ctx.n_rows, ctx.new_dtype = k_new.shape[1], k_new.dtype
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():
            raise no_double_backward("latent_attention")
        q, out, lse = ctx.saved_tensors
        k_cache, v_cache = ctx.cache
        seqlens, leftpad, new_seqlens = ctx.lengths
        cos, sin, interleaved, scale, causal = ctx.args
        _, _, bwd = kernels(q.device, ctx.dropout[0] > 0)
        gk, gv = grad_accumulators(k_cache, ctx.n_rows)
        dq = bwd(grad_out.contiguous(), q, k_cache, v_cache, out, lse, seqlens, leftpad, new_seqlens, cos, sin,
                 interleaved, scale, causal, gk, gv, *ctx.dropout)
        rows = NewRows(seqlens, leftpad, new_seqlens, ctx.n_rows, k_cache.shape[1])
        dk = rows.take(gk, cos, sin, interleaved, ctx.new_dtype)
        dv = rows.take(gv, dtype=ctx.new_dtype)
        return dq, dk, dv, *([None] * 12)


def latent_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, causal=True,
                     cache_leftpad=None, new_seqlens=None, rotary_cos=None, rotary_sin=None,
                     rotary_interleaved=False, dropout_p=0.0, dropout_seed=None, return_lse=False):
    """Append new keys/values to a preallocated KV cache (in place) and attend the new queries to the cache.

    The decode/latent-pass primitive of flash-attention's ``flash_attn_with_kvcache``, with a backward pass.

    Arguments (B batch, Sq new tokens per sequence, Hq query heads, Hkv key/value heads, D head dim ≤ 256):
        q: (B, Sq, Hq, D). Hq must be a multiple of Hkv (GQA; Hkv = 1 is MQA): query head h uses kv head
            h // (Hq // Hkv).
        k_new, v_new: (B, Sq, Hkv, D), the new tokens' keys and values.
        k_cache, v_cache: (B, Tmax, Hkv, D), updated in place (last dimension contiguous).
        cache_seqlens: (B,) int32, the number of rows already in each sequence's cache (absolute row index,
            left padding included). Not changed: advance it yourself (or use ``KVCache``).
        softmax_scale: default D ** -0.5.
        causal: mask aligned bottom-right (see below); False lets every new token see all new tokens.
        cache_leftpad: (B,) int32 or None (= 0). Rows [0, cache_leftpad[b]) are padding: never attended, and
            rotary positions count from cache_leftpad[b]. It may exceed cache_seqlens[b] during the pass that
            writes the pad rows themselves (a left-padded prompt); those pad queries then see no key.
        new_seqlens: (B,) int32 or None (= Sq). Only rows t < new_seqlens[b] are appended and attended; rows
            t >= new_seqlens[b] give out = 0 and lse = -inf (ragged passes).
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) or None, rotary_dim even ≤ D; rotates the first
            rotary_dim dims of q and k_new (k is stored rotated). The position of cache row r is
            r - cache_leftpad[b]; seqlen_ro must cover every position written or queried.
        rotary_interleaved: False = NeoX/GPT-J-NeoX style (dims i and i + rotary_dim/2 rotate together),
            True = GPT-J style (dims 2i and 2i+1), as flash-attention.
        dropout_p: attention-probability dropout in [0, 1) (as nn.functional.dropout on the softmax output: the
            kept probabilities are scaled by 1 / (1 - dropout_p); lse stays the undropped one). Apply it in training
            only: the op does not look at a module's train/eval mode.
        dropout_seed: int in [0, 2^63): the seed of the keep mask, which the backward regenerates (nothing is
            stored). Element (b, h, t, j) (query head h of new row t, cache row j) is kept unless the Philox draw
            at counter ((b * Hq + h) * Sq + t) * Tmax + j falls below dropout_p (csrc/dropout.h; the same mask on
            every backend, and `coconut_kernels.reference.attention_dropout_keep` rebuilds it). None draws one
            from torch's default CPU generator (``draw_dropout_seed``).
        return_lse: also return lse (B, Hq, Sq), the log-sum-exp of the scaled scores.

    Dtypes: q, k_new, v_new, k_cache, v_cache share one of fp32, fp16, bf16 (and fp64 on CPU); accumulation is
    fp32 (fp64 for fp64); lse is fp32 (fp64 for fp64 inputs). Dropout runs in the CPU C++ and Triton kernels; on
    the "cuda" backend a call with dropout_p > 0 runs the Triton kernels.

    Mask: query t of sequence b sits at cache row s + t, s = cache_seqlens[b], p = cache_leftpad[b],
    n = new_seqlens[b]. Causal: it sees rows [p, s + t]; non-causal: rows [p, s + n). Example s = 4, p = 1,
    Sq = n = 3 (x = attended, . = masked, rows 4-6 are the new ones):

        cache row:  0 1 2 3 4 5 6
        query 0:    . x x x x . .
        query 1:    . x x x x x .
        query 2:    . x x x x x x

    Autograd: with grad enabled and q/k_new/v_new requiring grad, differentiable w.r.t. q, k_new and v_new
    (including the new tokens attending each other); the earlier cache contents are constants here (use
    ``KVCache`` to train through several passes). lse is not differentiable.

    Not supported: alibi, sliding windows, softcapping, paged caches, gradients w.r.t. lse or the
    rotary tables, double backward (raises), fp64 on CUDA. Validation of the lengths' values (cache_seqlens + n
    ≤ Tmax, rotary table length, ...) runs always on CPU and on CUDA only with COCONUT_DEBUG=1 (it needs a host
    sync); the kernels never write outside the cache.

    Returns out (B, Sq, Hq, D) in q's dtype, or (out, lse) with return_lse.
    """
    check_tensor_args(("cache_leftpad", "new_seqlens", "rotary_cos", "rotary_sin"), q=q, k_new=k_new, v_new=v_new,
                      k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, cache_leftpad=cache_leftpad,
                      new_seqlens=new_seqlens, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    if softmax_scale is not None:
        check_real(softmax_scale, "softmax_scale", low=0.0, low_open=True)
    for flag, name in ((causal, "causal"), (rotary_interleaved, "rotary_interleaved"), (return_lse, "return_lse")):
        check_bool(flag, name)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    drop = check_dropout_args(dropout_p, dropout_seed)
    args = (cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin, rotary_interleaved)
    if torch.is_grad_enabled() and (q.requires_grad or k_new.requires_grad or v_new.requires_grad):
        out, lse = _LatentAttention.apply(q, k_new, v_new, k_cache, v_cache, *args, scale, causal, *drop)
    else:
        out, lse = append_and_attend(q, k_new, v_new, k_cache, v_cache, *args, scale, causal, *drop)
    return (out, lse) if return_lse else out
