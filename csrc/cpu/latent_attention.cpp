// CPU kernels of latent_attention: append into the preallocated KV cache, forward (online softmax over key
// blocks, never an Sq x T score matrix) and backward. The backward runs one task per (sequence, kv head), or
// for Sq = 1 per (sequence, key split), so each task owns its cache rows' gradients and accumulates them
// without atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../dropout.h"
#include "../latent_attention_checks.h"

namespace coconut {
namespace {

constexpr int64_t kKeyBlock = 64;    // keys per block: the block's K/V (and their gradients) stay in L1/L2
constexpr int64_t kQueryChunk = 32;  // query positions per forward task

// Per-sequence lengths, with the defaults of the optional arguments.
struct Lengths {
  const int32_t* seqlens;
  const int32_t* leftpad;
  const int32_t* n_new;
  int64_t Sq;
  int64_t seqlen(int64_t b) const { return seqlens[b]; }
  int64_t lpad(int64_t b) const { return leftpad ? leftpad[b] : 0; }
  int64_t nnew(int64_t b) const { return n_new ? n_new[b] : Sq; }
};

struct LengthTensors {
  at::Tensor seqlens, leftpad, n_new;
  LengthTensors(const at::Tensor& s, const std::optional<at::Tensor>& l, const std::optional<at::Tensor>& n)
      : seqlens(s.contiguous()),
        leftpad(l.has_value() ? l->contiguous() : at::Tensor()),
        n_new(n.has_value() ? n->contiguous() : at::Tensor()) {}
  Lengths view(int64_t Sq) const {
    return {seqlens.data_ptr<int32_t>(), leftpad.defined() ? leftpad.data_ptr<int32_t>() : nullptr,
            n_new.defined() ? n_new.data_ptr<int32_t>() : nullptr, Sq};
  }
};

// What a one-row backward (decode_bwd_kernel) leaves to its caller: for cache rows j < end[b] it writes P and dS
// per head to p / ds ((B, Hq, R), row j at column j) and the rotated q to q ((B, Hq, D)) instead of adding
// dS q and P dO into the accumulators. end == nullptr: nothing deferred.
template <typename acc_t>
struct Deferral {
  const int32_t* end = nullptr;
  acc_t *p = nullptr, *ds = nullptr, *q = nullptr;
  int64_t R = 0;
  bool on() const { return end != nullptr; }
};

// Tasks per parallel_for chunk so that a chunk holds ~64k multiply-adds: tiny calls (decode of a short cache,
// gradcheck) then run inline instead of paying for a parallel region.
inline int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_task));
}

// Mean number of cache rows a sequence attends (the lengths are CPU tensors here).
inline int64_t mean_keys(const Lengths& len, int64_t B) {
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += len.seqlen(b) + len.nnew(b) - len.lpad(b);
  return std::max<int64_t>(1, total / std::max<int64_t>(1, B));
}

// Rotary tables converted once to the accumulation type; half = rotary_dim / 2 (0: no rotary).
template <typename acc_t>
struct Rotary {
  const acc_t* cos = nullptr;
  const acc_t* sin = nullptr;
  int64_t half = 0, n_pos = 0;
  bool interleaved = false;
};

struct RotaryTables {
  at::Tensor cos, sin;
  RotaryTables(const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& s, at::ScalarType acc) {
    if (c.has_value()) {
      cos = c->to(acc).contiguous();
      sin = s->to(acc).contiguous();
    }
  }
  template <typename acc_t>
  Rotary<acc_t> view(bool interleaved) const {
    Rotary<acc_t> r;
    if (cos.defined() && cos.numel() > 0) {
      r.cos = cos.data_ptr<acc_t>();
      r.sin = sin.data_ptr<acc_t>();
      r.half = cos.size(1);
      r.n_pos = cos.size(0);
      r.interleaved = interleaved;
    }
    return r;
  }
};

// The kernels, for AVX-512, AVX2+FMA and the baseline ISA, and COCONUT_CALL_KERNEL to run the one cpu_isa() picks.
#define COCONUT_KERNELS_HEADER "latent_attention_kernels.h"
#include "isa_kernels.h"

