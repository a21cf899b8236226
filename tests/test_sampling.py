"""The token sampler (`latent_decode.draw_categorical`, behind `sample_tokens`, generate and the engine): the
distribution it draws from, indices of zero probability never drawn (the edges of the uniform included), one
uniform per row whether drawn from a generator or given, a row's draw independent of the rows beside it, and a
clear error for rows that cannot be sampled; each through the CPU kernel (`ops.sampling`) and through torch's
route (kernel switched off), and the two give the same index for the same uniform."""
from __future__ import annotations

import pytest
import torch

from coconut_kernels import reference
from coconut_kernels.errors import CoconutError
from coconut_kernels.latent_decode import draw_categorical, filter_logits, sample_tokens
from coconut_kernels.ops import sampling
from tests.helpers import op_calls


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def route(request):
    """Every test of this module through the CPU kernel and through torch's route."""
    before = sampling.enabled()
    sampling.set_enabled(request.param == "kernel")
    yield request.param
    sampling.set_enabled(before)


def test_draws_follow_the_probabilities():
    # a chi-square goodness-of-fit test at a fixed seed: df = 4 (5 categories of positive probability); the
    # 0.1% critical value is 18.47, so a sampler off by a few percent in any category fails it
    p = torch.tensor([0.05, 0.0, 0.10, 0.25, 0.0, 0.35, 0.25], dtype=torch.float64)
    n = 200_000
    probs = p.float().expand(n, -1)
    drawn = draw_categorical(probs, torch.Generator().manual_seed(3))
    counts = torch.bincount(drawn, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0
    expected = n * p[p > 0]
    chi2 = float(((counts[p > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (chi2, counts)


def test_unnormalised_weights_and_a_big_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50257, generator=g) * 3
    filt = filter_logits(logits, 40, 1.0)
    w = filt.softmax(-1) * 7.0  # the draw normalises itself
    for _ in range(50):
        tok = draw_categorical(w, g)
        assert tok.shape == (4,) and tok.dtype == torch.long
        assert torch.isfinite(filt.gather(1, tok[:, None])).all()  # inside the top-40


def test_zero_probabilities_are_never_drawn_even_at_the_uniforms_edges():
    probs = torch.tensor([[0.0, 0.0, 0.25, 0.0, 0.75, 0.0, 0.0]])  # exact in float32
    lowest, highest = torch.tensor([0.0], dtype=torch.float64), torch.tensor([1 - 2 ** -53], dtype=torch.float64)
    assert draw_categorical(probs, uniforms=lowest).tolist() == [2]
    assert draw_categorical(probs, uniforms=highest).tolist() == [4]
    # at the boundary between the two: the mass below 0.25 goes to index 2, from 0.25 on to index 4
    assert draw_categorical(probs, uniforms=torch.tensor([0.25 - 1e-12], dtype=torch.float64)).tolist() == [2]
    assert draw_categorical(probs, uniforms=torch.tensor([0.25], dtype=torch.float64)).tolist() == [4]
    # masked logits (-inf) as the samplers give them
    logits = torch.tensor([[float("-inf"), 1.0, float("-inf"), 2.0, float("-inf")]])
    g = torch.Generator().manual_seed(1)
    seen = {int(sample_tokens(logits, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, generator=g))
            for _ in range(200)}
    assert seen == {1, 3}


def test_one_uniform_per_row_and_rows_independent_of_their_neighbours():
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(6, 1000, generator=g)
    drawn = draw_categorical(probs, torch.Generator().manual_seed(11))
    u = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    assert torch.equal(drawn, draw_categorical(probs, uniforms=u))
    for i in range(6):  # row i alone with its own uniform: what it got in the batch (the engine groups rows)
        assert torch.equal(draw_categorical(probs[i:i + 1], uniforms=u[i:i + 1]), drawn[i:i + 1])
    # the inverse of the CDF, checked against a float64 cumulative sum
    cdf = probs.double().cumsum(-1)
    target = u[:, None] * cdf[:, -1:]
    assert torch.equal(drawn, (cdf <= target).sum(-1))


def test_a_seed_gives_the_same_tokens():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(2))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_tokens(logits, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, generator=g)
                for _ in range(5)]

    a, b, c = draw(4), draw(4), draw(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_rows_that_cannot_be_sampled_are_a_clear_error(bad):
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    probs[1, 1] = bad
    if bad == -1.0:
        probs[1] = 0.0  # no positive mass
    with pytest.raises(CoconutError, match="cannot sample"):
        draw_categorical(probs, torch.Generator().manual_seed(0))


def test_uniforms_must_be_one_per_row():
    probs = torch.rand(3, 10)
    with pytest.raises(CoconutError, match="uniforms must have shape \\(3,\\)"):
        draw_categorical(probs, uniforms=torch.rand(1, dtype=torch.float64))


def _routes(probs, u):
    """(the kernel's indices and ok, torch's indices and ok) for the same uniforms."""
    sampling.set_enabled(False)
    try:
        ref, ref_ok = draw_categorical(probs, uniforms=u, with_ok=True)
    finally:
        sampling.set_enabled(True)
    kern, kern_ok = draw_categorical(probs, uniforms=u, with_ok=True)
    return kern, kern_ok, ref, ref_ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("V", [1, 2, 3, 5, 17, 1000, 50257])
def test_the_kernel_draws_the_index_torch_draws(V, dtype, route):
    if route == "torch":
        pytest.skip("compares the two routes")
    g = torch.Generator().manual_seed(V)
    probs = (torch.randn(7, V, generator=g, dtype=torch.float64) * 3).softmax(-1).to(dtype)
    probs[1, : V // 2] = 0.0            # zero mass at the start ...
    probs[2, V // 3:] = 0.0             # ... and at the end
    probs[3] *= 9.0                     # unnormalised
    if V > 1:
        probs[4, 0] = 0.0
    u = torch.rand(7, dtype=torch.float64, generator=g)
    u[5], u[6] = 0.0, 1 - 2 ** -53      # the uniform's edges
    probs[2, 0] = max(float(probs[2, 0]), 1e-3)  # every row keeps some mass
    kern, kern_ok, ref, ref_ok = _routes(probs, u)
    assert torch.equal(kern, ref) and kern_ok.all() and ref_ok.all()
    assert bool((probs.gather(1, kern[:, None]) > 0).all())
    # the partial sums are torch's float64 cumsum's, bit for bit: the index is the count of sums <= the target
    oracle, oracle_ok = reference.draw_categorical_reference(probs, u)
    assert torch.equal(kern, oracle) and oracle_ok.all()


def test_rows_that_cannot_be_sampled_are_flagged_alike_and_stay_in_range(route):
    if route == "torch":
        pytest.skip("compares the two routes")
    probs = torch.rand(5, 40, generator=torch.Generator().manual_seed(1))
    probs[0, 3] = float("nan")
    probs[1, 7] = float("inf")
    probs[2] = 0.0
    probs[3] = -probs[3]
    u = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kern, kern_ok, ref, ref_ok = _routes(probs, u)
    assert kern_ok.tolist() == ref_ok.tolist() == [False, False, False, False, True]
    assert bool(((kern >= 0) & (kern < 40)).all()) and kern[4] == ref[4]


def test_the_kernel_is_taken_exactly_where_it_applies(route):
    probs = torch.rand(3, 100, generator=torch.Generator().manual_seed(3))
    u = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    calls = op_calls(lambda: draw_categorical(probs, uniforms=u), "coconut.draw_categorical")
    assert calls == (1 if route == "kernel" else 0)
    assert op_calls(lambda: draw_categorical(probs.bfloat16(), uniforms=u), "coconut.draw_categorical") == 0
    with pytest.raises(CoconutError, match="flag must be a bool"):
        sampling.set_enabled(1)


def test_kernel_bad_input_names_the_argument(route):
    if route == "torch":
        pytest.skip("the op itself")
    op = torch.ops.coconut.draw_categorical
    u = torch.rand(3, dtype=torch.float64)
    for call, match in [(lambda: op(torch.rand(3, 4).half(), u), "probs must be float32 or float64, got Half"),
                        (lambda: op(torch.rand(12), u), "probs must have shape \\(n, V\\)"),
                        (lambda: op(torch.rand(3, 0), u), "probs must have shape \\(n, V\\) with V >= 1"),
                        (lambda: op(torch.rand(3, 4), u.float()), "uniforms must be a float64 CPU tensor of shape"),
                        (lambda: op(torch.rand(3, 4), u[:2]), "uniforms must be .* of shape \\(3,\\)")]:
        with pytest.raises(ValueError, match=match):
            call()
    torch.library.opcheck(op.default, (torch.rand(3, 50), u))


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])
def test_top_p_keeps_the_smallest_nucleus(top_p, scale):
    """Against a full sort of the same probabilities: flat rows (scale 0.05: the nucleus spans most of the
    vocabulary, past every topk step) and peaked ones (a few tokens); a row already cut by top-k."""
    g = torch.Generator().manual_seed(int(scale * 100))
    logits = torch.randn(5, 5000, generator=g) * scale
    logits[4, 100:] = float("-inf")  # top-k's mask: the nucleus among 100 tokens
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    out_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p
    expected = torch.empty_like(out_sorted).scatter_(-1, order, out_sorted)
    got = torch.isinf(filter_logits(logits, 0, top_p)) & ~torch.isinf(logits)
    assert torch.equal(got, expected & ~torch.isinf(logits))
    assert bool((~got.all(-1)).all())  # the top token always stays
