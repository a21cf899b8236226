"""soft_embedding: the input vector of the "soft" and "mixture" latent feedback modes (Soft Thinking, Mixture of
Inputs), Σ_i p_i · E_i over a filtered softmax of the logits. Python entry point, fake kernels, autograd and
backend choice; the kernels are csrc/cpu/soft_embedding.cpp (CPU) and coconut_kernels/triton/soft_embedding.py
(CUDA, registered below as the op's CUDA kernel).
"""
from __future__ import annotations

import torch

from ..backend import get_backend
from ..errors import CoconutError
from ..validation import check_bool, check_int, check_real, check_tensor_args

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("coconut::soft_embedding_fwd")
def _fwd_fake(logits, weight, temperature, top_k, top_p):
    n, stats = logits.shape[0], _stats_dtype(logits.dtype)
    return weight.new_empty(n, weight.shape[1]), logits.new_empty(n, dtype=stats), logits.new_empty(n, dtype=stats)


@torch.library.register_fake("coconut::soft_embedding_bwd")
def _bwd_fake(grad_out, logits, weight, threshold, lse, temperature, output_mask):
    grad_logits = logits.new_empty(logits.shape) if output_mask[0] else logits.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    return grad_logits, grad_weight


@torch.library.register_kernel("coconut::soft_embedding_fwd", "cuda")
def _fwd_cuda(logits, weight, temperature, top_k, top_p):
    from ..triton.soft_embedding import soft_embedding_fwd

    return soft_embedding_fwd(logits, weight, temperature, top_k, top_p)


@torch.library.register_kernel("coconut::soft_embedding_bwd", "cuda")
def _bwd_cuda(grad_out, logits, weight, threshold, lse, temperature, output_mask):
    from ..triton.soft_embedding import soft_embedding_bwd

    return soft_embedding_bwd(grad_out, logits, weight, threshold, lse, temperature, output_mask)


def _setup_context(ctx, inputs, output):
    logits, weight, temperature, _, _ = inputs
    _, threshold, lse = output
    ctx.save_for_backward(logits, weight, threshold, lse)
    ctx.temperature = temperature


def _backward(ctx, grad_out, _grad_threshold, _grad_lse):
    logits, weight, threshold, lse = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_logits, grad_weight = torch.ops.coconut.soft_embedding_bwd(
        grad_out, logits, weight, threshold, lse, ctx.temperature, need
    )
    return grad_logits if need[0] else None, grad_weight if need[1] else None, None, None, None


torch.library.register_autograd("coconut::soft_embedding_fwd", _backward, setup_context=_setup_context)


