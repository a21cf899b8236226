"""soft_embedding on CPU at GPT-2 scale (N=32 latent rows, V=50257, d=768, fp32): the fused op vs the plain
PyTorch reference (sort + mask + softmax + matmul), forward and forward+backward.

Run: python -m pytest benchmarks/bench_soft_embedding.py --benchmark-only --benchmark-group-by=param:top_k,param:mode
"""
import pytest
import torch

import coconut_kernels as ck
from coconut_kernels.reference import soft_embedding_reference

torch.set_num_threads(2)
print(f"torch.get_num_threads() = {torch.get_num_threads()}")

N, V, D, TOP_P = 32, 50257, 768, 0.95
IMPLS = {"op": ck.soft_embedding, "reference": soft_embedding_reference}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return 3 * torch.randn(N, V, generator=g), torch.randn(V, D, generator=g) * 0.02


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("top_k", [0, 20])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_soft_embedding(benchmark, inputs, impl, top_k, mode):
    fn = IMPLS[impl]
    logits, weight = inputs
    grad = mode == "fwd+bwd"
    logits, weight = logits.clone().requires_grad_(grad), weight.clone().requires_grad_(grad)
    grad_out = torch.randn(N, D, generator=torch.Generator().manual_seed(1))

    def step():
        out = fn(logits, weight, temperature=0.7, top_k=top_k, top_p=TOP_P)
        if grad:
            logits.grad = weight.grad = None
            out.backward(grad_out)
        return out

    benchmark.extra_info.update(N=N, V=V, d=D, top_p=TOP_P, threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
