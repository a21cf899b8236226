"""Tests of latent_feedback_ / latent_feedback: CPU kernels and the Triton kernels (interpreter) against
reference.py, gradients, opcheck, torch.compile and every bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import coconut_kernels as ck
from coconut_kernels.ops.latent_feedback import _check_indices
from coconut_kernels.reference import latent_feedback_reference as reference
from tests.helpers import assert_within_torch_error, requires_triton

NORMS = ("none", "layernorm", "rmsnorm")
OPS = torch.ops.coconut


def make(layout="padded", norm="none", d=5, n=4, B=3, T=5, S=6, dtype=torch.float64, idx_dtype=torch.int64,
         seed=0, affine=True):
    """Random inputs with unique destinations and (often repeated) random sources."""
    g = torch.Generator().manual_seed(seed)
    rows_e, rows_h = (B, T) if layout == "padded" else (B * T,), (B, S) if layout == "padded" else (B * S,)
    embeds = torch.randn(*rows_e, d, generator=g, dtype=torch.float64).to(dtype)
    hidden = (torch.randn(*rows_h, d, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    flat = torch.randperm(B * T, generator=g)[:n]
    src = torch.randint(0, rows_h[-1], (n,), generator=g)
    if layout == "padded":
        batch_idx, dst = (flat // T).to(idx_dtype), (flat % T).to(idx_dtype)
    else:
        batch_idx, dst = None, flat.to(idx_dtype)
    weight = bias = None
    if norm != "none" and affine:
        weight = (torch.randn(d, generator=g, dtype=torch.float64) + 1).to(dtype)
        if norm == "layernorm":
            bias = torch.randn(d, generator=g, dtype=torch.float64).to(dtype)
    return dict(embeds=embeds, hidden=hidden, batch_idx=batch_idx, dst_pos=dst, src_pos=src.to(idx_dtype),
                norm=norm, weight=weight, bias=bias)


def call(fn, a, **over):
    a = {**a, **over}
    return fn(a["embeds"], a["hidden"], a["batch_idx"], a["dst_pos"], a["src_pos"], norm=a["norm"],
              weight=a["weight"], bias=a["bias"])


def op_args(a):
    return (a["embeds"], a["hidden"], a["batch_idx"], a["dst_pos"], a["src_pos"], a["norm"], a["weight"],
            a["bias"], 1e-5)


def as64(a):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in a.items()}


# ---- forward ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("d", [1, 3, 771, 4096])
@pytest.mark.parametrize("n", [0, 1, 10])  # 10 = B * T: every row of embeds is written
def test_forward_matches_reference(layout, norm, d, n):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        a = make(layout, norm, d=d, n=n, B=2, T=5, S=4, dtype=dtype, idx_dtype=torch.int32, seed=d + n)
        expected = call(reference, as64(a))
        out = call(ck.latent_feedback, a)
        assert out.dtype == dtype and out.shape == a["embeds"].shape
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
        e = a["embeds"].clone()
        assert call(ck.latent_feedback_, a, embeds=e) is e
        torch.testing.assert_close(e, out, rtol=0, atol=0)


def _plain_torch(a, norm, d):
    """What plain PyTorch computes in the inputs' own dtype (the accuracy baseline)."""
    rows = a["hidden"][a["batch_idx"], a["src_pos"]] if a["batch_idx"] is not None else a["hidden"][a["src_pos"]]
    if norm == "layernorm":
        rows = F.layer_norm(rows, (d,), a["weight"], a["bias"], 1e-5)
    elif norm == "rmsnorm":
        rows = F.rms_norm(rows, (d,), a["weight"], 1e-5)
    index = (a["batch_idx"], a["dst_pos"]) if a["batch_idx"] is not None else (a["dst_pos"],)
    return a["embeds"].index_put(index, rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("d", [3, 771])
def test_low_precision_within_2x_torch(dtype, layout, norm, d):
    a = make(layout, norm, d=d, n=8, dtype=dtype, seed=7)
    a64 = {k: (v.double().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in a.items()}
    alp = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
               else v) for k, v in a.items()}
    aop = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
               else v) for k, v in a.items()}
    ref64, lowp, out = call(reference, a64), _plain_torch(alp, norm, d), call(ck.latent_feedback, aop)
    assert_within_torch_error(out, ref64, lowp, name="out")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = [k for k in ("embeds", "hidden", "weight", "bias") if a[k] is not None]
    g64 = torch.autograd.grad(ref64, [a64[k] for k in names], grad)
    glp = torch.autograd.grad(lowp, [alp[k] for k in names], grad.to(dtype))
    gop = torch.autograd.grad(out, [aop[k] for k in names], grad.to(dtype))
    for name, x, r, p in zip(names, gop, g64, glp):
        assert x.dtype == a[name].dtype
        assert_within_torch_error(x, r, p, name=f"grad_{name}")


