"""latent_attention ops (append, fwd, bwd, composite) on CPU against reference.py in fp64, gradcheck, opcheck,
torch.compile, and input validation (every bad input named, and a rejected call leaves the cache alone)."""
import pytest
import torch

from coconut_kernels import latent_attention
from coconut_kernels import reference as R

from .helpers import assert_within_torch_error

ops = torch.ops.coconut
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make_case(B, Sq, Hq, Hkv, D, Tmax, *, rotary_dim=0, interleaved=False, leftpad=False, ragged=False,
              empty_cache=False, causal=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ri = lambda hi: torch.randint(0, hi + 1, (B,), generator=g, dtype=torch.int32)  # noqa: E731
    seqlens = torch.zeros(B, dtype=torch.int32) if empty_cache else ri(Tmax - Sq)
    c = dict(q=r(B, Sq, Hq, D), k_new=r(B, Sq, Hkv, D), v_new=r(B, Sq, Hkv, D), k_cache=r(B, Tmax, Hkv, D),
             v_cache=r(B, Tmax, Hkv, D), cache_seqlens=seqlens,
             cache_leftpad=(torch.rand(B, generator=g) * (seqlens + 1)).int() if leftpad else None,
             new_seqlens=ri(Sq) if ragged else None, rotary_cos=None, rotary_sin=None,
             rotary_interleaved=interleaved, causal=causal)
    if rotary_dim:
        ang = torch.rand(Tmax + 3, rotary_dim // 2, generator=g, dtype=torch.float64) * 6
        c["rotary_cos"], c["rotary_sin"] = ang.cos(), ang.sin()
    return c


def cast(c, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("rotary_cos", "rotary_sin")
                else v.clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}


def fwd_args(c):
    return (c["q"], c["k_cache"], c["v_cache"], c["cache_seqlens"], c["cache_leftpad"], c["new_seqlens"],
            c["rotary_cos"], c["rotary_sin"], c["rotary_interleaved"], c["q"].shape[-1] ** -0.5, c["causal"])


def append_args(c):
    return (c["k_cache"], c["v_cache"], c["k_new"], c["v_new"], c["cache_seqlens"], c["cache_leftpad"],
            c["new_seqlens"], c["rotary_cos"], c["rotary_sin"], c["rotary_interleaved"])


def run_all(c, impl):
    """Append + fwd + bwd with impl ("op" or "ref"); returns k_cache, v_cache, out, lse, dq, dk, dv."""
    append, fwd, bwd = ((ops.kv_cache_append_, ops.latent_attention_fwd, ops.latent_attention_bwd) if impl == "op"
                        else (R.kv_cache_append_reference, R.latent_attention_fwd_reference,
                              R.latent_attention_bwd_reference))
    append(*append_args(c))
    out, lse = fwd(*fwd_args(c))
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    gk = torch.zeros(c["k_cache"].shape, dtype=acc)
    gv = torch.zeros_like(gk)
    a = fwd_args(c)
    dq = bwd(grad_out, a[0], a[1], a[2], out, lse, *a[3:], gk, gv)
    return dict(k_cache=c["k_cache"], v_cache=c["v_cache"], out=out, lse=lse, dq=dq, dk=gk, dv=gv)


CASES = [
    # (B, Sq, Hq, Hkv, D, Tmax, options)
    (2, 1, 4, 1, 64, 2048, dict(rotary_dim=32, leftpad=True)),
    (3, 2, 2, 2, 32, 40, dict(leftpad=True, ragged=True, causal=False)),
    (3, 7, 6, 2, 80, 300, dict(rotary_dim=80, interleaved=True, leftpad=True, ragged=True)),
    (2, 64, 2, 1, 128, 80, dict(rotary_dim=64, empty_cache=True)),
    (2, 64, 4, 4, 32, 200, dict(rotary_dim=16, interleaved=True, leftpad=True, ragged=True)),
    (2, 7, 2, 2, 64, 7, dict(empty_cache=True, causal=False)),
    (3, 1, 3, 3, 128, 513, dict(ragged=True)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_op_matches_reference(case, dtype):
    B, Sq, Hq, Hkv, D, Tmax, opts = CASES[case]
    c64 = make_case(B, Sq, Hq, Hkv, D, Tmax, seed=case, **opts)
    ref = run_all(cast(c64, torch.float64), "ref")
    got = run_all(cast(c64, dtype), "op")
    assert torch.equal(got["lse"].isinf(), ref["lse"].isinf())
    if dtype in TOL:
        for name in ref:
            r = ref[name].nan_to_num(neginf=0) if name == "lse" else ref[name]
            g = got[name].nan_to_num(neginf=0) if name == "lse" else got[name]
            torch.testing.assert_close(g.double(), r, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    else:
        lowp = run_all(cast(c64, dtype), "ref")  # plain PyTorch in the same precision
        for name in ref:
            if name == "lse":
                continue
            assert_within_torch_error(got[name], ref[name], lowp[name], atol=1e-3, name=name)
        fin = ref["lse"].isfinite()
        assert_within_torch_error(got["lse"][fin], ref["lse"][fin], lowp["lse"][fin], atol=1e-3, name="lse")


@pytest.mark.parametrize("case", [0, 2])
def test_fp16_within_twice_torch_error(case):
    B, Sq, Hq, Hkv, D, Tmax, opts = CASES[case]
    c64 = make_case(B, Sq, Hq, Hkv, D, Tmax, seed=case, **opts)
    ref = run_all(cast(c64, torch.float64), "ref")
    got = run_all(cast(c64, torch.float16), "op")
    lowp = run_all(cast(c64, torch.float16), "ref")
    for name in ("k_cache", "out", "dq", "dk", "dv"):
        assert_within_torch_error(got[name], ref[name], lowp[name], atol=1e-4, name=name)


@pytest.mark.parametrize("threads", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_decode_split_along_keys(threads, dtype):
    """Sq = 1 with few sequences splits the keys across threads (here 1, 2 and 3 splits for 1, 4 and 8 threads):
    the forward merges the splits, the backward sums their dq. A long sequence, one with a single key (its other
    splits are empty), a left-padded one, one with no new token; GQA and rotary."""
    c64 = make_case(4, 1, 6, 2, 64, 1500, rotary_dim=16, seed=21)
    c64["cache_seqlens"] = torch.tensor([1400, 0, 1450, 700], dtype=torch.int32)
    c64["cache_leftpad"] = torch.tensor([0, 0, 1400, 0], dtype=torch.int32)
    c64["new_seqlens"] = torch.tensor([1, 1, 1, 0], dtype=torch.int32)
    ref = run_all(cast(c64, torch.float64), "ref")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_all(cast(c64, dtype), "op")
    finally:
        torch.set_num_threads(before)
    assert got["out"][3].abs().max() == 0 and got["lse"][3].isneginf().all() and got["dq"][3].abs().max() == 0
    if dtype not in TOL:  # bf16 cache: within 2x the error of plain PyTorch in bf16
        lowp = run_all(cast(c64, dtype), "ref")
        for name in ("out", "dq", "dk", "dv"):
            assert_within_torch_error(got[name], ref[name], lowp[name], atol=1e-3, name=name)
        assert_within_torch_error(got["lse"][:3], ref["lse"][:3], lowp["lse"][:3], atol=1e-3, name="lse")
        return
    for name in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name].double(), ref[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(got["lse"][:3].double(), ref["lse"][:3], **TOL[dtype])


def test_masked_rows_give_zero_and_untouched_cache_rows():
    c = make_case(3, 5, 2, 2, 16, 30, leftpad=True, ragged=True, seed=11)
    c["new_seqlens"] = torch.tensor([0, 2, 5], dtype=torch.int32)
    before = c["k_cache"].clone()
    out, lse = ops.latent_attention(*(c[k] for k in ("q", "k_new", "v_new", "k_cache", "v_cache", "cache_seqlens",
                                                       "cache_leftpad", "new_seqlens")))
    assert out[0].abs().max() == 0 and out[1, 2:].abs().max() == 0
    assert lse[0].isneginf().all() and lse[1, :, 2:].isneginf().all() and lse[2].isfinite().all()
    s = c["cache_seqlens"].tolist()
    assert torch.equal(c["k_cache"][0], before[0])
    assert torch.equal(c["k_cache"][1, s[1]:s[1] + 2], c["k_new"][1, :2])
    assert torch.equal(c["k_cache"][1, s[1] + 2:], before[1, s[1] + 2:])


def test_left_padded_prefix_pad_queries_see_nothing():
    """A left-padded prompt writes its own pad rows: leftpad > cache_seqlens is allowed in that pass."""
    c = make_case(2, 6, 2, 1, 16, 12, rotary_dim=8, empty_cache=True, seed=5)
    c["cache_leftpad"] = torch.tensor([3, 0], dtype=torch.int32)
    ref = run_all(cast(c, torch.float64), "ref")
    got = run_all(cast(c, torch.float64), "op")
    assert got["out"][0, :3].abs().max() == 0 and got["lse"][0, :, :3].isneginf().all()
    for name in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name], ref[name], **TOL[torch.float64])


def test_rotary_reference_matches_complex_rotation():
    from tests.test_cache import rope_complex

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 32, generator=g, dtype=torch.float64)
    ang = torch.rand(20, 12, generator=g, dtype=torch.float64) * 6
    pos = torch.randint(0, 20, (2, 5), generator=g)
    for inter in (False, True):
        y = R.apply_rotary_reference(x, ang.cos(), ang.sin(), pos, inter)
        torch.testing.assert_close(y, rope_complex(x, ang.cos(), ang.sin(), pos, inter))
        torch.testing.assert_close(R.apply_rotary_reference(y, ang.cos(), ang.sin(), pos, inter, inverse=True), x)


def entry_kwargs(c):
    return dict(cache_leftpad=c["cache_leftpad"], new_seqlens=c["new_seqlens"], rotary_cos=c["rotary_cos"],
                rotary_sin=c["rotary_sin"], rotary_interleaved=c["rotary_interleaved"], causal=c["causal"])


@pytest.mark.parametrize("opts", [dict(rotary_dim=8, leftpad=True, ragged=True), dict(rotary_dim=6, interleaved=True),
                                  dict(causal=False, ragged=True)], ids=["neox", "interleaved", "noncausal"])
def test_gradcheck(opts):
    c = make_case(2, 3, 4, 2, 8, 10, seed=2, **opts)
    q, k, v = (c[n].requires_grad_() for n in ("q", "k_new", "v_new"))

    def f(q, k, v):  # every call rewrites the same cache rows, so the function is pure
        return latent_attention(q, k, v, c["k_cache"], c["v_cache"], c["cache_seqlens"], **entry_kwargs(c))

    torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def test_double_backward_raises():
    c = make_case(2, 3, 4, 2, 8, 10, seed=2)
    q, k, v = (c[n].requires_grad_() for n in ("q", "k_new", "v_new"))
    out = latent_attention(q, k, v, c["k_cache"], c["v_cache"], c["cache_seqlens"], **entry_kwargs(c))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.pow(2).sum(), [q], create_graph=True)


def test_entry_gradients_match_reference_autograd():
    c = make_case(2, 5, 4, 2, 32, 30, rotary_dim=16, leftpad=True, ragged=True, seed=4)
    c32 = cast(c, torch.float32)
    leaves = [c32[n].requires_grad_() for n in ("q", "k_new", "v_new")]
    out, lse = latent_attention(*leaves, c32["k_cache"], c32["v_cache"], c32["cache_seqlens"], return_lse=True,
                                **entry_kwargs(c32))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), leaves)
    ref_leaves = [c[n].requires_grad_() for n in ("q", "k_new", "v_new")]
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    ref_out, ref_lse = R.latent_attention_reference(*ref_leaves, kc, vc, c["cache_seqlens"], c["cache_leftpad"],
                                                    c["new_seqlens"], c["rotary_cos"], c["rotary_sin"])
    ref_grads = torch.autograd.grad((ref_out * w).sum(), ref_leaves)
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=1e-5, atol=1e-5)
    assert not lse.requires_grad
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seqlens", [[4, 2, 10], [10, 2, 10]], ids=["last-full", "first-and-last-full"])
def test_gradients_with_full_sequences_that_add_no_rows(seqlens):
    """A sequence whose cache is full (cache_seqlens = Tmax) sits out a pass (new_seqlens 0), as in a training batch
    whose examples have different thought counts: the backward takes no row of it (the last sequence's window
    starts one past the accumulators' last row) and the others' gradients are the reference's."""
    c = make_case(3, 3, 4, 2, 8, 10, rotary_dim=4, seed=6)
    c["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32)
    c["new_seqlens"] = torch.tensor([3 if s + 3 <= 10 else 0 for s in seqlens], dtype=torch.int32)
    c["new_seqlens"][1] = 1
    leaves = [c[n].clone().requires_grad_() for n in ("q", "k_new", "v_new")]
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    out = latent_attention(*leaves, kc, vc, c["cache_seqlens"], **entry_kwargs(c))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    ref_leaves = [c[n].clone().requires_grad_() for n in ("q", "k_new", "v_new")]
    kr, vr = c["k_cache"].clone(), c["v_cache"].clone()
    ref_out, _ = R.latent_attention_reference(*ref_leaves, kr, vr, c["cache_seqlens"], None, c["new_seqlens"],
                                              c["rotary_cos"], c["rotary_sin"])
    ref_grads = torch.autograd.grad((ref_out * w).sum(), ref_leaves)
    torch.testing.assert_close(out, ref_out.detach(), **TOL[torch.float64])
    torch.testing.assert_close(kc, kr, **TOL[torch.float64])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[torch.float64])
    assert grads[1][2].abs().max() == 0 and grads[2][2].abs().max() == 0


