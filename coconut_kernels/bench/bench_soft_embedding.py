"""soft_embedding on CPU at GPT-2 scale (N=32 latent rows, V=50257, d=768, fp32): the fused op vs the plain
PyTorch reference (sort + mask + softmax + matmul), forward and forward+backward.

Run: `python -m coconut_kernels.bench --scenario soft_embedding`, or
`python -m pytest coconut_kernels/bench/bench_soft_embedding.py --benchmark-only --benchmark-group-by=param:top_k,param:mode`.
"""
import pytest
import torch

import coconut_kernels as ck
from coconut_kernels.reference import soft_embedding_reference

from .harness import Case, Scenario, register

N, V, D, TOP_P = 32, 50257, 768, 0.95
IMPLS = {"op": (ck.soft_embedding, "impl"), "reference": (soft_embedding_reference, "reference")}


def make_step(impl: str, top_k: int, mode: str, device="cpu", dtype=torch.float32, n=N, vocab=V, d=D):
    """Fresh random inputs; returns the step to time."""
    fn = IMPLS[impl][0]
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    logits = (3 * torch.randn(n, vocab, generator=g)).to(device, dtype).requires_grad_(grad)
    weight = (torch.randn(vocab, d, generator=g) * 0.02).to(device, dtype).requires_grad_(grad)
    grad_out = torch.randn(n, d, generator=g).to(device, dtype)

    def step():
        out = fn(logits, weight, temperature=0.7, top_k=top_k, top_p=TOP_P)
        if grad:
            logits.grad = weight.grad = None
            out.backward(grad_out)
        return out
    return step


def cases(settings):
    quick, device, dtype = settings["quick"], settings["device"], settings["dtype"]
    vocab = 5000 if quick else V
    for mode in ("fwd", "fwd+bwd"):
        for top_k in (0, 20):
            for impl, (_, role) in IMPLS.items():
                yield Case("soft_embedding", impl, "mode,top_k", f"{mode},{top_k}",
                           lambda impl=impl, top_k=top_k, mode=mode: make_step(impl, top_k, mode, device, dtype,
                                                                                vocab=vocab),
                           role=role, reps=2 if quick else 5, extra={"memory": False})


SCENARIO = register(Scenario("soft_embedding", f"soft thinking's input embedding, N={N}, V={V}, d={D}", cases))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("top_k", [0, 20])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_soft_embedding(benchmark, impl, top_k, mode):
    torch.set_num_threads(2)
    benchmark.extra_info.update(N=N, V=V, d=D, top_p=TOP_P, threads=torch.get_num_threads())
    benchmark.pedantic(make_step(impl, top_k, mode), rounds=5, warmup_rounds=1)
