"""KVCache: multi-pass training through the cache against a plain concatenating implementation (past K/V
concatenated every pass, full masked attention), forward memory, the reset guard and rejected calls."""
import pytest
import torch

import coconut_kernels
from coconut_kernels import KVCache
from coconut_kernels.reference import attention_dropout_keep

from .helpers import assert_within_torch_error


def rope_complex(x, cos, sin, pos, interleaved):
    """Rotary as a complex multiplication (independent of reference.apply_rotary_reference)."""
    half = cos.shape[1]
    pos = pos.clamp(0, cos.shape[0] - 1)
    rot = torch.complex(cos[pos], sin[pos])[:, :, None, :].to(torch.complex128)  # (B, S, 1, half)
    xr, rest = x[..., : 2 * half].double(), x[..., 2 * half:]
    if interleaved:
        z = torch.view_as_complex(xr.reshape(*xr.shape[:-1], half, 2).contiguous()) * rot
        y = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(xr[..., :half], xr[..., half:]) * rot
        y = torch.cat((z.real, z.imag), -1)
    return torch.cat((y.to(x.dtype), rest), -1)


def concat_attention_passes(passes, leftpad, Hkv, rotary=None, interleaved=False, causal=True, dropout=None):
    """The plain way: every pass concatenates all past (rotated) K/V of the layer and runs full attention.

    passes: list of (qkv per layer: [(q, k, v)], n_new (B,)). dropout: (p, seeds[pass][layer], Tmax): the
    probabilities are dropped with reference.attention_dropout_keep's mask, its key axis the keys' cache rows.
    Returns outs[pass][layer]."""
    B = leftpad.shape[0]
    L = len(passes[0][0])
    past = [[] for _ in range(L)]
    seqlens = torch.zeros(B, dtype=torch.long)
    outs = []
    for i, (qkv, n_new) in enumerate(passes):
        S = qkv[0][0].shape[1]
        t = torch.arange(S)
        rows = seqlens[:, None] + t  # (B, S) cache row of each new token
        valid = t[None, :] < n_new[:, None]
        pos = rows - leftpad[:, None]
        pass_out = []
        for layer, (q, k, v) in enumerate(qkv):
            if rotary is not None:
                q = rope_complex(q, *rotary, pos, interleaved)
                k = rope_complex(k, *rotary, pos, interleaved)
            past[layer].append((k, v, rows, valid))
            K = torch.cat([p[0] for p in past[layer]], 1)
            V = torch.cat([p[1] for p in past[layer]], 1)
            R = torch.cat([p[2] for p in past[layer]], 1)
            ok = torch.cat([p[3] for p in past[layer]], 1)
            G = q.shape[2] // Hkv
            K, V = K.repeat_interleave(G, 2), V.repeat_interleave(G, 2)
            scores = torch.einsum("bshd,bthd->bhst", q, K) * q.shape[-1] ** -0.5
            last = rows if causal else (seqlens + n_new - 1)[:, None].expand(-1, S)
            mask = ok[:, None, :] & (R[:, None, :] >= leftpad[:, None, None]) & (R[:, None, :] <= last[:, :, None])
            mask &= valid[:, :, None]
            s = scores.masked_fill(~mask[:, None], float("-inf"))
            s = s.masked_fill(~mask.any(-1)[:, None, :, None], 0.0)
            p = torch.softmax(s, -1) * mask[:, None]
            if dropout is not None:
                prob, seeds, Tmax = dropout
                keep = attention_dropout_keep(seeds[i][layer], prob, B, q.shape[2], S, Tmax)
                p = p * keep.gather(-1, R[:, None, None, :].expand(-1, q.shape[2], S, -1)) / (1 - prob)
            pass_out.append(torch.einsum("bhst,bthd->bshd", p, V))
        outs.append(pass_out)
        seqlens = seqlens + n_new
    return outs