def test_weight_in_float32_with_bf16_hidden():
    a = make("padded", "layernorm", d=64, n=6, dtype=torch.bfloat16, seed=3)
    a["weight"], a["bias"] = a["weight"].float(), a["bias"].float()
    torch.testing.assert_close(call(ck.latent_feedback, a).double(), call(reference, as64(a)), rtol=1e-2, atol=2e-2)


def test_rmsnorm_and_layernorm_without_affine():
    for norm in ("layernorm", "rmsnorm"):
        a = make("packed", norm, d=33, n=5, affine=False, seed=4)
        torch.testing.assert_close(call(ck.latent_feedback, a), call(reference, a), rtol=1e-12, atol=1e-12)


def test_strided_views():
    """embeds as a slice of a larger buffer and hidden with a non-unit last stride."""
    a = make("padded", "layernorm", d=6, n=5, B=2, T=4, S=4, seed=5)
    base = torch.randn(2, 7, 6, dtype=torch.float64)
    view = base[:, 2:6]
    a["hidden"] = a["hidden"].transpose(1, 2).contiguous().transpose(1, 2)  # stride(-1) != 1
    expected = call(reference, a, embeds=view.clone())
    call(ck.latent_feedback_, a, embeds=view)
    torch.testing.assert_close(view, expected, rtol=1e-12, atol=1e-12)


# ---- autograd -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(layout, norm):
    a = make(layout, norm, d=4, n=5, B=2, T=4, S=3, seed=11)  # S=3 < n: sources repeat
    for k in ("embeds", "hidden", "weight", "bias"):
        if a[k] is not None:
            a[k].requires_grad_()

    def functional(e, h, w, b):
        return call(ck.latent_feedback, a, embeds=e, hidden=h, weight=w, bias=b)

    def inplace(e, h, w, b):
        return call(ck.latent_feedback_, a, embeds=e * 1.5, hidden=h, weight=w, bias=b)

    inputs = (a["embeds"], a["hidden"], a["weight"], a["bias"])
    assert torch.autograd.gradcheck(functional, inputs)
    assert torch.autograd.gradcheck(inplace, inputs)


