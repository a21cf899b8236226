"""skinny_linear (CPU): values against float64, every row's result independent of the rows beside it and of the
thread count (bitwise), autograd, opcheck, bad input; the router the model layer calls takes the kernel exactly
where it applies; a training step and generate give with the kernel what they give without it."""
import pytest
import torch
import torch.nn.functional as F

from coconut_kernels import CoconutError, reference, skinny_linear
from coconut_kernels.data import RaggedCollator
from coconut_kernels.ops import skinny_linear as sk
from tests.helpers import loss_and_grads, max_err, op_calls

ops = torch.ops.coconut


@pytest.fixture(autouse=True)
def kernel_on():
    """The router's tests take the kernel on whatever the CPU's default (off on Intel CPUs)."""
    before = sk.enabled()
    sk.set_enabled(True)
    yield
    sk.set_enabled(before)


def test_default_switch(monkeypatch):
    """COCONUT_SKINNY_LINEAR decides where it is set; without it the kernel is on except on an Intel CPU."""
    for env, vendor, on in (("0", "AuthenticAMD", False), ("", "AuthenticAMD", False), ("1", "GenuineIntel", True),
                            (None, "GenuineIntel", False), (None, "AuthenticAMD", True), (None, "", True)):
        if env is None:
            monkeypatch.delenv("COCONUT_SKINNY_LINEAR", raising=False)
        else:
            monkeypatch.setenv("COCONUT_SKINNY_LINEAR", env)
        monkeypatch.setattr(sk, "cpu_vendor", lambda v=vendor: v)
        assert sk._default_switch().on is on, (env, vendor)
    assert isinstance(sk.cpu_vendor(), str)


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def tol(K: int) -> float:
    """fp32 error of a length-K dot product of unit normals, with room."""
    return 2e-6 * (K ** 0.5) * 4 + 1e-6


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("K,N", [(1, 3), (7, 5), (8, 1), (9, 64), (64, 129), (257, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_float64(M, K, N, bias):
    x, w = rand(M, K, seed=M), rand(N, K, seed=K + N)
    b = rand(N, seed=7) if bias else None
    y = ops.skinny_linear(x, w, b)
    ref = reference.skinny_linear_reference(x.double(), w.double(), b.double() if bias else None)
    assert y.shape == (M, N) and y.dtype == torch.float32
    err, torch_err = max_err(y, ref), max_err(F.linear(x, w, b), ref)
    assert err <= max(2 * torch_err, tol(K)), (err, torch_err)


@pytest.mark.parametrize("M", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("N,K", [(1, 3), (3, 9), (4, 8), (5, 64), (129, 257), (1001, 65)])
def test_input_grad_matches_float64(M, N, K):
    dy, w = rand(M, N, seed=M + 1), rand(N, K, seed=N)
    dx = ops.skinny_linear_input_grad(dy, w)
    ref = reference.skinny_linear_input_grad_reference(dy.double(), w.double())
    err, torch_err = max_err(dx, ref), max_err(dy @ w, ref)
    assert dx.shape == (M, K) and err <= max(2 * torch_err, tol(N)), (err, torch_err)


def test_each_row_gets_what_it_gets_alone():
    """Bitwise: any slice of the rows, and 1 or 2 threads, give each row the same values (forward and input
    gradient), so a batch of sequences decodes each as it would decode alone."""
    x, w, b = rand(16, 300, seed=1), rand(1001, 300, seed=2), rand(1001, seed=3)
    # input gradients of a weight of 1001 rows (partial sums over chunks of rows) and of 100 rows (one chunk, the
    # columns split across threads)
    grads = [(rand(16, n, seed=4), w[:n].contiguous()) for n in (1001, 100)]
    y, dxs = ops.skinny_linear(x, w, b), [ops.skinny_linear_input_grad(dy, wn) for dy, wn in grads]
    for lo, hi in [(0, 1), (5, 6), (15, 16), (0, 2), (3, 6), (4, 8), (1, 14), (0, 16)]:
        assert torch.equal(ops.skinny_linear(x[lo:hi].contiguous(), w, b), y[lo:hi])
        for (dy, wn), dx in zip(grads, dxs):
            assert torch.equal(ops.skinny_linear_input_grad(dy[lo:hi].contiguous(), wn), dx[lo:hi])
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(ops.skinny_linear(x, w, b), y)
            for (dy, wn), dx in zip(grads, dxs):
                assert torch.equal(ops.skinny_linear_input_grad(dy, wn), dx)
    finally:
        torch.set_num_threads(threads)


def test_public_op_is_differentiable_over_leading_dims():
    x, w, b = rand(3, 5, 37, seed=1), rand(11, 37, seed=2), rand(11, seed=3)
    g = rand(3, 5, 11, seed=4)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = skinny_linear(*leaves)
    (y * g).sum().backward()
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    ref_y = F.linear(*ref)
    (ref_y * g.double()).sum().backward()
    assert y.shape == (3, 5, 11) and max_err(y, ref_y) < 1e-5
    for name, ours, r in zip(("x", "weight", "bias"), leaves, ref):
        assert max_err(ours.grad, r.grad) < 1e-5, name
    # no bias: no bias gradient asked for, none given
    xx = x.clone().requires_grad_()
    skinny_linear(xx, w).sum().backward()
    torch.testing.assert_close(xx.grad, w.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    # K = 0: the bias, broadcast over the rows
    torch.testing.assert_close(skinny_linear(torch.randn(2, 3, 0), torch.randn(5, 0), b[:5]), b[:5].expand(2, 3, 5))


def test_public_op_double_backward():
    """create_graph=True: the input gradient is differentiable (in the upstream gradient and the weight), as
    F.linear's is."""
    x, w, g = rand(4, 6, seed=1), rand(5, 6, seed=2), rand(4, 5, seed=3)
    out = []
    for fn in (skinny_linear, F.linear):
        xx, ww, gg = x.clone().requires_grad_(), w.clone().requires_grad_(), g.clone().requires_grad_()
        (dx,) = torch.autograd.grad(fn(xx, ww), xx, gg, create_graph=True)
        out.append(torch.autograd.grad((dx ** 2).sum(), (gg, ww)))
    for ours, ref in zip(*out):
        assert ours is not None
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_opcheck():
    x, w, b = rand(6, 20, seed=1), rand(9, 20, seed=2), rand(9, seed=3)
    torch.library.opcheck(ops.skinny_linear.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    torch.library.opcheck(ops.skinny_linear.default, (rand(2, 20, seed=4), w.detach(), None))
    torch.library.opcheck(ops.skinny_linear_input_grad.default, (rand(6, 9, seed=5), w.detach()))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.skinny_linear(rand(2, 8, seed=0).double(), rand(3, 8, seed=1).double(), None), "x must be float32"),
    (lambda: ops.skinny_linear(rand(17, 8, seed=0), rand(3, 8, seed=1), None), "x has 17 rows.*at most 16"),
    (lambda: ops.skinny_linear(rand(2, 8, seed=0), rand(3, 7, seed=1), None), r"weight must be \(N, 8\)"),
    (lambda: ops.skinny_linear(rand(2, 8, seed=0), rand(3, 8, seed=1), rand(4, seed=2)),
     r"bias must have shape \(3,\)"),
    (lambda: ops.skinny_linear(rand(8, 2, seed=0).t(), rand(3, 8, seed=1), None), "x must be contiguous"),
    (lambda: ops.skinny_linear(rand(2, 2, 8, seed=0), rand(3, 8, seed=1), None), "x must be 2-D"),
    (lambda: ops.skinny_linear_input_grad(rand(2, 4, seed=0), rand(3, 8, seed=1)), r"weight must be \(4, K\)"),
    (lambda: ops.skinny_linear_input_grad(rand(20, 3, seed=0), rand(3, 8, seed=1)), "grad_out has 20 rows"),
    (lambda: skinny_linear(rand(3, 6, 8, seed=0), rand(3, 8, seed=1)), "x has 18 rows"),
    (lambda: skinny_linear(rand(2, 8, seed=0), "w"), "weight must be a torch.Tensor"),
    (lambda: skinny_linear(rand(2, 8, seed=0).double(), rand(3, 8, seed=1)), "x must be a float32 CPU tensor"),
    (lambda: skinny_linear(rand(2, 8, seed=0), rand(3, 7, seed=1)), "must agree on K"),
    (lambda: skinny_linear(rand(2, 8, seed=0), rand(3, 8, seed=1), rand(2, seed=2)), r"bias must have shape \(3,\)"),
    (lambda: skinny_linear(rand(2, 8, seed=0), rand(3, 8, seed=1).to("meta")), "weight must be a float32 CPU"),
])
def test_bad_input_names_the_argument(call, match):
    """The op's own checks raise ValueError; the Python entry point's raise CoconutError (a ValueError)."""
    with pytest.raises(ValueError, match=match):
        call()


def kernel_calls(fn) -> int:
    return op_calls(fn, "coconut.skinny_linear", "coconut.skinny_linear_input_grad")


def test_router_takes_the_kernel_exactly_where_it_applies():
    w, b = rand(30, 12, seed=1), rand(30, seed=2)
    x = rand(4, 3, 12, seed=3)  # 12 rows
    ref = F.linear(x, w, b)
    with torch.no_grad():
        assert kernel_calls(lambda: sk.linear(x, w, b)) == 1
        assert max_err(sk.linear(x, w, b), ref) < 1e-5 and sk.linear(x, w, b).shape == (4, 3, 30)
        assert kernel_calls(lambda: sk.input_grad(rand(4, 3, 30, seed=4), w)) == 1
        assert kernel_calls(lambda: sk.linear(rand(17, 12, seed=5), w, b)) == 0  # BLAS's rows
        assert kernel_calls(lambda: sk.linear(x.double(), w.double(), b.double())) == 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernel_calls(lambda: sk.linear(x, w, b)) == 0
        sk.set_enabled(False)
        try:
            assert kernel_calls(lambda: sk.linear(x, w, b)) == 0
        finally:
            sk.set_enabled(True)  # the fixture restores the default after the test
    # an autograd graph is wanted (x, weight or bias requires grad): F.linear, and the gradient arrives
    for i in range(3):
        leaves = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, w, b))]
        assert kernel_calls(lambda: sk.linear(*leaves).sum().backward()) == 0
        assert leaves[i].grad is not None
    dy = rand(4, 3, 30, seed=4).requires_grad_()
    assert kernel_calls(lambda: sk.input_grad(dy, w)) == 0
    with torch.no_grad():
        # shapes the kernel does not take go to F.linear, which serves (or rejects) them as it always did
        wt = w.t().contiguous().t()  # non-contiguous weight
        assert kernel_calls(lambda: sk.linear(x, wt, b)) == 0 and max_err(sk.linear(x, wt, b), ref) < 1e-5
        assert kernel_calls(lambda: sk.linear(rand(0, 12, seed=6), w, b)) == 0
        assert kernel_calls(lambda: sk.linear(rand(3, 0, seed=6), torch.randn(30, 0), b)) == 0
        assert kernel_calls(lambda: sk.linear(x, w, b[:1])) == 0  # a broadcast bias
        torch.testing.assert_close(sk.linear(x, w, b[:1]), F.linear(x, w, b[:1]))
    with pytest.raises(CoconutError, match="flag must be a bool"):
        sk.set_enabled(1)


