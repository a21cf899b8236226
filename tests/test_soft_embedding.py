"""soft_embedding (the Soft Thinking / Mixture of Inputs feedback vector) against the float64 reference: values,
the tie rule, gradients, opcheck, torch.compile, the Triton kernels in the CPU interpreter, and bad inputs."""
import math

import pytest
import torch

import coconut_kernels as ck
from coconut_kernels.reference import soft_embedding_reference as reference

from .helpers import assert_within_torch_error, requires_cuda, requires_triton


def _inputs(n, v, d, dtype=torch.float64, wdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64).to(wdtype or dtype)
    return logits, weight


def _ref64(logits, weight, **kw):
    return reference(logits.double(), weight.double(), **kw)


TOP_P = [1.0, 0.9, 0.5, 1e-6]


@pytest.mark.parametrize("n,v,d", [(3, 1, 3), (4, 7, 1), (5, 1000, 64), (2, 7, 64)])
@pytest.mark.parametrize("top_k", [0, 1, 5, "V"])
@pytest.mark.parametrize("top_p", TOP_P)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fp64_matches_reference(n, v, d, top_k, top_p, temperature):
    top_k = v if top_k == "V" else top_k
    if top_k > v:
        pytest.skip("top_k > V is invalid (tested in test_bad_inputs)")
    logits, weight = _inputs(n, v, d, seed=v + d)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    out, probs = ck.soft_embedding(logits, weight, return_probs=True, **kw)
    ref_out, ref_probs = reference(logits, weight, return_probs=True, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n,v,d", [(4, 7, 3), (6, 1000, 64), (33, 300, 1)])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (20, 0.5), (1, 1e-6)])
def test_fp32_matches_reference(n, v, d, top_k, top_p):
    logits, weight = _inputs(n, v, d, torch.float32, seed=n)
    kw = dict(temperature=0.7, top_k=min(top_k, v), top_p=top_p)
    torch.testing.assert_close(
        ck.soft_embedding(logits, weight, **kw), _ref64(logits, weight, **kw).float(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 1.0), (0, 0.9), (5, 0.5)])
def test_low_precision_within_torch_error(dtype, top_k, top_p):
    logits, weight = _inputs(8, 1000, 64, dtype, seed=3)
    kw = dict(temperature=0.7, top_k=top_k, top_p=top_p)
    out = ck.soft_embedding(logits, weight, **kw)
    assert out.dtype == dtype
    assert_within_torch_error(out, _ref64(logits, weight, **kw), reference(logits, weight, **kw))


def test_mixed_dtypes_and_leading_dims():
    logits, weight = _inputs(6, 100, 16, torch.float32, torch.bfloat16, seed=4)
    kw = dict(temperature=1.3, top_k=10, top_p=0.8)
    out = ck.soft_embedding(logits.view(2, 3, 100), weight, **kw)
    assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16
    assert_within_torch_error(out.view(6, 16), _ref64(logits, weight, **kw), reference(logits, weight, **kw))


def test_full_gpt2_vocabulary():
    logits, weight = _inputs(3, 50257, 8, torch.float32, seed=5)
    for kw in (dict(top_k=20, top_p=0.95), dict(top_k=0, top_p=0.9), dict(top_k=0, top_p=1.0)):
        torch.testing.assert_close(
            ck.soft_embedding(logits, weight, **kw), _ref64(logits, weight, **kw).float(), rtol=1e-5, atol=1e-5
        )


def test_non_contiguous_inputs_and_empty_rows():
    logits, weight = _inputs(5, 40, 6, seed=6)
    logits_nc = logits.t().contiguous().t()[1:]
    weight_nc = weight.t().contiguous().t()
    kw = dict(temperature=0.8, top_k=7, top_p=0.9)
    torch.testing.assert_close(ck.soft_embedding(logits_nc, weight_nc, **kw), reference(logits[1:], weight, **kw))
    assert ck.soft_embedding(logits[:0], weight, **kw).shape == (0, 6)


def test_ties_are_kept_together():
    # Value-closed rule: every logit equal to a kept one is kept.
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0]], dtype=torch.float64)
    weight = torch.eye(5, dtype=torch.float64)
    probs = ck.soft_embedding(logits, weight, top_k=2, return_probs=True)[1]
    assert (probs[0, :4] > 0).all() and probs[0, 4] == 0
    # top_p: the top token alone has p = e^3 / (e^3 + 3e + e^-2) ~ 0.71 < 0.75, so the tied 1.0s come in together.
    probs = ck.soft_embedding(logits, weight, top_p=0.75, return_probs=True)[1]
    assert (probs[0, :4] > 0).all() and probs[0, 4] == 0
    probs = ck.soft_embedding(logits, weight, top_p=0.7, return_probs=True)[1]
    torch.testing.assert_close(probs[0], weight[0])
    # top_p smaller than anything still keeps the top token.
    out = ck.soft_embedding(logits, weight, top_p=1e-9)
    torch.testing.assert_close(out[0], weight[0])


