// Every schema of the `coconut` op library, in one place. Backends register their kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake kernels and autograd are
// registered from Python (coconut_kernels/ops/<op>.py).
#include <torch/library.h>

#include "common.h"

#ifdef COCONUT_PYTHON_MODULE
#include <Python.h>
// Importing coconut_kernels._C only runs the registrations below; the ops are reached through
// torch.ops.coconut.*. The same sources build a plain shared library with CMake (no Python needed).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(coconut, m) {
  // ---- latent_feedback ------------------------------------------------------------------------
  // embeds[batch_idx[i], dst_pos[i]] = f(hidden[batch_idx[i], src_pos[i]]) for every i, in place.
  // batch_idx None: embeds and hidden are packed (rows, d) and the positions index rows.
  // norm: "none" | "layernorm" (weight, bias, eps) | "rmsnorm" (weight, eps).
  m.def(
      "latent_feedback_(Tensor(a!) embeds, Tensor hidden, Tensor? batch_idx, Tensor dst_pos, "
      "Tensor src_pos, str norm='none', Tensor? weight=None, Tensor? bias=None, float eps=1e-05) -> ()");
  // Out-of-place twin: a copy of embeds with the rows written.
  m.def(
      "latent_feedback(Tensor embeds, Tensor hidden, Tensor? batch_idx, Tensor dst_pos, "
      "Tensor src_pos, str norm='none', Tensor? weight=None, Tensor? bias=None, float eps=1e-05) -> Tensor");
  // Gradient of the written rows: grad_hidden (hidden's shape, fp32 accumulation, hidden's dtype),
  // grad_weight / grad_bias (fp32, 0-element when the norm has no such parameter).
  m.def(
      "latent_feedback_backward(Tensor grad_embeds, Tensor hidden, Tensor? batch_idx, Tensor dst_pos, "
      "Tensor src_pos, str norm, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // ---- latent_attention -----------------------------------------------------------------------
  // Layout as flash-attention: q (B, Sq, Hq, D); k_new, v_new (B, Sq, Hkv, D);
  // k_cache, v_cache (B, Tmax, Hkv, D); cache_seqlens, cache_leftpad, new_seqlens (B,) int32.
  // Rotary: cos/sin (seqlen_ro, rotary_dim / 2); the position of cache row r is r - cache_leftpad[b].
  //
  // Append (rotated) k_new/v_new rows t < new_seqlens[b] at cache rows cache_seqlens[b] + t.
  m.def(
      "kv_cache_append_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, "
      "Tensor cache_seqlens, Tensor? cache_leftpad, Tensor? new_seqlens, Tensor? rotary_cos, "
      "Tensor? rotary_sin, bool rotary_interleaved) -> ()");
  // Attention of q (at rows cache_seqlens[b] + t) to cache rows [cache_leftpad[b], cache_seqlens[b] + n_new),
  // causal aligned bottom-right. Rows t >= new_seqlens[b] give out = 0 and lse = -inf.
  // out has q's dtype, lse (B, Hq, Sq) is fp32 (fp64 for fp64 inputs, so fp64 gradients are exact).
  // dropout_p > 0: the probabilities (not lse) are dropped with the keep mask of dropout_seed (see
  // csrc/dropout.h) and the kept ones scaled by 1 / (1 - dropout_p); the backward regenerates the mask.
  m.def(
      "latent_attention_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
      "Tensor? cache_leftpad, Tensor? new_seqlens, Tensor? rotary_cos, Tensor? rotary_sin, "
      "bool rotary_interleaved, float softmax_scale, bool causal, float dropout_p=0., int dropout_seed=0) "
      "-> (Tensor out, Tensor lse)");
  // Backward of latent_attention_fwd. Returns dq with respect to the un-rotated q; ADDS the gradients
  // of the cache rows (rotated keys, values) into grad_k_cache / grad_v_cache (fp32, cache's shape).
  m.def(
      "latent_attention_bwd(Tensor grad_out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor out, "
      "Tensor lse, Tensor cache_seqlens, Tensor? cache_leftpad, Tensor? new_seqlens, Tensor? rotary_cos, "
      "Tensor? rotary_sin, bool rotary_interleaved, float softmax_scale, bool causal, "
      "Tensor(a!) grad_k_cache, Tensor(b!) grad_v_cache, float dropout_p=0., int dropout_seed=0) -> Tensor");
  // latent_attention_bwd of a one-row pass (Sq = 1; CPU) that leaves the cache rows j < defer_end[b] to the
  // caller: their P and dS (B, Hq, R) and the rotated q (B, Hq, D), for dK += dS^T q, dV += P^T dO summed over
  // many passes in one product; the other rows are accumulated as latent_attention_bwd does. p_out / ds_out
  // rows the pass does not attend (pads, rows past its own, sequences without a new row) are left as given:
  // pass them zeroed.
  m.def(
      "latent_attention_decode_bwd_deferred(Tensor grad_out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor out, Tensor lse, Tensor cache_seqlens, Tensor? cache_leftpad, Tensor? new_seqlens, "
      "Tensor? rotary_cos, Tensor? rotary_sin, bool rotary_interleaved, float softmax_scale, "
      "Tensor(a!) grad_k_cache, Tensor(b!) grad_v_cache, Tensor defer_end, Tensor(c!) p_out, "
      "Tensor(d!) ds_out, Tensor(e!) q_out, float dropout_p=0., int dropout_seed=0) -> Tensor");
  // Append + attend in one call (the decode path).
  m.def(
      "latent_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_seqlens, Tensor? cache_leftpad=None, Tensor? new_seqlens=None, "
      "Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=False, "
      "float? softmax_scale=None, bool causal=True, float dropout_p=0., int dropout_seed=0) "
      "-> (Tensor out, Tensor lse)");

  // ---- soft_embedding -------------------------------------------------------------------------
  // Soft-thinking input: out[n] = sum_i p[n, i] * weight[i] with p = softmax(logits[n] / temperature) over
  // the kept set, a value-closed filter (every logit tied with a kept one is kept): the top_k largest logits
  // (0: all), then the smallest such set whose probability reaches top_p (1.0: all; the top token always).
  // logits (N, V), weight (V, d); out has weight's dtype. The kept set of row n is {i : logits[n, i] >= threshold[n]}
  // and p[n, i] = exp(logits[n, i] / temperature - lse[n]); threshold, lse (N,) are fp32 (fp64 for fp64 logits)
  // and are all the backward needs besides the inputs.
  m.def(
      "soft_embedding_fwd(Tensor logits, Tensor weight, float temperature, int top_k, float top_p) "
      "-> (Tensor out, Tensor threshold, Tensor lse)");
  // Gradients through the softmax with the kept set held fixed: grad_logits (logits' shape and dtype, 0 outside
  // the kept set), grad_weight (weight's shape and dtype); an output whose output_mask entry is false is a
  // 0-element tensor.
  m.def(
      "soft_embedding_bwd(Tensor grad_out, Tensor logits, Tensor weight, Tensor threshold, Tensor lse, "
      "float temperature, bool[2] output_mask) -> (Tensor grad_logits, Tensor grad_weight)");

  // ---- skinny_linear (CPU) --------------------------------------------------------------------
  // y = x @ weight^T + bias for a few rows: x (M, K) with M <= 16, weight (N, K), bias (N,) or None; float32,
  // contiguous, on the CPU. The weight is read once; each output row is computed in the same order whatever
  // the other rows are (a batch gives every row what it gets alone).
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // Its input gradient: grad_out (M, N) @ weight (N, K), M <= 16, same dtype and layout rules.
  m.def("skinny_linear_input_grad(Tensor grad_out, Tensor weight) -> Tensor");

  // ---- gelu_tanh (CPU) ------------------------------------------------------------------------
  // GPT-2's activation, x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise; float32 CPU tensors of any
  // shape (the result is contiguous).
  m.def("gelu_tanh(Tensor x) -> Tensor");
  // Its gradient: grad_out * d gelu_tanh / dx, for grad_out of x's shape.
  m.def("gelu_tanh_backward(Tensor grad_out, Tensor x) -> Tensor");

  // ---- argmax_last (CPU) ----------------------------------------------------------------------
  // torch.argmax(x, -1): the index (int64) of each row's first maximum along the last dimension, a NaN counting
  // as the largest; float32 or float64 CPU tensors with a non-empty last dimension. Greedy decoding's token.
  m.def("argmax_last(Tensor x) -> Tensor");

  // ---- draw_categorical (CPU) -----------------------------------------------------------------
  // One index per row of probs (n, V) (float32 or float64, mass >= 0, any scale): the first index whose float64
  // cumulative sum, in index order, exceeds min(uniforms[i] * total, the float64 below total), uniforms (n,)
  // float64 in [0, 1); ok[i]: the row's total is finite and positive (else its index is meaningless, in range).
  m.def("draw_categorical(Tensor probs, Tensor uniforms) -> (Tensor index, Tensor ok)");

  // ---- the CPU kernels' instruction set -------------------------------------------------------
  // With isa ("base" | "avx2" | "avx512"), caps the instruction set the CPU kernels run at it (never above what
  // the CPU has; the default is COCONUT_CPU_ISA or the best it has); returns the one they run. Process-wide.
  m.def("_cpu_isa(str isa=\"\") -> str", &coconut::cpu_isa_op);
}