def test_opcheck():
    c = make_case(2, 3, 4, 2, 16, 12, rotary_dim=8, leftpad=True, ragged=True, seed=3)
    c = cast(c, torch.float32)
    c["rotary_cos"], c["rotary_sin"] = c["rotary_cos"].float(), c["rotary_sin"].float()
    torch.library.opcheck(ops.kv_cache_append_.default, append_args(c))
    torch.library.opcheck(ops.latent_attention_fwd.default, fwd_args(c))
    out, lse = ops.latent_attention_fwd(*fwd_args(c))
    a = fwd_args(c)
    gk = torch.zeros(c["k_cache"].shape)
    torch.library.opcheck(ops.latent_attention_bwd.default,
                          (torch.randn_like(out), a[0], a[1], a[2], out, lse, *a[3:], gk, torch.zeros_like(gk)))
    torch.library.opcheck(ops.latent_attention.default,
                          (c["q"], c["k_new"], c["v_new"], c["k_cache"], c["v_cache"], c["cache_seqlens"],
                           c["cache_leftpad"], c["new_seqlens"], c["rotary_cos"], c["rotary_sin"], False, None, True))


def test_torch_compile_fullgraph():
    c = cast(make_case(2, 3, 4, 2, 16, 12, rotary_dim=8, leftpad=True, seed=6), torch.float32)
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()

    def step(q, k, v, kc, vc, seqlens, leftpad, cos, sin):
        return latent_attention(q, k, v, kc, vc, seqlens, cache_leftpad=leftpad, rotary_cos=cos, rotary_sin=sin)

    args = (c["q"], c["k_new"], c["v_new"])
    tail = (c["cache_seqlens"], c["cache_leftpad"], c["rotary_cos"].float(), c["rotary_sin"].float())
    with torch.no_grad():
        eager = step(*args, c["k_cache"], c["v_cache"], *tail)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args, kc, vc, *tail)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(kc, c["k_cache"]) and torch.equal(vc, c["v_cache"])  # the in-place append happened