def _gradcheck_inputs(n, v, d, seed):
    # Well-separated logits (a shuffled grid) so no kept-set boundary is within gradcheck's eps.
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-3, 3, v, dtype=torch.float64)
    logits = torch.stack([grid[torch.randperm(v, generator=g)] for _ in range(n)])
    weight = torch.randn(v, d, generator=g, dtype=torch.float64)
    return logits.requires_grad_(), weight.requires_grad_()


@pytest.mark.parametrize(
    "top_k,top_p,temperature", [(0, 1.0, 1.0), (3, 1.0, 0.7), (0, 0.6, 1.3), (6, 0.8, 2.0), (12, 1.0, 0.5)]
)
def test_gradcheck(top_k, top_p, temperature):
    logits, weight = _gradcheck_inputs(2, 12, 3, seed=top_k)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.autograd.gradcheck(lambda x, w: ck.soft_embedding(x, w, **kw), (logits, weight))
    # The probabilities returned on request are differentiable too.
    assert torch.autograd.gradcheck(
        lambda x: ck.soft_embedding(x, weight.detach(), return_probs=True, **kw)[1], (logits,), fast_mode=True
    )


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.7), (5, 1.0), (40, 0.9)])
def test_fp64_gradients_match_reference(top_k, top_p):
    # Large enough for the CPU kernel's chunked-GEMM path (top_k = 0) as well as its gather path.
    logits, weight = _inputs(4, 3000, 64, seed=9)
    grad_out = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(temperature=0.6, top_k=top_k, top_p=top_p)
    x = logits.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    got = torch.autograd.grad(ck.soft_embedding(x, w, **kw), (x, w), grad_out)
    want = torch.autograd.grad(reference(x, w, **kw), (x, w), grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["logits", "weight"])