def _check(logits, weight, temperature, top_k, top_p) -> int:
    check_tensor_args(logits=logits, weight=weight)
    if logits.dim() < 2:
        raise CoconutError(f"logits must be (N, V) or (B, S, V) (at least 2-D), got shape {tuple(logits.shape)}")
    if weight.dim() != 2:
        raise CoconutError(f"weight must be 2-D (V, d), got shape {tuple(weight.shape)}")
    V = logits.shape[-1]
    if V < 1:
        raise CoconutError(f"logits must have at least one column (the vocabulary), got shape {tuple(logits.shape)}")
    if weight.shape[0] != V:
        raise CoconutError(f"weight must have {V} rows (logits' vocabulary size), got shape {tuple(weight.shape)}")
    if weight.device != logits.device:
        raise CoconutError(f"weight must be on logits' device ({logits.device}), got {weight.device}")
    for t, name in ((logits, "logits"), (weight, "weight")):
        if t.dtype not in _FLOAT_DTYPES:
            raise CoconutError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dtype == torch.float64 and t.device.type != "cpu":
            raise CoconutError(f"{name}: float64 is supported on CPU only, got a float64 tensor on {t.device}")
    if (logits.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise CoconutError(
            "weight must be float64 exactly when logits is float64, "
            f"got logits {logits.dtype} and weight {weight.dtype}"
        )
    check_real(temperature, "temperature", low=0.0, low_open=True)
    top_k = check_int(top_k, "top_k", low=0, high=V)
    check_real(top_p, "top_p", low=0.0, high=1.0, low_open=True)
    return top_k


def soft_embedding(
    logits: torch.Tensor,
    weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    return_probs: bool = False,
):
    """The "soft thinking" input embedding: out[n] = Σ_i p[n, i] · weight[i], in one fused pass.

    p[n] = softmax(filtered(logits[n]) / temperature), where the filter keeps, as in Hugging Face's
    temperature → top-k → top-p order:
      1. top_k > 0: the logits >= the top_k-th largest of the row (top_k = 0 or V: all);
      2. top_p < 1: among those, the smallest set {x >= t} whose probability (softmax over the set kept by
         step 1, at this temperature) reaches top_p (top_p = 1: all). The top token is always kept.
    Ties: the kept set is value-closed — every logit equal to a kept one is kept — so top_k may keep more than
    top_k tokens when the k-th largest logit is tied, and top_p keeps all ties of the last value it needs. Apart
    from ties (and, for top_p, a cumulative probability within rounding of top_p) this is exactly the set
    Hugging Face's TopKLogitsWarper / TopPLogitsWarper keep.

    Args:
        logits: (N, V) or (B, S, V) (any leading dims, flattened), float32 / float16 / bfloat16
            (float64 on CPU). The filter compares the logits as stored; the softmax runs in float32
            (float64 for float64).
        weight: (V, d) embedding matrix, float32 / float16 / bfloat16 (float64 with float64 logits only);
            it may differ from logits' dtype (e.g. fp32 logits, bf16 embeddings).
        temperature: finite, > 0. top_k: int in [0, V]. top_p: float in (0, 1]. Else CoconutError (a
            ValueError) naming it.
        return_probs: also return the dense probabilities (logits' shape, float32 — float64 for float64 —
            zero outside the kept set), differentiable; e.g. for the entropy weighting of Mixture of Inputs.

    Returns:
        out (*logits.shape[:-1], d) in weight's dtype (accumulated in float32, rounded once), or
        (out, probs) when return_probs.

    Autograd: w.r.t. logits through the softmax, with the filter held as a constant selection (tokens outside
    the kept set get zero gradient), and w.r.t. weight (dW = Pᵀ · dOut, nonzero only on kept rows). The forward
    saves only two (N,) tensors besides the inputs — the threshold (kept = logits >= threshold) and the
    log-normaliser — and the backward recomputes p from the logits: O(N) memory instead of an (N, V) or
    (N, K) probability tensor, for one extra cheap pass over the logits. Double backward is not supported.

    Backends: CPU tensors run the C++ kernel (per-row quickselect for the thresholds — no full sort — then a
    per-row gather of the kept embedding rows when few are kept, a chunked GEMM otherwise). CUDA tensors run the
    Triton kernels for backends "triton" and "cuda" (there is no CUDA C++ kernel for this op), and
    `reference.soft_embedding_reference` for "torch". Triton finds a top_k <= 256 threshold in one pass over the
    row (a sorted list of its largest logits, one more pass for top_p), other thresholds by bisection over the
    logits' bit patterns (32 passes over the row per filter); the chosen set can differ from the CPU's only when
    the cumulative probability is within float32 rounding of top_p. Its forward is then one streaming pass over
    the vocabulary (online softmax, fp16/bf16 GEMMs on tensor cores with fp32 accumulation, fp32 ones in IEEE
    fp32).

    Noise variants (Gumbel on the logits, Dirichlet on the probabilities) are the caller's: add Gumbel noise
    to `logits` before the call. A row whose logits are all -inf gives NaN, as torch.softmax does; NaN logits
    give unspecified results.
    """
    top_k = _check(logits, weight, temperature, top_k, top_p)
    check_bool(return_probs, "return_probs")
    if get_backend(logits.device) == "torch":
        from ..reference import soft_embedding_reference  # the "torch" backend runs the tests' oracle (backend.py)

        return soft_embedding_reference(
            logits, weight, temperature=temperature, top_k=top_k, top_p=top_p, return_probs=return_probs
        )
    lead, V = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, V)
    out, threshold, lse = torch.ops.coconut.soft_embedding_fwd(x, weight, float(temperature), top_k, float(top_p))
    out = out.reshape(*lead, weight.shape[1])
    if not return_probs:
        return out
    xs = x.to(threshold.dtype)
    probs = torch.softmax((xs / temperature).masked_fill(xs < threshold.detach()[:, None], float("-inf")), dim=-1)
    return out, probs.reshape(logits.shape)