def make_passes(B, L, Hq, Hkv, D, lengths, n_new_of, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    passes = []
    for S in lengths:
        qkv = [tuple(torch.randn(B, S, h, D, generator=g, dtype=dtype).requires_grad_() for h in (Hq, Hkv, Hkv))
               for _ in range(L)]
        passes.append((qkv, n_new_of(S)))
    return passes


def run_cache(cache, passes, rotary=None, interleaved=False, causal=True, ragged=True, dropout=None):
    outs = []
    for i, (qkv, n_new) in enumerate(passes):
        ns = n_new.to(torch.int32) if ragged else None
        rot = {} if rotary is None else dict(rotary_cos=rotary[0], rotary_sin=rotary[1])
        drop = lambda layer: {} if dropout is None else dict(dropout_p=dropout[0], dropout_seed=dropout[1][i][layer])  # noqa: E731
        outs.append([cache.attend(layer, q, k, v, new_seqlens=ns, rotary_interleaved=interleaved, causal=causal, **rot,
                                  **drop(layer))
                     for layer, (q, k, v) in enumerate(qkv)])
        cache.advance(ns if ragged else qkv[0][0].shape[1])
    return outs


def loss_of(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for po in outs for o in po)


def leaves(passes):
    return [x for qkv, _ in passes for triple in qkv for x in triple]


CASES = {
    # name: (B, L, Hq, Hkv, D, leftpad, rotary_dim, interleaved)
    "plain": (2, 2, 2, 2, 16, [0, 0], 0, False),
    "ragged_leftpad": (3, 2, 2, 2, 16, [0, 2, 1], 0, False),
    "gqa_rotary": (3, 2, 4, 2, 16, [1, 0, 3], 16, False),
    "mqa_rotary_interleaved_partial": (2, 1, 4, 1, 32, [2, 0], 16, True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES) + ["gqa_rotary_dropout"])
def test_multipass_gradients_match_concatenation(case, dtype):
    drop = case.endswith("_dropout")
    case = case.removesuffix("_dropout")
    B, L, Hq, Hkv, D, leftpad, rotary_dim, interleaved = CASES[case]
    leftpad = torch.tensor(leftpad)
    prefix, suffix = 7, 5
    lengths = [prefix] + [1] * 6 + [suffix]
    g = torch.Generator().manual_seed(3)
    ragged = {prefix: torch.tensor([7, 5, 6][:B]), suffix: torch.tensor([5, 3, 4][:B]), 1: torch.ones(B, dtype=torch.long)}
    passes = make_passes(B, L, Hq, Hkv, D, lengths, lambda S: ragged[S], dtype)
    rotary = None
    if rotary_dim:
        ang = torch.rand(32, rotary_dim // 2, generator=g, dtype=torch.float64) * 6
        rotary = (ang.cos().to(dtype), ang.sin().to(dtype))

    # dropout: each pass and layer its own seed, the mask of every backend's rule
    dropout = (0.3, [[100 * i + layer for layer in range(L)] for i in range(len(passes))]) if drop else None
    ref = concat_attention_passes(passes, leftpad, Hkv, rotary, interleaved, dropout=dropout and (*dropout, 20))
    ref_grads = torch.autograd.grad(loss_of(ref), leaves(passes))

    cache = KVCache(L, B, 20, Hkv, D, dtype=dtype, leftpad=leftpad)
    outs = run_cache(cache, passes, rotary, interleaved, dropout=dropout)
    grads = torch.autograd.grad(loss_of(outs), leaves(passes))

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for po, pr in zip(outs, ref):
        for o, r in zip(po, pr):
            torch.testing.assert_close(o, r, **tol)
    names = [f"pass{i}.layer{l}.{n}" for i in range(len(passes)) for l in range(L) for n in "qkv"]
    for name, gc, gr in zip(names, grads, ref_grads):
        assert gc.abs().max() > 0 or gr.abs().max() == 0
        torch.testing.assert_close(gc, gr, **tol, msg=lambda m: f"{name}: {m}")
    assert all(a is None for a in cache._train.grad_kv), "the accumulators must be freed after the first pass's backward"


@pytest.mark.parametrize("case", ["ragged_leftpad", "gqa_rotary"])
def test_forks_of_a_prefix_match_concatenation(case):
    """Three forks continue one ragged prefix pass (one with two more passes): every output and every gradient,
    the prefix's included (each fork's share handed to the parent), equal running each branch by concatenation."""
    B, L, Hq, Hkv, D, leftpad, rotary_dim, interleaved = CASES[case]
    leftpad = torch.tensor(leftpad)
    dtype = torch.float64
    g = torch.Generator().manual_seed(5)
    rotary = None
    if rotary_dim:
        ang = torch.rand(32, rotary_dim // 2, generator=g, dtype=torch.float64) * 6
        rotary = (ang.cos(), ang.sin())
    ragged = {6: torch.tensor([6, 4, 5][:B]), 3: torch.tensor([3, 1, 2][:B]), 2: torch.tensor([2, 2, 0][:B])}
    prefix = make_passes(B, L, Hq, Hkv, D, [6], lambda S: ragged[S], dtype, seed=1)
    branches = [make_passes(B, L, Hq, Hkv, D, lengths, lambda S: ragged[S], dtype, seed=2 + i)
                for i, lengths in enumerate([[3], [2, 3], [3]])]
    everything = leaves(prefix) + [x for br in branches for x in leaves(br)]

    ref_loss = sum(loss_of(concat_attention_passes(prefix + br, leftpad, Hkv, rotary, interleaved), seed=i)
                   for i, br in enumerate(branches))
    ref_grads = torch.autograd.grad(ref_loss, everything)

    cache = KVCache(L, B, 16, Hkv, D, dtype=dtype, leftpad=leftpad)
    pre_out = run_cache(cache, prefix, rotary, interleaved)
    loss = 0.0
    for i, br in enumerate(branches):
        loss = loss + loss_of(pre_out + run_cache(cache.fork(), br, rotary, interleaved), seed=i)
    grads = torch.autograd.grad(loss, everything)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    for gc, gr in zip(grads, ref_grads):
        torch.testing.assert_close(gc, gr, rtol=1e-10, atol=1e-10)
    assert all(a is None for a in cache._train.grad_kv), "the parent's accumulators must be freed"


def test_feedback_model_gradients_match_concatenation():
    """A COCONUT-like loop: each pass's last output is fed back as the next pass's input (through weights),
    so gradients flow through the hidden states and through the cache into earlier passes."""
    torch.manual_seed(0)
    B, Hq, Hkv, D, L = 2, 4, 2, 8, 2
    C = Hq * D
    W = [tuple((torch.randn(C, n * D, dtype=torch.float64) * C ** -0.5).requires_grad_() for n in (Hq, Hkv, Hkv)) for _ in range(L)]
    x0 = torch.randn(B, 6, C, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(B, 4, C, dtype=torch.float64, requires_grad=True)

    def run(attend):
        x, outs = x0, []
        for step in range(5):
            h = x
            for layer, (wq, wk, wv) in enumerate(W):
                q, k, v = ((h @ w).unflatten(-1, (-1, D)) for w in (wq, wk, wv))
                h = h + attend(step, layer, q, k, v).flatten(-2)
            outs.append(h)
            x = h[:, -1:].tanh() if step < 3 else xs
        return sum((o ** 2).sum() for o in outs)

    cache = KVCache(L, B, 32, Hkv, D, dtype=torch.float64)

    def attend_cache(step, layer, q, k, v):
        out = cache.attend(layer, q, k, v)
        if layer == L - 1:
            cache.advance(q.shape[1])
        return out

    past = {}

    def attend_concat(step, layer, q, k, v):
        K, V = past.get(layer, (k[:, :0], v[:, :0]))
        K, V = torch.cat((K, k), 1), torch.cat((V, v), 1)
        past[layer] = (K, V)
        T, S = K.shape[1], q.shape[1]
        mask = torch.arange(T)[None, :] <= torch.arange(T - S, T)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), attn_mask=mask, enable_gqa=True).transpose(1, 2)

    params = [x0, xs] + [w for t in W for w in t]
    g_cache = torch.autograd.grad(run(attend_cache), params)
    g_ref = torch.autograd.grad(run(attend_concat), params)
    for a, b in zip(g_cache, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bf16_multipass_within_twice_torch_error():
    B, L, Hq, Hkv, D = 2, 1, 4, 2, 32
    passes64 = make_passes(B, L, Hq, Hkv, D, [9, 1, 1, 1, 6], lambda S: torch.full((B,), S), torch.float64)
    leftpad = torch.tensor([0, 3])
    ref = concat_attention_passes(passes64, leftpad, Hkv)
    ref_g = torch.autograd.grad(loss_of(ref), leaves(passes64))

    def cast(passes):
        return [([tuple(x.detach().bfloat16().requires_grad_() for x in t) for t in qkv], n) for qkv, n in passes]

    p_torch, p_cache = cast(passes64), cast(passes64)
    torch_out = concat_attention_passes(p_torch, leftpad, Hkv)
    torch_g = torch.autograd.grad(loss_of(torch_out), leaves(p_torch))
    cache = KVCache(L, B, 24, Hkv, D, dtype=torch.bfloat16, leftpad=leftpad)
    outs = run_cache(cache, p_cache, ragged=False)
    cache_g = torch.autograd.grad(loss_of(outs), leaves(p_cache))
    for o, t, r in zip(outs, torch_out, ref):
        assert_within_torch_error(o[0], r[0], t[0], name="out")
    for i, (c, t, r) in enumerate(zip(cache_g, torch_g, ref_g)):
        assert_within_torch_error(c, r, t, atol=1e-3, name=f"grad {i}")


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while fn() runs."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, t.shape, t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_forward_memory_does_not_grow_with_passes():
    """Saved-for-backward bytes: the cache path saves only each pass's q, out and lse (the new tokens' own
    activations); the concatenating path saves every pass's concatenated K/V."""
    B, L, H, D, prefix, n_mid, suffix = 4, 2, 4, 16, 40, 12, 8
    lengths = [prefix] + [1] * n_mid + [suffix]
    total = sum(lengths)
    passes = make_passes(B, L, H, H, D, lengths, lambda S: torch.full((B,), S), torch.float32)
    new_token_bytes = sum(x.numel() * x.element_size() for x in leaves(passes))  # q, k, v of every pass
    cache_bytes = 2 * L * B * total * H * D * 4

    cache = KVCache(L, B, total, H, D)
    used, outs = saved_bytes(lambda: run_cache(cache, passes, ragged=False))
    # q, out (and an fp32 lse per query head) per pass: bounded by the new tokens' activations.
    assert used <= new_token_bytes, (used, new_token_bytes)
    loss_of(outs).backward()

    ref_used, _ = saved_bytes(lambda: concat_attention_passes(passes, torch.zeros(B, dtype=torch.long), H))
    assert ref_used > 4 * cache_bytes, "the concatenating path keeps a copy of the past per pass"


def test_reset_between_forward_and_backward_raises():
    B, H, D = 2, 2, 8
    passes = make_passes(B, 1, H, H, D, [4, 1], lambda S: torch.full((B,), S), torch.float32)
    cache = KVCache(1, B, 8, H, D)
    outs = run_cache(cache, passes, ragged=False)
    cache.reset()
    with pytest.raises(RuntimeError, match="reset or cropped"):
        loss_of(outs).backward()


def test_inference_passes_need_no_autograd_and_match_reference():
    B, H, D = 3, 2, 16
    cache = KVCache(2, B, 16, H, D, leftpad=torch.tensor([0, 1, 2]))
    passes = make_passes(B, 2, H, H, D, [5, 1, 1], lambda S: torch.full((B,), S), torch.float32)
    ref = concat_attention_passes(passes, cache.leftpad.long(), H)
    with torch.no_grad():
        outs = run_cache(cache, passes, ragged=False)
    assert all(o.grad_fn is None for po in outs for o in po)
    assert torch.equal(cache.seqlens, torch.full((B,), 7, dtype=torch.int32))
    for po, pr in zip(outs, ref):
        for o, r in zip(po, pr):
            torch.testing.assert_close(o, r.detach())


def test_rejected_attend_leaves_cache_unchanged():
    B, H, D = 2, 2, 8
    cache = KVCache(1, B, 6, H, D)
    q = torch.randn(B, 4, H, D)
    cache.attend(0, q, q, q)
    cache.advance(4)
    k_before, seqlens_before = cache.k.clone(), cache.seqlens.clone()
    with pytest.raises(ValueError, match="exceeds the cache length"):
        cache.attend(0, q, q, q)  # 4 + 4 > 6
    with pytest.raises(ValueError, match="k_new"):
        cache.attend(0, q, q[:, :, :1], q)
    assert torch.equal(cache.k, k_before) and torch.equal(cache.seqlens, seqlens_before)


def test_crop_and_reset():
    cache = KVCache(1, 2, 8, 1, 4, leftpad=[1, 0])
    cache.advance(torch.tensor([5, 3], dtype=torch.int32))
    cache.crop(4)
    assert cache.seqlens.tolist() == [4, 3]
    generation = cache.generation
    cache.reset(leftpad=torch.tensor([2, 2]))
    assert cache.seqlens.tolist() == [0, 0] and cache.leftpad.tolist() == [2, 2]
    assert cache.generation > generation
    with pytest.raises(ValueError, match="shape"):
        cache.reset(leftpad=[1, 2, 3])


def test_public_api():
    assert coconut_kernels.KVCache is KVCache
    cache = KVCache(3, 2, 16, 2, 8, dtype=torch.float32)
    assert cache.k.shape == (3, 2, 16, 2, 8) and cache.v.shape == cache.k.shape
    assert cache.seqlens.dtype == torch.int32 and cache.leftpad.dtype == torch.int32


def test_training_steps_do_not_leak_caches():
    """Each step's cache (and its buffers) is freed once the step's graph is: nothing keeps it alive through the
    autograd nodes (a cache -> chain token -> node -> ctx -> cache cycle would be invisible to the gc)."""
    import gc
    import weakref

    refs = []
    for step in range(3):
        cache = KVCache(2, 2, 16, 2, 8)
        q, k, v = (torch.randn(2, 3, 2, 8, requires_grad=True) for _ in range(3))
        outs = []
        for _ in range(2):  # two passes of two layers
            outs += [cache.attend(layer, q, k, v) for layer in range(2)]
            cache.advance(3)
        sum(o.sum() for o in outs).backward()
        refs.append(weakref.ref(cache))
        del cache, outs
    gc.collect()
    assert all(r() is None for r in refs)


def test_one_new_seqlens_tensor_across_passes():
    """The layers of a pass share its lengths (KVCache._pass_lengths); a caller that passes one new_seqlens tensor
    to every pass, changed in place between passes or left as it is, must get each pass at its own lengths: the
    same outputs and gradients as with a fresh tensor per pass."""
    torch.manual_seed(21)
    B, H, D = 2, 2, 8
    passes = [(3, [3, 2]), (1, [1, 1]), (1, [1, 1]), (2, [2, 1])]
    inputs = [[torch.randn(B, n, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
              for n, _ in passes]

    def run(reuse_tensor):
        cache = KVCache(2, B, 8, H, D, dtype=torch.float64)
        shared = torch.zeros(B, dtype=torch.int32)
        outs = []
        for (n, counts), (q, k, v) in zip(passes, inputs):
            c = torch.tensor(counts, dtype=torch.int32)
            if reuse_tensor:
                if not torch.equal(shared, c):
                    shared.copy_(c)
                c = shared
            for layer in range(2):
                outs.append(cache.attend(layer, q * (layer + 1), k, v, new_seqlens=c))
            cache.advance(c)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [t for qkv in inputs for t in qkv])
        return [o.detach() for o in outs], grads

    outs, grads = run(True)
    ref_outs, ref_grads = run(False)
    for a, b in zip(outs + list(grads), ref_outs + list(ref_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the rows past new_seqlens are empty: the lengths in force were each pass's own
    assert all(torch.all(o[1, counts[1]:] == 0) for o, (n, counts) in zip(outs[::2], passes))