def test_gradient_of_one_input(which):
    logits, weight = _gradcheck_inputs(3, 30, 4, seed=1)
    (logits if which == "weight" else weight).requires_grad_(False)
    ck.soft_embedding(logits, weight, top_k=5).sum().backward()
    ref_logits, ref_weight = logits.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference(ref_logits, ref_weight, top_k=5).sum().backward()
    t, ref = (logits, ref_logits) if which == "logits" else (weight, ref_weight)
    torch.testing.assert_close(t.grad, ref.grad)
    assert (logits if which == "weight" else weight).grad is None


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (8, 1.0), (0, 0.9)])
def test_gradients_low_precision(dtype, wdtype, top_k, top_p):
    logits, weight = _inputs(6, 500, 32, dtype, wdtype, seed=7)
    grad_out = torch.randn(6, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kw = dict(temperature=0.8, top_k=top_k, top_p=top_p)

    def grads(fn, x, w):
        x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        (fn(x, w, **kw).double() * grad_out).sum().backward()
        return x.grad, w.grad

    ours = grads(ck.soft_embedding, logits, weight)
    ref64 = grads(reference, logits.double(), weight.double())
    plain = grads(reference, logits, weight)
    for name, a, r, p in zip(("grad_logits", "grad_weight"), ours, ref64, plain):
        if dtype == torch.float32:
            torch.testing.assert_close(a, r.float(), rtol=1e-4, atol=1e-5)
        else:
            assert_within_torch_error(a, r, p, name=name)


def test_opcheck():
    logits, weight = _gradcheck_inputs(3, 20, 4, seed=2)
    for args in ((0.7, 5, 0.9), (1.5, 0, 1.0)):
        torch.library.opcheck(torch.ops.coconut.soft_embedding_fwd.default, (logits, weight, *args))
    out, thr, lse = torch.ops.coconut.soft_embedding_fwd(logits.detach(), weight.detach(), 0.7, 5, 0.9)
    grad_out = torch.randn_like(out)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(
            torch.ops.coconut.soft_embedding_bwd.default,
            (grad_out, logits.detach(), weight.detach(), thr, lse, 0.7, mask),
        )


def test_torch_compile_fullgraph():
    logits, weight = _gradcheck_inputs(3, 40, 8, seed=3)

    def f(x, w):
        out, probs = ck.soft_embedding(x.view(1, 3, 40), w, temperature=0.9, top_k=6, top_p=0.95, return_probs=True)
        return out.sum() + (probs * probs).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(logits, weight)
    got_grads = torch.autograd.grad(got, (logits, weight))
    want = f(logits, weight)
    want_grads = torch.autograd.grad(want, (logits, weight))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@requires_triton
@pytest.mark.parametrize(
    "n,v,d,top_k,top_p,wdtype",
    [
        (3, 7, 3, 0, 1.0, torch.float32),
        (17, 33, 5, 5, 1.0, torch.float32),
        (5, 64, 20, 0, 0.5, torch.float32),
        (4, 50, 17, 10, 0.9, torch.bfloat16),
        (2, 1, 4, 1, 1e-6, torch.float32),
        (3, 2500, 8, 10, 0.9, torch.float32),  # several blocks in the threshold kernel's passes
        (2, 2500, 8, 300, 0.9, torch.float32),  # top_k past the one-pass list: the bisection
        (3, 2500, 8, 0, 0.7, torch.float32),  # top_p alone: the bisection
    ],
)
def test_triton_interpreter_matches_cpu(n, v, d, top_k, top_p, wdtype):
    from coconut_kernels.triton.soft_embedding import soft_embedding_bwd, soft_embedding_fwd

    logits, weight = _inputs(n, v, d, torch.float32, wdtype, seed=v)
    out, thr, lse = soft_embedding_fwd(logits, weight, 0.7, top_k, top_p)
    ref_out, ref_thr, ref_lse = torch.ops.coconut.soft_embedding_fwd(logits, weight, 0.7, top_k, top_p)
    # Same kept sets: the thresholds agree up to "no filter" (CPU: -inf; both keep every entry then).
    keep = logits >= thr[:, None]
    torch.testing.assert_close(keep, logits >= ref_thr[:, None])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    kw = dict(temperature=0.7, top_k=top_k, top_p=top_p)
    assert_within_torch_error(out, _ref64(logits, weight, **kw), ref_out, atol=1e-5)
    grad_out = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).to(wdtype)
    grads = soft_embedding_bwd(grad_out, logits, weight, thr, lse, 0.7, [True, True])
    ref_grads = torch.ops.coconut.soft_embedding_bwd(grad_out, logits, weight, ref_thr, ref_lse, 0.7, [True, True])
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if wdtype == torch.bfloat16 else 1e-5, atol=1e-4)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (7, 1.0, 0.5), (0, 0.8, 2.0), (12, 0.6, 0.7)])
def test_triton_streaming_pass_matches_fp64_reference(dtype, num_splits, top_k, top_p, temperature):
    """The streaming forward (online max/sum over the vocabulary, tensor-core dots for half weights) over V=203
    (not a multiple of the 64-wide tiles) and d=40 (not a power of two), with the vocabulary cut into num_splits
    slices merged by the combine kernel: the kept set, lse, out and both gradients against float64 (fp32 to
    1e-5; fp16/bf16 within 2x PyTorch's own error in that dtype)."""
    from coconut_kernels.triton.soft_embedding import soft_embedding_bwd, soft_embedding_fwd

    n, v, d = 5, 203, 40
    logits, weight = _inputs(n, v, d, dtype, seed=top_k + num_splits)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    out, thr, lse = soft_embedding_fwd(logits, weight, temperature, top_k, top_p, num_splits=num_splits)
    x64, w64 = logits.double().requires_grad_(), weight.double().requires_grad_()
    ref, probs = reference(x64, w64, return_probs=True, **kw)
    kept = probs.detach() > 0
    torch.testing.assert_close(logits >= thr[:, None], kept)
    lse64 = torch.logsumexp((x64.detach() / temperature).masked_fill(~kept, float("-inf")), -1)
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    gl, gw = soft_embedding_bwd(grad_out, logits, weight, thr, lse, temperature, [True, True])
    gl64, gw64 = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    assert out.dtype == gl.dtype == gw.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gl.double(), gl64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw.double(), gw64, rtol=1e-5, atol=1e-5)
        return
    xl, wl = logits.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_l = reference(xl, wl, **kw)
    gl_l, gw_l = torch.autograd.grad(ref_l, (xl, wl), grad_out)
    assert_within_torch_error(out, ref.detach(), ref_l.detach())
    assert_within_torch_error(gl, gl64, gl_l, name="grad_logits")
    assert_within_torch_error(gw, gw64, gw_l, name="grad_weight")


