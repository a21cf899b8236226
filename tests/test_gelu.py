"""gelu_tanh (CPU): values and gradients against float64, the special values as aten gives them, autograd and
double backward, opcheck, bad input; the router takes the kernel exactly where it applies; a GPT-2 training step
gives with the kernel what it gives without."""
import pytest
import torch
import torch.nn.functional as F

from coconut_kernels import gelu_tanh
from coconut_kernels import reference as ref
from coconut_kernels.bench.harness import AtenCalls
from coconut_kernels.data import RaggedCollator
from coconut_kernels.errors import CoconutError
from coconut_kernels.ops import gelu as gl
from tests.helpers import loss_and_grads, max_err, op_calls

ops = torch.ops.coconut


def rand(*shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def reference(x: torch.Tensor, grad: torch.Tensor):
    """gelu (tanh) and its input gradient in float64, by the oracle (written out, not aten's kernel)."""
    xd, gd = x.double(), grad.double()
    return ref.gelu_tanh_reference(xd), ref.gelu_tanh_backward_reference(gd, xd)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (4, 33, 17), (2, 1000)])
def test_values_and_gradient_match_float64(shape):
    """Lengths around the 8-lane vector width exercise the vector loop and the scalar tail."""
    x, g = rand(*shape, seed=1), rand(*shape, seed=2, scale=1.0)
    y_ref, dx_ref = reference(x, g)
    y, dx = ops.gelu_tanh(x), ops.gelu_tanh_backward(g, x)
    assert y.shape == x.shape and dx.shape == x.shape
    assert max_err(y.double(), y_ref) < 2e-6 * max(1.0, y_ref.abs().max().item())
    assert max_err(dx.double(), dx_ref) < 2e-5


def test_special_values_as_aten():
    x = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 1e-3, -1e-3, 5.0, -5.0, 20.0, -20.0, 50.0, -50.0, 1e30, -1e30,
                      float("inf"), float("-inf"), float("nan")])
    g = torch.ones_like(x)
    torch.testing.assert_close(ops.gelu_tanh(x), F.gelu(x, approximate="tanh"), equal_nan=True, rtol=2e-6,
                               atol=1e-7)
    # the gradient where x^3 overflows (|x| >= ~1e13): aten's is NaN (inf * 0), the kernel's 0 below and NaN above
    same = (x.abs() < 1e13) | x.isnan()
    torch.testing.assert_close(ops.gelu_tanh_backward(g, x)[same],
                               torch.ops.aten.gelu_backward(g, x, approximate="tanh")[same], equal_nan=True,
                               rtol=1e-5, atol=1e-6)
    nan = float("nan")  # at 1e30, -1e30, inf, -inf
    torch.testing.assert_close(ops.gelu_tanh_backward(g, x)[~same], torch.tensor([nan, -0.0, nan, nan]),
                               equal_nan=True)


def test_non_contiguous_input():
    x = rand(40, 30, seed=3).t()
    torch.testing.assert_close(ops.gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=2e-6, atol=1e-6)
    g = rand(30, 40, seed=4)
    torch.testing.assert_close(ops.gelu_tanh_backward(g, x), torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
                               rtol=1e-5, atol=1e-5)


def test_autograd_and_double_backward(monkeypatch):
    """The public function's gradient is the kernel's; under create_graph the second derivative (in x and in the
    upstream gradient) is aten's, which autograd can differentiate."""
    monkeypatch.setattr(gl, "MIN_ELEMENTS", 1)
    x0, g0 = rand(6, 11, seed=5), rand(6, 11, seed=6, scale=1.0)
    with AtenCalls() as mode:
        x = x0.clone().requires_grad_()
        gelu_tanh(x).backward(g0)
    assert mode.calls["coconut.gelu_tanh"] == 1 and mode.calls["coconut.gelu_tanh_backward"] == 1
    torch.testing.assert_close(x.grad.double(), reference(x0, g0)[1], rtol=1e-5, atol=2e-5)
    out = []
    for fn in (gelu_tanh, lambda t: F.gelu(t, approximate="tanh")):
        xx, gg = x0.clone().requires_grad_(), g0.clone().requires_grad_()
        (dx,) = torch.autograd.grad(fn(xx), xx, gg, create_graph=True)
        out.append(torch.autograd.grad((dx ** 2).sum(), (xx, gg)))
    for ours, ref in zip(*out):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_opcheck():
    x = rand(5, 40, seed=7)
    torch.library.opcheck(ops.gelu_tanh.default, (x.clone().requires_grad_(),))
    torch.library.opcheck(ops.gelu_tanh_backward.default, (rand(5, 40, seed=8), x))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.gelu_tanh(rand(4, seed=0).double()), "x must be float32"),
    (lambda: ops.gelu_tanh_backward(rand(4, seed=0).half(), rand(4, seed=1)), "grad_out must be float32"),
    (lambda: ops.gelu_tanh_backward(rand(4, seed=0), rand(5, seed=1)), r"grad_out must have x's shape \[5\]"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def kernel_calls(fn) -> int:
    return op_calls(fn, "coconut.gelu_tanh", "coconut.gelu_tanh_backward")


def test_router_takes_the_kernel_exactly_where_it_applies():
    big, small = rand(16, gl.MIN_ELEMENTS // 16, seed=9), rand(3, 100, seed=10)
    g = rand(*big.shape, seed=11)
    assert kernel_calls(lambda: gl.gelu_tanh(big)) == 1
    assert kernel_calls(lambda: gl.gelu_tanh_backward(g, big)) == 1
    assert kernel_calls(lambda: gl.gelu_tanh(small)) == 0  # a one-row pass: aten's
    assert kernel_calls(lambda: gl.gelu_tanh(big.double())) == 0
    assert kernel_calls(lambda: gl.gelu_tanh(big.bfloat16())) == 0
    xg = big.clone().requires_grad_()
    with torch.enable_grad():
        assert kernel_calls(lambda: gl.gelu_tanh_backward(g, xg)) == 0  # a double backward: aten's
    gl.set_enabled(False)
    try:
        assert kernel_calls(lambda: gl.gelu_tanh(big)) == 0
        torch.testing.assert_close(gl.gelu_tanh(big), F.gelu(big, approximate="tanh"))
    finally:
        gl.set_enabled(True)
    with pytest.raises(CoconutError, match="flag must be a bool"):
        gl.set_enabled(1)


def test_model_gives_with_the_kernel_what_it_gives_without(monkeypatch):
    """A GPT-2 (gelu_new) training step with latent passes in fp32: the kernel runs in the fused MLP's forward and
    backward; loss and gradients agree with the kernel switched off."""
    pytest.importorskip("transformers")
    from tests.test_latent import LAT, PAD, examples, pair

    monkeypatch.setattr(gl, "MIN_ELEMENTS", 1)  # the test model's activations are small
    _, lm = pair("gpt2", torch.float32)
    batch = RaggedCollator(PAD, LAT)(examples([3, 2, 0, 3], seed=1))

    def step():
        return loss_and_grads(lm, batch)

    assert kernel_calls(step) > 0
    loss, grads = step()
    gl.set_enabled(False)
    try:
        assert kernel_calls(step) == 0
        ref_loss, ref_grads = step()
    finally:
        gl.set_enabled(True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
