"""linear_cross_entropy (coconut_kernels/loss.py) against cross-entropy written out by hand: the loss and the
gradients of hidden, weight and bias in fp64 on a case small enough to follow with a pencil, the mean over
labelled rows only, chunking, no-grad, bf16 within 2x plain PyTorch's error, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coconut_kernels import linear_cross_entropy

from .helpers import assert_within_torch_error

# M=5 rows, d=3, V=4; rows 1 and 3 are ignored (-100).
H = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-2.0, 0.75, 1.0], [0.0, 3.0, -1.0], [1.0, 1.0, 1.0]]
W = [[0.2, -0.4, 0.1], [1.0, 0.5, -0.3], [-0.7, 0.9, 0.6], [0.3, 0.3, -1.2]]
BIAS = [0.1, -0.2, 0.5, 0.0]
TARGETS = [2, -100, 0, -100, 3]


def by_hand(bias, reduction):
    """Loss and gradients from the definitions, scalar by scalar in Python floats (fp64):
    loss_i = log sum_j exp(z_ij) - z_i,t_i, z_ij = h_i . w_j + b_j; dloss_i/dz_ij = softmax_ij - [j = t_i]."""
    n = sum(t != -100 for t in TARGETS)
    scale = 1.0 / n if reduction == "mean" else 1.0
    loss = 0.0
    gh = [[0.0] * 3 for _ in H]
    gw = [[0.0] * 3 for _ in W]
    gb = [0.0] * len(W)
    for i, (h, t) in enumerate(zip(H, TARGETS)):
        if t == -100:
            continue
        z = [sum(a * b for a, b in zip(h, w)) + (bias[j] if bias else 0.0) for j, w in enumerate(W)]
        lse = math.log(sum(math.exp(v) for v in z))
        loss += (lse - z[t]) * scale
        for j, w in enumerate(W):
            dz = (math.exp(z[j] - lse) - (j == t)) * scale
            gb[j] += dz
            for k in range(3):
                gh[i][k] += dz * w[k]
                gw[j][k] += dz * h[k]
    return loss, gh, gw, gb


def leaves(bias, dtype=torch.float64):
    h = torch.tensor(H, dtype=dtype, requires_grad=True)
    w = torch.tensor(W, dtype=dtype, requires_grad=True)
    b = torch.tensor(BIAS, dtype=dtype, requires_grad=True) if bias else None
    return h, w, b


def random_case(M, d, V, seed, ignore_every):
    """fp64 hidden (M, d), weight (V, d), bias (V,) and targets with every ignore_every-th row ignored."""
    g = torch.Generator().manual_seed(seed)
    h64 = torch.randn(M, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(V, d, generator=g, dtype=torch.float64) * 0.3
    b64 = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (M,), generator=g)
    t[::ignore_every] = -100
    return (h64, w64, b64), t


def loss_and_grads(fn, tensors, dtype):
    """fn(hidden, weight, bias) on copies of `tensors` in `dtype`: (loss, its gradient w.r.t. each)."""
    x = [a.to(dtype).requires_grad_() for a in tensors]
    loss = fn(*x)
    return (loss, *torch.autograd.grad(loss, x))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 2])  # 2: a chunk holding a labelled and an ignored row
def test_loss_and_gradients_equal_the_hand_computed_values(bias, reduction, chunk_size):
    loss64, gh, gw, gb = by_hand(BIAS if bias else None, reduction)
    h, w, b = leaves(bias)
    loss = linear_cross_entropy(h, w, torch.tensor(TARGETS), b, reduction=reduction, chunk_size=chunk_size)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(loss64, rel=1e-12, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(h.grad, torch.tensor(gh, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert h.grad[1].abs().max() == 0 and h.grad[3].abs().max() == 0  # ignored rows get no gradient
    torch.testing.assert_close(w.grad, torch.tensor(gw, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(b.grad, torch.tensor(gb, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_a_scaled_backward_scales_the_gradients():
    """backward(g) multiplies the gradients computed in the forward by g."""
    _, gh, gw, gb = by_hand(BIAS, "mean")
    h, w, b = leaves(True)
    linear_cross_entropy(h, w, torch.tensor(TARGETS), b).backward(torch.tensor(-2.5, dtype=torch.float64))
    for got, want in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        torch.testing.assert_close(got, -2.5 * torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_retained_graph_and_a_tied_weight_accumulate_right():
    """A backward of 1 hands back the weight gradient computed in the forward without scaling it: a retained graph
    run backward twice still sums two equal gradients, a weight also used as an embedding (tied, as GPT-2's LM head)
    gets both contributions, and the accumulated .grad never aliases what a later backward reuses."""
    _, gh, gw, gb = by_hand(BIAS, "mean")
    want_w = torch.tensor(gw, dtype=torch.float64)
    h, w, b = leaves(True)
    loss = linear_cross_entropy(h, w, torch.tensor(TARGETS), b)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(w.grad, want_w, rtol=1e-12, atol=1e-12)
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, 2 * torch.tensor(gb, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # tied: the same weight gathered as embeddings (rows 0 and 2) and used as the head
    h, w, b = leaves(True)
    emb = w[torch.tensor([0, 2, 2])]
    loss = linear_cross_entropy(h, w, torch.tensor(TARGETS), b) + (emb * torch.tensor([1.0, 2.0, 3.0],
                                                                                      dtype=torch.float64)).sum()
    loss.backward()
    extra = torch.zeros_like(want_w)
    extra[0] += torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    extra[2] += 2 * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(w.grad, want_w + extra, rtol=1e-12, atol=1e-12)


def test_no_grad_and_all_ignored():
    h, w, b = leaves(True)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, torch.tensor(TARGETS), b)
    assert loss.grad_fn is None and loss.item() == pytest.approx(by_hand(BIAS, "mean")[0], rel=1e-12)
    # No labelled row: the mean is 0 (not nan) and so is every gradient.
    loss = linear_cross_entropy(h, w, torch.full((5,), -100), b)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0 and b.grad.abs().max() == 0


@pytest.mark.parametrize("M,chunk_size", [(11, None), (40, None), (40, 16)])
def test_fp32_by_the_skinny_kernel_and_by_blas(M, chunk_size):
    """float32 on the CPU: chunks of at most 16 rows form their logits with the skinny kernel (seen in the ops
    dispatched), larger ones with BLAS; loss and gradients within fp32 rounding of fp64 either way, and the same
    with the kernel switched off."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from coconut_kernels.ops import skinny_linear

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.name())
            return func(*args, **(kwargs or {}))

    tensors, t = random_case(M, 48, 700, seed=M, ignore_every=3)

    def run(fn, dtype):
        return loss_and_grads(fn, tensors, dtype)

    ref = run(lambda h, w, b: F.cross_entropy(h @ w.T + b, t, ignore_index=-100), torch.float64)
    before = skinny_linear.enabled()
    for on in (True, False):
        skinny_linear.set_enabled(on)
        try:
            with Ops() as seen:
                ours = run(lambda h, w, b: linear_cross_entropy(h, w, t, b, chunk_size=chunk_size), torch.float32)
        finally:
            skinny_linear.set_enabled(before)
        rows = chunk_size or M
        assert ("coconut::skinny_linear" in seen.names) == (on and rows <= skinny_linear.MAX_ROWS)
        for name, o, r in zip(("loss", "hidden", "weight", "bias"), ours, ref):
            torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_within_twice_torch_error():
    """bf16 hidden and weight: the loss and every gradient within 2x the error of plain PyTorch (logits and
    F.cross_entropy in bf16) against the fp64 value."""
    tensors, t = random_case(48, 64, 1000, seed=0, ignore_every=5)

    def run(fn, dtype):
        return loss_and_grads(fn, tensors, dtype)

    def plain(h, w, b):
        return F.cross_entropy(h @ w.T + b, t, ignore_index=-100)

    ref = run(plain, torch.float64)
    lowp = run(plain, torch.bfloat16)
    ours = run(lambda h, w, b: linear_cross_entropy(h, w, t, b, chunk_size=16), torch.bfloat16)
    for name, o, r, p in zip(("loss", "hidden", "weight", "bias"), ours, ref, lowp):
        assert o.dtype == (torch.float32 if name == "loss" else torch.bfloat16), name
        assert_within_torch_error(o, r, p, name=name)


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="none"), "reduction must be 'mean' or 'sum'"),
    (dict(hidden=torch.zeros(5, 2)), r"hidden must be \(M, d\) and weight \(V, d\) with the same d"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), r"targets must have shape \(5,\)"),
])
def test_bad_input(kwargs, match):
    args = dict(hidden=torch.zeros(5, 3), weight=torch.zeros(4, 3), targets=torch.zeros(5, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(**args)