inline at::ScalarType acc_scalar_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// ---- append ---------------------------------------------------------------------------------------------

void kv_cache_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                         const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                         const std::optional<at::Tensor>& new_seqlens, const std::optional<at::Tensor>& rotary_cos,
                         const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved) {
  const auto d = check_latent_attention_args(at::Tensor(), k_new, v_new, k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  const LengthTensors lt(cache_seqlens, cache_leftpad, new_seqlens);
  const RotaryTables rt(rotary_cos, rotary_sin, acc_scalar_type(k_cache.scalar_type()));
  const at::Tensor kn = k_new.contiguous(), vn = v_new.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "kv_cache_append_", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    COCONUT_CALL_KERNEL(append_kernel<scalar_t>, k_cache, v_cache, kn, vn, lt.view(d.Sq),
                        rt.view<acc_t>(rotary_interleaved));
  });
}

// ---- forward ----------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> latent_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& new_seqlens,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, double softmax_scale, bool causal, double dropout_p, int64_t dropout_seed) {
  const auto d = check_latent_attention_args(q, at::Tensor(), at::Tensor(), k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  const Dropout drop(dropout_p, dropout_seed);
  const LengthTensors lt(cache_seqlens, cache_leftpad, new_seqlens);
  const RotaryTables rt(rotary_cos, rotary_sin, acc_scalar_type(q.scalar_type()));
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);  // every element is written by the kernel
  at::Tensor lse = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(acc_scalar_type(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "latent_attention_fwd", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    if (d.Sq == 1)  // decode and the one-row latent passes: one stream over the cache per sequence
      COCONUT_CALL_KERNEL(decode_kernel<scalar_t>, qc, k_cache, v_cache, out, lse, lt.view(d.Sq),
                          rt.view<acc_t>(rotary_interleaved), softmax_scale, drop);
    else
      COCONUT_CALL_KERNEL(fwd_kernel<scalar_t>, qc, k_cache, v_cache, out, lse, lt.view(d.Sq),
                          rt.view<acc_t>(rotary_interleaved), softmax_scale, causal, drop);
  });
  return {out, lse};
}

// ---- backward ---------------------------------------------------------------------------------------------

at::Tensor latent_attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                                    const std::optional<at::Tensor>& new_seqlens,
                                    const std::optional<at::Tensor>& rotary_cos,
                                    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                                    double softmax_scale, bool causal, at::Tensor& grad_k_cache,
                                    at::Tensor& grad_v_cache, double dropout_p, int64_t dropout_seed) {
  const auto d = check_latent_attention_args(q, at::Tensor(), at::Tensor(), k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  check_latent_attention_bwd_args(d, q, grad_out, out, lse, k_cache, grad_k_cache, grad_v_cache);
  const Dropout drop(dropout_p, dropout_seed);
  const LengthTensors lt(cache_seqlens, cache_leftpad, new_seqlens);
  const RotaryTables rt(rotary_cos, rotary_sin, acc_scalar_type(q.scalar_type()));
  const at::Tensor qc = q.contiguous(), goc = grad_out.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::empty_like(qc);  // every element is written by the kernel
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "latent_attention_bwd", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    if (d.Sq == 1)
      COCONUT_CALL_KERNEL(decode_bwd_kernel<scalar_t>, goc, qc, k_cache, v_cache, oc, lc, dq, grad_k_cache,
                          grad_v_cache, lt.view(d.Sq), rt.view<acc_t>(rotary_interleaved), softmax_scale, drop);
    else
      COCONUT_CALL_KERNEL(bwd_kernel<scalar_t>, goc, qc, k_cache, v_cache, oc, lc, dq, grad_k_cache, grad_v_cache,
                          lt.view(d.Sq), rt.view<acc_t>(rotary_interleaved), softmax_scale, causal, drop);
  });
  return dq;
}