def good_inputs():
    return cast(make_case(2, 3, 4, 2, 16, 10, rotary_dim=8, leftpad=True, seed=9), torch.float32)


BAD = [
    # (what to change, expected message fragment)
    ("q", lambda c: c["q"][:, :, :3], "multiple of the cache's head count"),
    ("q", lambda c: c["q"][..., :8], "q must have shape"),
    ("q", lambda c: c["q"].double(), "q must have k_cache's dtype"),
    ("k_new", lambda c: c["k_new"][:, :2], "k_new must have shape"),
    ("v_new", lambda c: c["v_new"].half(), "v_new must have k_cache's dtype"),
    ("v_cache", lambda c: c["v_cache"][:, :5], "v_cache must have k_cache's shape"),
    ("cache_seqlens", lambda c: torch.tensor([8, 0], dtype=torch.int32), "exceeds the cache length"),
    ("cache_seqlens", lambda c: c["cache_seqlens"].long(), "cache_seqlens must be int32"),
    ("cache_seqlens", lambda c: c["cache_seqlens"][:1], "cache_seqlens must have shape"),
    ("new_seqlens", lambda c: torch.tensor([4, 0], dtype=torch.int32), "new_seqlens\\[0\\] = 4"),
    ("cache_leftpad", lambda c: c["cache_seqlens"] + 4, "cache_leftpad\\[0\\]"),
    ("rotary_cos", lambda c: c["rotary_cos"][:3], "rotary_cos/rotary_sin have 3 positions"),  # sin cut too, below
    ("rotary_sin", lambda c: c["rotary_sin"][:, :3], "rotary_sin must have rotary_cos's shape"),
    ("rotary_sin", lambda c: None, "given together"),
    ("rotary_cos", lambda c: torch.ones(20, 10), "rotary_dim"),
]


