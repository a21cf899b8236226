"""Deferred cache-row gradients of one-row passes (`cache._DeferredRows`, the CPU op
`latent_attention_decode_bwd_deferred`): the op gives latent_attention_bwd's dq bitwise and, once its P / dS are
added (flush), its dK / dV; a multi-pass cache backward and a LatentLM training step give with the deferral what
they give without it (and the deferral does run); bad arguments to the op are clear errors."""
from __future__ import annotations

import pytest
import torch

from coconut_kernels import LatentLM
from coconut_kernels.cache import KVCache, _DeferredRows, set_deferred_kv_grads
from coconut_kernels.data import RaggedCollator
from coconut_kernels.ops.latent_attention import grad_accumulators
from coconut_kernels.reference import latent_attention_decode_bwd_deferred_reference

from .test_cache import CASES, concat_attention_passes, leaves, loss_of, make_passes, run_cache

ops = torch.ops.coconut


def _call_case(dtype, Hq, Hkv, rotary_dim, dropout, seed):
    g = torch.Generator().manual_seed(seed)
    B, T, D = 4, 24, 16
    leftpad = torch.tensor([0, 3, 1, 0], dtype=torch.int32)
    seqlens = torch.tensor([9, 14, 20, 5], dtype=torch.int32)  # rows before this pass's one
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    q = torch.randn(B, 1, Hq, D, generator=g, dtype=dtype)
    rot = (None, None)
    if rotary_dim:
        ang = torch.rand(T, rotary_dim // 2, generator=g, dtype=torch.float64) * 6
        rot = (ang.cos().to(dtype), ang.sin().to(dtype))
    drop = (0.25, 77) if dropout else (0.0, 0)
    args = (seqlens, leftpad, None, *rot, False, D ** -0.5)
    out, lse = ops.latent_attention_fwd(q, k, v, *args, True, *drop)
    go = torch.randn(out.shape, generator=g, dtype=dtype)
    return q, k, v, out, lse, go, args, drop


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,rotary_dim,dropout", [((2, 2), 0, False), ((4, 2), 16, False), ((4, 1), 8, True)])
def test_op_gives_the_plain_backward_once_flushed(dtype, heads, rotary_dim, dropout):
    Hq, Hkv = heads
    q, k, v, out, lse, go, args, drop = _call_case(dtype, Hq, Hkv, rotary_dim, dropout, seed=Hq + rotary_dim)
    gk_ref, gv_ref = grad_accumulators(k, 1)
    dq_ref = ops.latent_attention_bwd(go, q, k, v, out, lse, *args, True, gk_ref, gv_ref, *drop)
    acc = gk_ref.dtype
    B, _, _, D = q.shape
    for ends in ([0, 0, 0, 0], [5, 9, 21, 2], [10, 15, 21, 6]):  # none, some rows (pads included), every row
        ends = torch.tensor(ends, dtype=torch.int32)
        R = 21
        gk, gv = grad_accumulators(k, 1)
        p, ds = torch.zeros(B, Hq, R, dtype=acc), torch.zeros(B, Hq, R, dtype=acc)
        q_rot = torch.empty(B, Hq, D, dtype=acc)
        dq = ops.latent_attention_decode_bwd_deferred(go, q, k, v, out, lse, *args, gk, gv, ends, p, ds, q_rot,
                                                      *drop)
        assert torch.equal(dq, dq_ref)
        rows = _DeferredRows()
        rows.p, rows.ds, rows.q, rows.do = [p], [ds], [q_rot], [go.view(B, Hq, D).to(acc)]
        for b, e in enumerate(ends.tolist()):  # the accumulators hold no deferred row yet
            assert gk[b, :e].abs().max() == 0 if e else True
        rows.flush((gk, gv))
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gk, gk_ref, **tol)
        torch.testing.assert_close(gv, gv_ref, **tol)
        assert not rows.p  # flushed once