def test_model_gives_with_the_kernel_what_it_gives_without():
    """A GPT-2 training step with latent passes of 4 rows, and generate at B=4, in fp32: the kernel runs in the
    latent passes (forward and backward) and the decode steps; loss, gradients and greedy tokens agree with
    the kernel switched off."""
    pytest.importorskip("transformers")
    from tests.test_latent import LAT, PAD, examples, pair

    _, lm = pair("gpt2", torch.float32)
    collate = RaggedCollator(PAD, LAT)
    batch = collate(examples([3, 2, 0, 3], seed=1))
    prompts = collate(examples([3, 2, 0, 3], seed=1, with_labels=False))

    def step():
        return loss_and_grads(lm, batch)

    def generate():
        return lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=8).tokens

    assert kernel_calls(step) > 0 and kernel_calls(generate) > 0
    (loss, grads), tokens = step(), generate()
    sk.set_enabled(False)
    try:
        assert kernel_calls(step) == 0
        (ref_loss, ref_grads), ref_tokens = step(), generate()
    finally:
        sk.set_enabled(True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert torch.equal(tokens, ref_tokens)


def test_benchmark_scenario_quick():
    """The suite's skinny_linear scenario at --quick: every case runs, each kernel point has its BLAS reference
    and its floor, the end-to-end points their switched-off twin, and the switch is left as it was."""
    from coconut_kernels.bench.__main__ import run_scenario
    from coconut_kernels.bench.bench_skinny_linear import SCENARIO

    info = {k: "x" for k in ("device", "torch", "triton", "coconut_kernels", "date", "commit", "torch_threads")}
    info["dirty"] = False
    settings = {"device": torch.device("cpu"), "dtype": torch.float32, "quick": True, "sizes": [1, 8], "reps": 1}
    messages = []
    rows = [r for r in run_scenario(SCENARIO, settings, info, messages.append) if r["metric"] == "time"]
    roles = {(r["scenario"], r["x_value"], r["role"]) for r in rows}
    for which in ("block", "block_input_grad", "head"):
        for rows_ in (1, 8):
            assert {(f"skinny_linear_{which}", rows_, role) for role in ("impl", "reference", "floor")} <= roles
    assert {("skinny_linear_generate", 2, "impl"), ("skinny_linear_generate", 2, "reference")} <= roles
    assert all(r["p50"] > 0 for r in rows) and sk.enabled()