@pytest.mark.parametrize("arg,change,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_and_leave_cache_unchanged(arg, change, message):
    c = good_inputs()
    c[arg] = change(c)
    if arg == "rotary_cos":  # keep the table pair consistent: the check under test is the length / width
        c["rotary_sin"] = c["rotary_sin"][: c["rotary_cos"].shape[0]] if message != "rotary_dim" else torch.ones(20, 10)
    k_before, v_before = c["k_cache"].clone(), c["v_cache"].clone()
    with pytest.raises(ValueError, match=message):
        latent_attention(c["q"], c["k_new"], c["v_new"], c["k_cache"], c["v_cache"], c["cache_seqlens"],
                         **entry_kwargs(c))
    assert torch.equal(c["k_cache"], k_before) and torch.equal(c["v_cache"], v_before)


def test_bad_head_dim_and_bwd_arguments():
    c = make_case(1, 1, 1, 1, 264, 4, seed=1)
    with pytest.raises(ValueError, match="head dimension D"):
        ops.latent_attention_fwd(*fwd_args(c))
    c = good_inputs()
    out, lse = ops.latent_attention_fwd(*fwd_args(c))
    a = fwd_args(c)
    gk = torch.zeros(c["k_cache"].shape)
    with pytest.raises(ValueError, match="grad_k_cache must be Float"):
        ops.latent_attention_bwd(out, a[0], a[1], a[2], out, lse, *a[3:], gk.double(), gk)
    with pytest.raises(ValueError, match="lse must have shape"):
        ops.latent_attention_bwd(out, a[0], a[1], a[2], out, lse[:, :1], *a[3:], gk, gk.clone())
    with pytest.raises(ValueError, match="grad_out must have q's shape"):
        ops.latent_attention_bwd(out[:, :1], a[0], a[1], a[2], out, lse, *a[3:], gk, gk.clone())


def test_device_mismatch_is_named():
    """Only CPU here: run the CPU kernel directly with one argument on the meta device."""
    c = good_inputs()
    c["cache_seqlens"] = c["cache_seqlens"].to("meta")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match="cache_seqlens must be on k_cache's device"):
        ops.latent_attention_fwd.default.redispatch(keys, *fwd_args(c))