@requires_triton
def test_triton_forward_is_one_pass_and_fills_the_gpu():
    """Without a filter the forward is the streaming kernel alone (plus the combine of the vocabulary slices when
    the rows and columns alone leave the GPU idle): no statistics pass; with a filter, one threshold kernel first.
    The grid reaches two waves of an H100's 132 SMs for a GPT-2 soft-thinking step (8 rows)."""
    from coconut_kernels.triton import aot
    from coconut_kernels.triton.soft_embedding import num_vocab_splits

    def fwd_launches(N, top_k, top_p):
        from coconut_kernels.triton import soft_embedding as se
        logits = torch.empty(N, 50257, device="meta", dtype=torch.bfloat16)
        weight = torch.empty(50257, 768, device="meta", dtype=torch.bfloat16)
        return aot.record_all([("x", lambda: se.soft_embedding_fwd(logits, weight, 1.0, top_k, top_p))])

    few = fwd_launches(8, 0, 1.0)
    assert [x.name for x in few] == ["soft_embedding._fwd_kernel", "soft_embedding._combine_kernel"]
    assert few[0].grid[0] >= 2 * 132
    assert [x.name for x in fwd_launches(4096, 0, 1.0)] == ["soft_embedding._fwd_kernel"]
    assert [x.name for x in fwd_launches(8, 50, 0.9)][0] == "soft_embedding._threshold_kernel"
    assert num_vocab_splits(12, 50257, 64) == 22
    assert num_vocab_splits(10_000, 50257, 64) == 1
    assert num_vocab_splits(1, 1000, 64) == 1  # fewer than 2 x 512 entries: not worth a combine


@requires_triton
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (5, 0.6), (40, 1.0), (300, 0.8), (0, 0.6)])
def test_triton_thresholds_keep_ties_together(top_k, top_p):
    """Logits with many ties (integers): the one-pass top-k list (top_k <= 256) and the bisection keep the same
    value-closed set as the CPU kernel, ties of the k-th value included."""
    from coconut_kernels.triton.soft_embedding import soft_embedding_fwd

    g = torch.Generator().manual_seed(top_k)
    logits = torch.randint(-6, 7, (4, 700), generator=g).float()
    weight = torch.randn(700, 8, generator=g)
    _, thr, _ = soft_embedding_fwd(logits, weight, 1.3, top_k, top_p)
    _, ref_thr, _ = torch.ops.coconut.soft_embedding_fwd(logits, weight, 1.3, top_k, top_p)
    torch.testing.assert_close(logits >= thr[:, None], logits >= ref_thr[:, None])


def test_triton_is_the_cuda_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("coconut::soft_embedding_fwd", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("coconut::soft_embedding_bwd", "CUDA")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.95), (0, 0.9)])
def test_cuda_matches_reference(backend, top_k, top_p):
    logits, weight = _inputs(16, 50257, 256, torch.float32, seed=11)
    grad_out = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.7, top_k=top_k, top_p=top_p)
    x, w = logits.double().requires_grad_(), weight.double().requires_grad_()
    want = reference(x, w, **kw)
    want_grads = torch.autograd.grad(want, (x, w), grad_out.double())
    ck.set_backend(backend)
    try:
        x, w = logits.cuda().requires_grad_(), weight.cuda().requires_grad_()
        got = ck.soft_embedding(x, w, **kw)
        got_grads = torch.autograd.grad(got, (x, w), grad_out.cuda())
    finally:
        ck.set_backend(None)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-5)


def _bad_cases():
    x, w = _inputs(2, 5, 3)
    return [
        ("logits", dict(logits=x[0])),
        ("weight", dict(weight=w[0])),
        ("weight", dict(weight=w[:4])),
        ("at least one column", dict(logits=x[:, :0], weight=w[:0])),
        ("logits", dict(logits=x.long())),
        ("weight", dict(weight=w.int())),
        ("float64", dict(weight=w.float())),
        ("temperature", dict(temperature=0.0)),
        ("temperature", dict(temperature=-1.0)),
        ("temperature", dict(temperature=math.nan)),
        ("temperature", dict(temperature=math.inf)),
        ("top_k", dict(top_k=-1)),
        ("top_k", dict(top_k=6)),
        ("top_k", dict(top_k=1.5)),
        ("top_p", dict(top_p=0.0)),
        ("top_p", dict(top_p=1.5)),
        ("top_p", dict(top_p=math.nan)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    name, override = _bad_cases()[case]
    x, w = _inputs(2, 5, 3)
    args = dict(logits=x, weight=w, temperature=1.0, top_k=0, top_p=1.0) | override
    with pytest.raises(ValueError, match=name):
        ck.soft_embedding(args.pop("logits"), args.pop("weight"), **args)


@pytest.mark.parametrize(
    "name,args",
    [
        ("logits", lambda x, w: (x[0], w, 1.0, 0, 1.0)),
        ("weight", lambda x, w: (x, w[:4], 1.0, 0, 1.0)),
        ("float64", lambda x, w: (x, w.float(), 1.0, 0, 1.0)),
        ("temperature", lambda x, w: (x, w, 0.0, 0, 1.0)),
        ("top_k", lambda x, w: (x, w, 1.0, 6, 1.0)),
        ("top_p", lambda x, w: (x, w, 1.0, 0, 0.0)),
    ],
)
def test_bad_inputs_cpp_op(name, args):
    x, w = _inputs(2, 5, 3)
    with pytest.raises(ValueError, match=name):
        torch.ops.coconut.soft_embedding_fwd(*args(x, w))