// latent_attention_bwd of a one-row pass (Sq = 1) that defers the cache rows j < defer_end[b]: their P and dS
// go to p_out / ds_out, the rotated q to q_out (see Deferral); the caller adds dK += dS^T q and dV += P^T dO
// for all such passes at once. The other rows are accumulated as latent_attention_bwd does; dq is the same.
at::Tensor latent_attention_decode_bwd_deferred_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& new_seqlens,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
    double softmax_scale, at::Tensor& grad_k_cache, at::Tensor& grad_v_cache, const at::Tensor& defer_end,
    at::Tensor& p_out, at::Tensor& ds_out, at::Tensor& q_out, double dropout_p, int64_t dropout_seed) {
  const auto d = check_latent_attention_args(q, at::Tensor(), at::Tensor(), k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  check_latent_attention_bwd_args(d, q, grad_out, out, lse, k_cache, grad_k_cache, grad_v_cache);
  COCONUT_CHECK(d.Sq == 1, "q must hold one row per sequence (B, 1, Hq, D) for the deferred backward, got ",
                q.sizes());
  const auto acc = acc_scalar_type(q.scalar_type());
  COCONUT_CHECK(defer_end.device().is_cpu() && defer_end.scalar_type() == at::kInt && defer_end.dim() == 1 &&
                    defer_end.size(0) == d.B,
                "defer_end must be an int32 CPU tensor of shape (", d.B, ",), got ", defer_end.scalar_type(), " ",
                defer_end.sizes(), " on ", defer_end.device());
  const int64_t R = p_out.dim() == 3 ? p_out.size(2) : -1;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{p_out, "p_out"}, {ds_out, "ds_out"}}) {
    COCONUT_CHECK(t.dim() == 3 && t.size(0) == d.B && t.size(1) == d.Hq && t.size(2) == R, name,
                  " must have shape (B, Hq, R) = (", d.B, ", ", d.Hq, ", ", R, "), got ", t.sizes());
    COCONUT_CHECK(t.scalar_type() == acc && t.is_contiguous() && t.device().is_cpu(), name,
                  " must be a contiguous CPU tensor of ", acc, ", got ", t.scalar_type(), " on ", t.device());
  }
  COCONUT_CHECK(q_out.dim() == 3 && q_out.size(0) == d.B && q_out.size(1) == d.Hq && q_out.size(2) == q.size(3) &&
                    q_out.scalar_type() == acc && q_out.is_contiguous() && q_out.device().is_cpu(),
                "q_out must be a contiguous CPU tensor of ", acc, " and shape (", d.B, ", ", d.Hq, ", ", q.size(3),
                "), got ", q_out.scalar_type(), " ", q_out.sizes(), " on ", q_out.device());
  const at::Tensor ends = defer_end.contiguous();
  const int32_t* ep = ends.data_ptr<int32_t>();
  for (int64_t b = 0; b < d.B; ++b)
    COCONUT_CHECK(ep[b] >= 0 && ep[b] <= R, "defer_end[", b, "] = ", ep[b], " is out of range: expected [0, ", R,
                  "] (p_out's rows)");
  const Dropout drop(dropout_p, dropout_seed);
  const LengthTensors lt(cache_seqlens, cache_leftpad, new_seqlens);
  const RotaryTables rt(rotary_cos, rotary_sin, acc);
  const at::Tensor qc = q.contiguous(), goc = grad_out.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "latent_attention_decode_bwd_deferred",
                                  [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    Deferral<acc_t> def;
    def.end = ep, def.p = p_out.data_ptr<acc_t>(), def.ds = ds_out.data_ptr<acc_t>(), def.q = q_out.data_ptr<acc_t>();
    def.R = R;
    COCONUT_CALL_KERNEL(decode_bwd_kernel<scalar_t>, goc, qc, k_cache, v_cache, oc, lc, dq, grad_k_cache,
                        grad_v_cache, lt.view(1), rt.view<acc_t>(rotary_interleaved), softmax_scale, drop, def);
  });
  return dq;
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CPU, m) {
  m.impl("kv_cache_append_", &kv_cache_append_cpu);
  m.impl("latent_attention_fwd", &latent_attention_fwd_cpu);
  m.impl("latent_attention_bwd", &latent_attention_bwd_cpu);
  m.impl("latent_attention_decode_bwd_deferred", &latent_attention_decode_bwd_deferred_cpu);
}

}  // namespace coconut