# ---- attention dropout ------------------------------------------------------------------------------------


def run_all_dropout(c, impl, p, seed):
    """run_all with attention dropout (p, seed) in the forward and the backward."""
    append, fwd, bwd = ((ops.kv_cache_append_, ops.latent_attention_fwd, ops.latent_attention_bwd) if impl == "op"
                        else (R.kv_cache_append_reference, R.latent_attention_fwd_reference,
                              R.latent_attention_bwd_reference))
    append(*append_args(c))
    a = fwd_args(c)
    out, lse = fwd(*a, p, seed)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    gk = torch.zeros(c["k_cache"].shape, dtype=acc)
    gv = torch.zeros_like(gk)
    dq = bwd(grad_out, a[0], a[1], a[2], out, lse, *a[3:], gk, gv, p, seed)
    return dict(out=out, lse=lse, dq=dq, dk=gk, dv=gv)


def test_dropout_zero_is_the_undropped_op_exactly():
    for case in (0, 2, 4):
        B, Sq, Hq, Hkv, D, Tmax, opts = CASES[case]
        c = cast(make_case(B, Sq, Hq, Hkv, D, Tmax, seed=case, **opts), torch.float32)
        plain = run_all(cast(c, torch.float32), "op")
        zero = run_all_dropout(cast(c, torch.float32), "op", 0.0, 123)
        for name, t in zero.items():
            assert torch.equal(t, plain[name]), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_dropout_matches_reference_with_the_same_mask(case, dtype):
    """Forward and backward (dq, and the gradients of every cache row) equal the reference's, which drops with
    attention_dropout_keep: the kernels regenerate the forward's mask in the backward."""
    B, Sq, Hq, Hkv, D, Tmax, opts = CASES[case]
    c = cast(make_case(B, Sq, Hq, Hkv, D, Tmax, seed=case, **opts), dtype)
    got = run_all_dropout(cast(c, dtype), "op", 0.3, 1000 + case)
    want = run_all_dropout(cast(c, dtype), "ref", 0.3, 1000 + case)
    for name in ("out", "lse", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name], want[name].to(got[name].dtype), **TOL[dtype], msg=name)
    undropped = run_all(cast(c, dtype), "op")
    assert not torch.allclose(got["out"], undropped["out"])  # the dropout did something
    assert torch.equal(got["lse"], undropped["lse"])  # lse is the undropped softmax's