@pytest.mark.parametrize("norm", NORMS)
def test_inplace_inside_graph_matches_reference(norm):
    """embeds comes from an earlier op, is written in place, then used further: every gradient matches."""
    a = make("padded", norm, d=8, n=6, seed=12)
    lin = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    h = a["hidden"].clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in (a["weight"], a["bias"]) if p is not None]
    w = params[0] if a["weight"] is not None else None
    b = params[1] if a["bias"] is not None else None

    def loss(fn):
        embeds = x @ lin
        out = call(fn, a, embeds=embeds, hidden=h, weight=w, bias=b)
        return (out.tanh() * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum()

    leaves = [x, lin, h] + params
    ours = torch.autograd.grad(loss(ck.latent_feedback_), leaves)
    ref = torch.autograd.grad(loss(reference), leaves)
    for g, r in zip(ours, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    ours_functional = torch.autograd.grad(loss(ck.latent_feedback), leaves)
    for g, r in zip(ours_functional, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_overwritten_rows_get_zero_grad_and_n0():
    a = make("padded", "rmsnorm", d=4, n=3, seed=13)
    e = a["embeds"].clone().requires_grad_()
    h = a["hidden"].clone().requires_grad_()
    out = call(ck.latent_feedback, a, embeds=e, hidden=h)
    out.backward(torch.ones_like(out))
    assert (e.grad[a["batch_idx"], a["dst_pos"]] == 0).all()
    assert e.grad.sum() == e.numel() - 3 * 4
    empty = torch.empty(0, dtype=torch.int64)
    e2 = a["embeds"].clone().requires_grad_()
    out = call(ck.latent_feedback, a, embeds=e2, hidden=h, batch_idx=empty, dst_pos=empty, src_pos=empty)
    torch.testing.assert_close(out, a["embeds"])
    gh, gw, gb = OPS.latent_feedback_backward(torch.randn_like(out), a["hidden"], empty, empty, empty, "rmsnorm",
                                              a["weight"], None, 1e-5)
    assert (gh == 0).all() and (gw == 0).all() and gw.shape == (4,) and gb.shape == (0,)


def test_no_autograd_when_nothing_requires_grad():
    a = make("padded", "layernorm", d=4, n=3, seed=14)
    out = call(ck.latent_feedback_, a)
    assert out.grad_fn is None
    a["hidden"].requires_grad_()
    with torch.no_grad():
        assert call(ck.latent_feedback_, a).grad_fn is None


# ---- torch.library / torch.compile --------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("norm", ["none", "layernorm"])
def test_opcheck(layout, norm):
    a = make(layout, norm, d=6, n=4, dtype=torch.float32, idx_dtype=torch.int32, seed=15)
    torch.library.opcheck(OPS.latent_feedback_.default, op_args(a))
    grad_args = tuple(t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                      else t for t in op_args(a))
    torch.library.opcheck(OPS.latent_feedback.default, grad_args)
    grad = torch.randn_like(a["embeds"])
    torch.library.opcheck(OPS.latent_feedback_backward.default, (grad,) + op_args(a)[1:])


def test_compile_fullgraph():
    a = make("padded", "layernorm", d=16, n=5, dtype=torch.float32, seed=16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step_inplace(e, h, b, dst, src, w, bias):
        return ck.latent_feedback_(e, h, b, dst, src, norm="layernorm", weight=w, bias=bias)

    e = a["embeds"].clone()
    step_inplace(e, a["hidden"], a["batch_idx"], a["dst_pos"], a["src_pos"], a["weight"], a["bias"])
    torch.testing.assert_close(e, call(reference, a))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(e, h, b, dst, src, w, bias):
        return (ck.latent_feedback(e, h, b, dst, src, norm="layernorm", weight=w, bias=bias) * 2).sum()

    h = a["hidden"].clone().requires_grad_()
    step(a["embeds"], h, a["batch_idx"], a["dst_pos"], a["src_pos"], a["weight"], a["bias"]).backward()
    h_ref = a["hidden"].clone().requires_grad_()
    (call(reference, a, hidden=h_ref) * 2).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


# ---- Triton (interpreter on CPU) ----------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("d", [1, 3, 40])
def test_triton_kernels(layout, norm, d):
    from coconut_kernels.triton.latent_feedback import latent_feedback_bwd, latent_feedback_fwd

    a = make(layout, norm, d=d, n=5, B=2, T=4, S=3, dtype=torch.float32, idx_dtype=torch.int32, seed=d)
    e = a["embeds"].clone()
    latent_feedback_fwd(e, a["hidden"], a["batch_idx"], a["dst_pos"], a["src_pos"], norm, a["weight"], a["bias"],
                        1e-5)
    torch.testing.assert_close(e, call(reference, a), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(e)
    ours = latent_feedback_bwd(grad, *op_args(a)[1:])
    cpu = OPS.latent_feedback_backward(grad, *op_args(a)[1:])
    for x, r in zip(ours, cpu):
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5)


@requires_triton
def test_triton_skips_bad_indices():
    from coconut_kernels.triton.latent_feedback import latent_feedback_fwd

    a = make("padded", "none", d=4, n=3, B=2, T=4, S=3, dtype=torch.float32, seed=21)
    a["dst_pos"][1] = 99
    e = a["embeds"].clone()
    latent_feedback_fwd(e, a["hidden"], a["batch_idx"], a["dst_pos"], a["src_pos"], "none", None, None, 1e-5)
    keep = torch.tensor([0, 2])
    index = (a["batch_idx"][keep], a["dst_pos"][keep])
    expected = a["embeds"].index_put(index, a["hidden"][a["batch_idx"][keep], a["src_pos"][keep]])
    torch.testing.assert_close(e, expected, rtol=0, atol=0)


# ---- bad input ----------------------------------------------------------------------------------------
def _bad_cases():
    a = make("padded", "layernorm", d=4, n=3, B=2, T=4, S=3, dtype=torch.float32, seed=30)
    yield "rank", dict(embeds=a["embeds"][0]), "embeds must be 3-D"
    yield "hidden rank", dict(hidden=a["hidden"][0]), "hidden must be 3-D"
    yield "packed rank", dict(batch_idx=None), "embeds must be 2-D"
    yield "dtype", dict(embeds=a["embeds"].double()), "embeds must have hidden's dtype"
    yield "int dtype", dict(embeds=a["embeds"].int(), hidden=a["hidden"].int()), "hidden must be float32"
    yield "d", dict(embeds=torch.randn(2, 4, 5)), "embeds's last dim"
    yield "batch", dict(embeds=torch.randn(3, 4, 4)), "same batch size"
    yield "device", dict(embeds=a["embeds"].to("meta")), "embeds must be on hidden's device"
    yield "index device", dict(src_pos=a["src_pos"].to("meta")), "src_pos must be on hidden's device"
    yield "index dtype", dict(dst_pos=a["dst_pos"].float()), "dst_pos must be int32 or int64"
    yield "index rank", dict(src_pos=a["src_pos"][None]), "src_pos must be 1-D"
    yield "index length", dict(batch_idx=a["batch_idx"][:2]), "batch_idx must have N = 3"
    yield "norm", dict(norm="batchnorm"), "norm must be"
    yield "weight shape", dict(weight=torch.randn(5)), "weight must have d = 4"
    yield "weight rank", dict(weight=torch.randn(1, 4)), "weight must be 1-D"
    yield "weight dtype", dict(weight=torch.randn(4, dtype=torch.float64)), "weight must have hidden's dtype"
    yield "bias on rmsnorm", dict(norm="rmsnorm"), "bias must be None"
    yield "params on none", dict(norm="none"), "weight and bias must be None"
    yield "dst range", dict(dst_pos=torch.tensor([0, 4, 1])), r"dst_pos\[1\] = 4 is out of range \[0, 4\)"
    yield "negative", dict(src_pos=torch.tensor([0, -1, 1])), r"src_pos\[1\] = -1 is out of range"
    yield "batch range", dict(batch_idx=torch.tensor([0, 2, 1])), r"batch_idx\[1\] = 2 is out of range \[0, 2\)"
    yield "duplicate", dict(batch_idx=torch.tensor([1, 0, 1]), dst_pos=torch.tensor([2, 3, 2])), "duplicate destination"


BAD = list(_bad_cases())


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, over, msg = case
    a = make("padded", "layernorm", d=4, n=3, B=2, T=4, S=3, dtype=torch.float32, seed=30)
    before = a["embeds"].clone()
    for fn in (ck.latent_feedback_, ck.latent_feedback):
        with pytest.raises(ValueError, match=msg):
            call(fn, a, **over)
    with pytest.raises(ValueError, match=msg.replace("embeds", "grad_embeds")):
        b = {**a, **over}
        OPS.latent_feedback_backward(b["embeds"], *op_args(b)[1:])
    torch.testing.assert_close(a["embeds"], before, rtol=0, atol=0)


# Index values and devices cannot be checked on meta tensors.
SHAPE_CASES = [c for c in BAD if "range" not in c[0] and "device" not in c[0] and c[0] not in ("negative", "duplicate")]


@pytest.mark.parametrize("case", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_bad_input_fake_kernel(case):
    """The Python checks (fake kernels, Triton path) raise the same errors on meta tensors."""
    _, over, msg = case
    a = make("padded", "layernorm", d=4, n=3, B=2, T=4, S=3, dtype=torch.float32, seed=30)
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in {**a, **over}.items()}
    with pytest.raises(ValueError, match=msg):
        OPS.latent_feedback_(*op_args(meta))


def test_debug_index_check():
    """The host-side index check used for GPU tensors under COCONUT_DEBUG=1."""
    a = make("padded", "none", d=4, n=3, B=2, T=4, S=3, seed=31)
    _check_indices(a["embeds"], a["hidden"], a["batch_idx"], a["dst_pos"], a["src_pos"])
    for over, msg in ((dict(dst_pos=torch.tensor([0, 4, 1])), r"dst_pos\[1\] = 4 is out of range"),
                      (dict(batch_idx=torch.tensor([0, 0, 0]), dst_pos=torch.tensor([1, 2, 1])), "duplicate")):
        b = {**a, **over}
        with pytest.raises(ValueError, match=msg):
            _check_indices(b["embeds"], b["hidden"], b["batch_idx"], b["dst_pos"], b["src_pos"])
