"""argmax_last (CPU): the index of each row's first maximum, as torch.argmax(x, -1) gives it, against a reference
written out here; ties, NaN, infinities and signed zeros in the vector part and in the tail; opcheck; bad input;
the router takes the kernel exactly where it applies; greedy generate, the engine and the "eot" stop rule give
with the kernel what they give without."""
import pytest
import torch

from coconut_kernels import LatentLM
from coconut_kernels import reference as ref
from coconut_kernels.data import RaggedCollator
from coconut_kernels.errors import CoconutError
from coconut_kernels.models import GPT2, GPT2Config
from coconut_kernels.ops import argmax as am
from tests.helpers import op_calls

ops = torch.ops.coconut
NAN, INF = float("nan"), float("inf")
# Row lengths around the 4 / 8 / 16-lane vectors of the copies (the vector loop, the scalar tail, rows shorter
# than one vector) and a GPT-2 vocabulary.
LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 1000, 50257]


def reference(x: torch.Tensor) -> torch.Tensor:
    """The oracle (reference.py), checked here against a loop over Python floats."""
    out = ref.argmax_last_reference(x)
    rows = x.reshape(-1, x.shape[-1]).tolist()
    loop = []
    for row in rows:
        nans = [i for i, v in enumerate(row) if v != v]
        loop.append(nans[0] if nans else row.index(max(row)))
    assert out.tolist() == torch.tensor(loop, dtype=torch.long).reshape(x.shape[:-1]).tolist()
    return out


def rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def check(x: torch.Tensor) -> None:
    got = ops.argmax_last(x)
    assert got.dtype == torch.long and got.shape == x.shape[:-1]
    assert torch.equal(got, reference(x)), (got, reference(x))
    assert torch.equal(got, x.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", LENGTHS)
def test_random_rows(n, dtype):
    check(rand(3, n, seed=n, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [5, 16, 33, 64, 100, 1000])
def test_ties_go_to_the_first_index(n, dtype):
    """Few distinct values: every row has its maximum many times, in several lanes and blocks."""
    g = torch.Generator().manual_seed(n)
    check(torch.randint(-3, 4, (16, n), generator=g).to(dtype))
    # one maximum repeated at two chosen places: the earlier one, in whatever lane or block, wins
    for a, b in [(0, n - 1), (n - 1, n - 1), (n // 2, n - 1), (1, n // 3 + 1), (n - 2, n - 1)]:
        x = torch.zeros(n, dtype=dtype) - 1.0
        x[b] = x[a] = 5.0
        check(x[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 16, 17, 64, 65, 1000])
def test_nan_is_the_largest(n, dtype):
    for positions in ([0], [n - 1], [n // 2], [n // 2, 1], [n - 1, n // 3]):
        x = rand(n, seed=len(positions), dtype=dtype)
        x[min(n - 1, n // 4)] = INF
        for p in positions:
            x[min(p, n - 1)] = NAN
        check(x[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 16, 40, 1000])
def test_infinities_and_signed_zeros(n, dtype):
    check(torch.full((2, n), -INF, dtype=dtype))                    # every element -inf: the first
    x = torch.full((n,), -INF, dtype=dtype)
    x[n - 1] = -1e30
    check(x[None])
    x = rand(n, seed=3, dtype=dtype)
    x[n // 2] = x[n - 1] = INF
    check(x[None])
    x = torch.full((n,), -1.0, dtype=dtype)
    x[n // 3], x[n - 1] = -0.0, 0.0                                  # -0.0 == 0.0: the first of the two
    check(x[None])


def test_max_only_in_the_tail_and_in_the_last_lane():
    for n in (17, 33, 50257):
        x = rand(4, n, seed=n)
        x[0, n - 1] = 100.0
        x[1, (n // 16) * 16 - 1] = 100.0
        x[2, 15] = 100.0
        x[3, 0] = 100.0
        check(x)


def test_leading_dimensions_and_rows_across_threads():
    check(rand(2, 3, 500, seed=1))
    check(rand(257, 300, seed=2))  # many rows: several parallel tasks


def test_opcheck():
    torch.library.opcheck(ops.argmax_last.default, (rand(5, 40, seed=8),))
    torch.library.opcheck(ops.argmax_last.default, (rand(2, 3, 40, seed=9, dtype=torch.float64),))


@pytest.mark.parametrize("call, match", [
    (lambda: ops.argmax_last(torch.randn(3, 0)), "last dimension must not be empty"),
    (lambda: ops.argmax_last(torch.tensor(1.0)), "at least one dimension"),
    (lambda: ops.argmax_last(torch.randn(4, 8).half()), "x must be float32 or float64, got Half"),
    (lambda: ops.argmax_last(torch.randint(0, 4, (3, 3))), "x must be float32 or float64, got Long"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def kernel_calls(fn) -> int:
    return op_calls(fn, "coconut.argmax_last")


def test_router_takes_the_kernel_exactly_where_it_applies():
    big = rand(8, am.MIN_ELEMENTS // 8, seed=9)
    assert kernel_calls(lambda: am.argmax_last(big)) == 1
    assert kernel_calls(lambda: am.argmax_last(big.double())) == 1
    for other in (rand(3, 100, seed=10),          # small: torch's
                  big.bfloat16(),                  # a dtype the kernel has no copy for
                  big.t(),                         # not contiguous
                  big.clone().requires_grad_()[:, :0]):
        assert kernel_calls(lambda: am.argmax_last(other) if other.shape[-1] else None) == 0
        if other.shape[-1]:
            assert torch.equal(am.argmax_last(other), other.argmax(-1))
    xg = big.clone().requires_grad_()
    assert kernel_calls(lambda: am.argmax_last(xg)) == 1  # an integer result: nothing to differentiate
    am.set_enabled(False)
    try:
        assert kernel_calls(lambda: am.argmax_last(big)) == 0
        assert torch.equal(am.argmax_last(big), big.argmax(-1))
    finally:
        am.set_enabled(True)
    with pytest.raises(CoconutError, match="flag must be a bool"):
        am.set_enabled(1)


V = 4101  # a vocabulary above MIN_ELEMENTS for one row
EOS, BOT, LAT, EOT = V - 4, V - 3, V - 2, V - 1


def tiny_lm():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, n_layer=2, n_head=2, d_model=16, max_position=64)).eval()
    return LatentLM(model, LAT, BOT, EOT, EOS)


def prompts(latents=(2, 0, 3)):
    ex = [{"input_ids": [3, 4, 5, BOT] + [LAT] * k + [EOT]} for k in latents]
    batch = RaggedCollator(EOS, LAT)(ex)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("stop", [None, ("eot", 4)])
def test_greedy_generate_gives_with_the_kernel_what_it_gives_without(stop):
    lm = tiny_lm()
    ids, mask = prompts((2, 1, 3))

    def gen():
        return lm.generate(ids, mask, max_new_tokens=6, stop=stop)

    assert kernel_calls(gen) > 0
    out = gen()
    am.set_enabled(False)
    try:
        assert kernel_calls(gen) == 0
        ref = gen()
    finally:
        am.set_enabled(True)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.n_latents, ref.n_latents)


def test_engine_greedy_gives_with_the_kernel_what_it_gives_without():
    from coconut_kernels.engine import LatentEngine, SamplingParams

    lm = tiny_lm()
    ids, mask = prompts()
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]

    def run():
        return [r.samples[0].token_ids for r in LatentEngine(lm, 2, 32).generate(rows, SamplingParams(max_tokens=5))]

    assert kernel_calls(run) > 0
    out = run()
    am.set_enabled(False)
    try:
        ref = run()
    finally:
        am.set_enabled(True)
    assert out == ref