def test_dropout_mask_is_the_documented_one_and_drops_p():
    """With V = identity the output rows are the dropped probabilities themselves: a plain softmax times the mask of
    reference.attention_dropout_keep / (1 - p); the dropped fraction is p."""
    B, S, H, p, seed = 2, 64, 3, 0.25, 99
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, H, S, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, H, S, generator=g, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(B, H, S, S).transpose(1, 2).contiguous()  # v[b, j, h] = e_j
    kc, vc = torch.zeros_like(k), torch.zeros_like(v)
    lens = torch.zeros(B, dtype=torch.int32)
    out = latent_attention(q, k, v, kc, vc, lens, causal=False, dropout_p=p, dropout_seed=seed)  # (B, S, H, S)
    probs = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) * S ** -0.5, -1)
    keep = R.attention_dropout_keep(seed, p, B, H, S, S)
    torch.testing.assert_close(out.permute(0, 2, 1, 3), probs * keep / (1 - p), rtol=1e-12, atol=1e-12)
    dropped = 1 - keep.double().mean().item()
    n = keep.numel()
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5, dropped
    assert torch.equal(out.permute(0, 2, 1, 3) == 0, ~keep)


def test_dropout_seed_decides_the_mask():
    c = cast(make_case(2, 5, 4, 2, 16, 30, rotary_dim=8, leftpad=True, seed=5), torch.float32)

    def out(seed, p=0.4):
        kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
        return latent_attention(c["q"], c["k_new"], c["v_new"], kc, vc, c["cache_seqlens"], dropout_p=p,
                                dropout_seed=seed, cache_leftpad=c["cache_leftpad"], rotary_cos=c["rotary_cos"].float(),
                                rotary_sin=c["rotary_sin"].float())

    assert torch.equal(out(5), out(5))
    assert not torch.equal(out(5), out(6))
    torch.manual_seed(3)
    drawn = out(None)  # a seed drawn from torch's generator
    torch.manual_seed(3)
    assert torch.equal(drawn, out(None))


@pytest.mark.parametrize("Sq", [1, 3])
def test_dropout_gradcheck(Sq):
    c = make_case(2, Sq, 4, 2, 8, 10, rotary_dim=8, leftpad=True, seed=2)
    q, k, v = (c[n].requires_grad_() for n in ("q", "k_new", "v_new"))

    def f(q, k, v):
        return latent_attention(q, k, v, c["k_cache"], c["v_cache"], c["cache_seqlens"], dropout_p=0.5,
                                dropout_seed=77, **entry_kwargs(c))

    torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("kwargs,message", [(dict(dropout_p=1.0), "dropout_p must be in \\[0, 1\\)"),
                                            (dict(dropout_p=-0.1), "dropout_p must be in"),
                                            (dict(dropout_p=0.1, dropout_seed=-1), "dropout_seed must be an int"),
                                            (dict(dropout_p=0.1, dropout_seed=1.5), "dropout_seed must be an int")])
def test_bad_dropout_arguments(kwargs, message):
    c = good_inputs()
    with pytest.raises(ValueError, match=message):
        latent_attention(c["q"], c["k_new"], c["v_new"], c["k_cache"], c["v_cache"], c["cache_seqlens"], **kwargs)
    with pytest.raises(ValueError, match="dropout_p must be in|dropout_seed must be >= 0"):  # the C++ op's checks
        ops.latent_attention_fwd(*fwd_args(c), 1.5 if "dropout_seed" not in kwargs else 0.1, -1)