@pytest.mark.parametrize("heads,rotary_dim,dropout", [((2, 2), 0, False), ((4, 2), 16, True)])
def test_op_matches_its_oracle(heads, rotary_dim, dropout):
    Hq, Hkv = heads
    q, k, v, out, lse, go, args, drop = _call_case(torch.float64, Hq, Hkv, rotary_dim, dropout, seed=5)
    B, _, _, D = q.shape
    ends = torch.tensor([4, 16, 12, 6], dtype=torch.int32)
    res = []
    for op in (ops.latent_attention_decode_bwd_deferred, latent_attention_decode_bwd_deferred_reference):
        gk, gv = grad_accumulators(k, 1)
        p, ds = torch.zeros(B, Hq, 18, dtype=torch.float64), torch.zeros(B, Hq, 18, dtype=torch.float64)
        q_rot = torch.empty(B, Hq, D, dtype=torch.float64)
        dq = op(go, q, k, v, out, lse, *args, gk, gv, ends, p, ds, q_rot, *drop)
        res.append((dq, gk, gv, p, ds, q_rot))
    assert res[0][3].abs().sum() > 0 and res[0][4].abs().sum() > 0
    for name, a, b in zip(("dq", "grad_k", "grad_v", "p_out", "ds_out", "q_out"), *res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_opcheck():
    q, k, v, out, lse, go, args, drop = _call_case(torch.float32, 4, 2, 16, True, seed=9)
    B, _, Hq, D = q.shape
    gk, gv = grad_accumulators(k, 1)
    torch.library.opcheck(ops.latent_attention_decode_bwd_deferred.default,
                          (go, q, k, v, out, lse, *args, gk, gv, torch.tensor([3, 8, 0, 5], dtype=torch.int32),
                           torch.zeros(B, Hq, 10), torch.zeros(B, Hq, 10), torch.empty(B, Hq, D), *drop))


def test_op_rejects_bad_arguments():
    q, k, v, out, lse, go, args, drop = _call_case(torch.float32, 2, 2, 0, False, seed=0)
    B, _, Hq, D = q.shape
    gk, gv = grad_accumulators(k, 1)

    def call(ends=None, p=None, ds=None, q_rot=None, qq=None):
        ends = torch.tensor([1, 2, 3, 4], dtype=torch.int32) if ends is None else ends
        p = torch.zeros(B, Hq, 8) if p is None else p
        ds = torch.zeros(B, Hq, 8) if ds is None else ds
        q_rot = torch.empty(B, Hq, D) if q_rot is None else q_rot
        qq = q if qq is None else qq
        return ops.latent_attention_decode_bwd_deferred(go, qq, k, v, out, lse, *args, gk, gv, ends, p, ds, q_rot,
                                                        *drop)

    cases = [
        (dict(ends=torch.tensor([1, 2, 3, 9], dtype=torch.int32)), "defer_end\\[3\\] = 9 is out of range"),
        (dict(ends=torch.tensor([1, 2, 3, 4])), "defer_end must be an int32"),
        (dict(ends=torch.tensor([1, 2], dtype=torch.int32)), "defer_end must be an int32 CPU tensor of shape"),
        (dict(p=torch.zeros(B, Hq + 1, 8)), "p_out must have shape"),
        (dict(ds=torch.zeros(B, Hq, 8, dtype=torch.float64)), "ds_out must be a contiguous CPU tensor of Float"),
        (dict(q_rot=torch.empty(B, Hq, D + 1)), "q_out must be"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call(**kw)
    q2 = torch.randn(B, 2, Hq, D)
    with pytest.raises(ValueError, match="one row per sequence"):
        ops.latent_attention_decode_bwd_deferred(go.expand(B, 2, Hq, D).contiguous(), q2, k, v,
                                                 out.expand(B, 2, Hq, D).contiguous(), lse.expand(B, Hq, 2).contiguous(),
                                                 *args, gk, gv, torch.ones(B, dtype=torch.int32),
                                                 torch.zeros(B, Hq, 8), torch.zeros(B, Hq, 8), torch.empty(B, Hq, D),
                                                 *drop)


@pytest.fixture
def flushes(monkeypatch):
    """Records how many passes each flush adds (the deferral did run)."""
    seen = []
    real = _DeferredRows.flush

    def counting(self, grad_kv):
        if self.p:
            seen.append(len(self.p))
        return real(self, grad_kv)

    monkeypatch.setattr(_DeferredRows, "flush", counting)
    yield seen
    set_deferred_kv_grads(True)


@pytest.mark.parametrize("case", ["ragged_leftpad", "gqa_rotary", "mqa_rotary_interleaved_partial"])
def test_cache_backward_with_and_without_the_deferral(case, flushes):
    B, L, Hq, Hkv, D, leftpad, rotary_dim, interleaved = CASES[case]
    leftpad = torch.tensor(leftpad)
    ragged = {7: torch.tensor([7, 5, 6][:B]), 5: torch.tensor([5, 3, 4][:B]), 1: torch.ones(B, dtype=torch.long)}
    passes = make_passes(B, L, Hq, Hkv, D, [7] + [1] * 6 + [5] + [1] * 2, lambda S: ragged[S], torch.float64)
    rotary = None
    if rotary_dim:
        ang = torch.rand(32, rotary_dim // 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 6
        rotary = (ang.cos(), ang.sin())
    grads = {}
    for on in (False, True):
        set_deferred_kv_grads(on)
        flushes.clear()
        cache = KVCache(L, B, 24, Hkv, D, dtype=torch.float64, leftpad=leftpad)
        outs = run_cache(cache, passes, rotary, interleaved)
        grads[on] = torch.autograd.grad(loss_of(outs), leaves(passes))
        # per layer: the 8 one-row passes after the first defer, each added once (by the first pass's backward,
        # or earlier where the records outgrow the accumulators: MQA's single kv head makes those small)
        assert sum(flushes) == (8 * L if on else 0) and (not on or len(flushes) >= L), flushes
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_deferral_in_forks(flushes):
    B, L, Hq, Hkv, D = 2, 1, 2, 2, 8
    passes = make_passes(B, L, Hq, Hkv, D, [4, 1, 1], lambda S: torch.full((B,), S), torch.float64)
    cache = KVCache(L, B, 12, Hkv, D, dtype=torch.float64)
    outs = run_cache(cache, passes[:1])
    fork = cache.fork()
    outs += run_cache(fork, passes[1:])
    torch.autograd.grad(loss_of(outs), leaves(passes))
    assert flushes == []


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("order", ["parent_first", "fork_first"])
def test_a_parent_that_runs_on_after_a_fork_keeps_the_forks_gradient(defer, order, flushes):
    """A fork's first pass hands its share of the copied rows to the parent's accumulators, possibly before the
    parent's own last pass runs (when the parent's later passes were created first): that pass must not take
    them for leftovers of another backward."""
    set_deferred_kv_grads(defer)
    B, L, Hq, Hkv, D = 2, 1, 2, 2, 8
    leftpad = torch.tensor([0, 1])
    n_of = lambda S: torch.full((B,), S)  # noqa: E731
    prefix = make_passes(B, L, Hq, Hkv, D, [5, 1, 1], n_of, torch.float64, seed=1)
    tail = make_passes(B, L, Hq, Hkv, D, [1, 1], n_of, torch.float64, seed=2)
    child = make_passes(B, L, Hq, Hkv, D, [1, 1], n_of, torch.float64, seed=3)
    every = leaves(prefix) + leaves(tail) + leaves(child)
    ref_loss = loss_of(concat_attention_passes(prefix + tail, leftpad, Hkv), seed=0) + \
        loss_of(concat_attention_passes(prefix + child, leftpad, Hkv)[len(prefix):], seed=1)
    ref = torch.autograd.grad(ref_loss, every)
    cache = KVCache(L, B, 16, Hkv, D, dtype=torch.float64, leftpad=leftpad)
    pre = run_cache(cache, prefix)
    fork = cache.fork()
    if order == "parent_first":
        pt, ch = run_cache(cache, tail), run_cache(fork, child)
    else:
        ch, pt = run_cache(fork, child), run_cache(cache, tail)
    got = torch.autograd.grad(loss_of(pre + pt, seed=0) + loss_of(ch, seed=1), every)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_many_passes_flush_early(flushes):
    """Once a layer's deferred records outweigh its accumulators they are added in before the first pass's
    backward: the memory stays bounded, the gradients the same."""
    B, L, Hq, Hkv, D = 2, 1, 2, 2, 4
    passes = make_passes(B, L, Hq, Hkv, D, [6] + [1] * 40, lambda S: torch.full((B,), S), torch.float64)
    grads = {}
    for on in (False, True):
        set_deferred_kv_grads(on)
        flushes.clear()
        cache = KVCache(L, B, 48, Hkv, D, dtype=torch.float64)
        grads[on] = torch.autograd.grad(loss_of(run_cache(cache, passes)), leaves(passes))
    # records of 2 * B * Hq * (6 + 4) values per pass against 2 * B * 48 * Hkv * D: a flush every 20 passes
    assert flushes == [20, 20]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


V = 61
EOS, BOT, LAT, EOT = V - 4, V - 3, V - 2, V - 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_step_with_and_without_the_deferral(family, flushes):
    from coconut_kernels.models import GPT2, GPT2Config, Llama, LlamaConfig

    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2(GPT2Config(vocab_size=V, n_layer=2, n_head=2, d_model=16, max_position=64))
    else:
        model = Llama(LlamaConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48,
                                  max_position=64))
    lm = LatentLM(model, LAT, BOT, EOT, EOS)
    ex = [{"input_ids": [3, 4, 5, 6, BOT] + [LAT] * k + [EOT, 7, 8, 9][:2 + k % 2],
           "labels": [-100] * (5 + k) + [EOT, 7, 8, 9][:2 + k % 2]} for k in (3, 0, 5)]
    batch = RaggedCollator(EOS, LAT)(ex)
    out = {}
    for on in (False, True):
        set_deferred_kv_grads(on)
        flushes.clear()
        model.zero_grad()
        loss = lm(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        out[on] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert (sum(flushes) > 0) == on
    assert torch.equal(out[True][0], out[False][0])
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

