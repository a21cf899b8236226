// Argument checks of the latent_attention ops (kv_cache_append_, latent_attention_fwd/bwd), shared by the
// CPU and CUDA kernels so both reject the same inputs with the same messages. Shapes, dtypes and devices
// are always checked; the lengths' values on CPU tensors always, on CUDA tensors under COCONUT_DEBUG=1.
#pragma once
#include <optional>

#include "common.h"

namespace coconut {

struct LatentAttentionDims {
  int64_t B, Sq, Hq, Hkv, D, Tmax, rotary_dim;
};

inline void check_lengths_arg(const std::optional<at::Tensor>& t, int64_t B, const at::Tensor& ref,
                              const char* name) {
  if (!t.has_value()) return;
  COCONUT_CHECK(t->dim() == 1 && t->size(0) == B, name, " must have shape (B,) = (", B, ",), got ", t->sizes());
  COCONUT_CHECK(t->scalar_type() == at::kInt, name, " must be int32, got ", t->scalar_type());
  check_same_device(*t, ref, name, "k_cache");
}

// Values: 0 <= cache_seqlens, 0 <= new_seqlens <= Sq, cache_seqlens + new tokens <= Tmax,
// 0 <= cache_leftpad <= cache_seqlens + new tokens (a left-padded prefix pass writes its own pad rows), and
// the rotary table covers every position written or queried (cache_seqlens + new tokens - leftpad).
inline void check_latent_attention_values(const LatentAttentionDims& d, const at::Tensor& cache_seqlens,
                                          const std::optional<at::Tensor>& cache_leftpad,
                                          const std::optional<at::Tensor>& new_seqlens,
                                          const std::optional<at::Tensor>& rotary_cos) {
  const at::Tensor sl = cache_seqlens.to(at::kCPU).contiguous();
  const at::Tensor lp = cache_leftpad.has_value() ? cache_leftpad->to(at::kCPU).contiguous() : at::Tensor();
  const at::Tensor nn = new_seqlens.has_value() ? new_seqlens->to(at::kCPU).contiguous() : at::Tensor();
  const int64_t n_ro = rotary_cos.has_value() ? rotary_cos->size(0) : 0;
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t s = sl.data_ptr<int32_t>()[b];
    const int64_t n = nn.defined() ? nn.data_ptr<int32_t>()[b] : d.Sq;
    const int64_t l = lp.defined() ? lp.data_ptr<int32_t>()[b] : 0;
    COCONUT_CHECK(s >= 0, "cache_seqlens[", b, "] = ", s, " is negative");
    COCONUT_CHECK(n >= 0 && n <= d.Sq, "new_seqlens[", b, "] = ", n, " must be in [0, Sq = ", d.Sq, "]");
    COCONUT_CHECK(s + n <= d.Tmax, "cache_seqlens[", b, "] + new tokens = ", s, " + ", n,
                  " exceeds the cache length Tmax = ", d.Tmax, " (k_cache.shape[1])");
    COCONUT_CHECK(l >= 0 && l <= s + n, "cache_leftpad[", b, "] = ", l, " must be in [0, cache_seqlens + new tokens = ",
                  s + n, "]");
    if (rotary_cos.has_value() && n > 0) {
      COCONUT_CHECK(s + n - l <= n_ro, "rotary_cos/rotary_sin have ", n_ro, " positions but sequence ", b,
                    " needs ", s + n - l, " (cache_seqlens + new tokens - cache_leftpad)");
    }
  }
}

// q or k_new/v_new may be undefined tensors: the append has no q, fwd/bwd have no new rows.
inline LatentAttentionDims check_latent_attention_args(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& new_seqlens, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin) {
  check_rank(k_cache, 4, "k_cache", "(B, Tmax, Hkv, D)");
  check_float_dtype(k_cache, "k_cache");
  COCONUT_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
                v_cache.sizes());
  check_same_dtype(v_cache, k_cache, "v_cache", "k_cache");
  check_same_device(v_cache, k_cache, "v_cache", "k_cache");
  COCONUT_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
                "k_cache and v_cache must be contiguous in the last (head) dimension");
  LatentAttentionDims d{k_cache.size(0), 0, 0, k_cache.size(2), k_cache.size(3), k_cache.size(1), 0};
  COCONUT_CHECK(d.D >= 1 && d.D <= 256, "head dimension D = k_cache.shape[3] must be in [1, 256], got ", d.D);
  COCONUT_CHECK(d.Hkv >= 1, "k_cache must have at least one head, got shape ", k_cache.sizes());
  if (q.defined()) {
    check_rank(q, 4, "q", "(B, Sq, Hq, D)");
    check_same_dtype(q, k_cache, "q", "k_cache");
    check_same_device(q, k_cache, "q", "k_cache");
    COCONUT_CHECK(q.size(0) == d.B && q.size(3) == d.D, "q must have shape (B, Sq, Hq, D) with B = ", d.B,
                  " and D = ", d.D, " as k_cache, got ", q.sizes());
    COCONUT_CHECK(q.size(2) >= 1 && q.size(2) % d.Hkv == 0, "q's head count ", q.size(2),
                  " must be a positive multiple of the cache's head count Hkv = ", d.Hkv);
    d.Sq = q.size(1);
    d.Hq = q.size(2);
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_new, "k_new"}, {v_new, "v_new"}}) {
    if (!t.defined()) continue;
    check_rank(t, 4, name, "(B, Sq, Hkv, D)");
    check_same_dtype(t, k_cache, name, "k_cache");
    check_same_device(t, k_cache, name, "k_cache");
    const int64_t sq = q.defined() ? d.Sq : k_new.size(1);
    COCONUT_CHECK(t.size(0) == d.B && t.size(1) == sq && t.size(2) == d.Hkv && t.size(3) == d.D, name,
                  " must have shape (B, Sq, Hkv, D) = (", d.B, ", ", sq, ", ", d.Hkv, ", ", d.D, "), got ", t.sizes());
    d.Sq = sq;
  }
  COCONUT_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == d.B,
                "cache_seqlens must have shape (B,) = (", d.B, ",), got ", cache_seqlens.sizes());
  COCONUT_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
                cache_seqlens.scalar_type());
  check_same_device(cache_seqlens, k_cache, "cache_seqlens", "k_cache");
  check_lengths_arg(cache_leftpad, d.B, k_cache, "cache_leftpad");
  check_lengths_arg(new_seqlens, d.B, k_cache, "new_seqlens");
  COCONUT_CHECK(rotary_cos.has_value() == rotary_sin.has_value(),
                "rotary_cos and rotary_sin must be given together");
  if (rotary_cos.has_value()) {
    check_rank(*rotary_cos, 2, "rotary_cos", "(seqlen_ro, rotary_dim / 2)");
    COCONUT_CHECK(rotary_sin->sizes() == rotary_cos->sizes(), "rotary_sin must have rotary_cos's shape ",
                  rotary_cos->sizes(), ", got ", rotary_sin->sizes());
    check_float_dtype(*rotary_cos, "rotary_cos");
    check_same_dtype(*rotary_sin, *rotary_cos, "rotary_sin", "rotary_cos");
    check_same_device(*rotary_cos, k_cache, "rotary_cos", "k_cache");
    check_same_device(*rotary_sin, k_cache, "rotary_sin", "k_cache");
    d.rotary_dim = 2 * rotary_cos->size(1);
    COCONUT_CHECK(d.rotary_dim <= d.D, "rotary_dim = 2 * rotary_cos.shape[1] = ", d.rotary_dim,
                  " must be <= the head dimension D = ", d.D);
  }
  if (k_cache.is_cpu() || debug_checks()) {
    check_latent_attention_values(d, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos);
  }
  return d;
}

// The extra arguments of latent_attention_bwd: grad_out and out shaped as q, lse (B, Hq, Sq) fp32 and the
// gradient accumulators (cache's shape, contiguous); lse and the accumulators are fp32, fp64 for fp64 inputs.
inline void check_latent_attention_bwd_args(const LatentAttentionDims& d, const at::Tensor& q,
                                            const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                                            const at::Tensor& k_cache, const at::Tensor& grad_k_cache,
                                            const at::Tensor& grad_v_cache) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    COCONUT_CHECK(t.sizes() == q.sizes(), name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
    check_same_dtype(t, q, name, "q");
    check_same_device(t, q, name, "q");
  }
  COCONUT_CHECK(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.Hq && lse.size(2) == d.Sq,
                "lse must have shape (B, Hq, Sq) = (", d.B, ", ", d.Hq, ", ", d.Sq, "), got ", lse.sizes());
  const auto acc = k_cache.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  COCONUT_CHECK(lse.scalar_type() == acc, "lse must be ", acc, " for ", q.scalar_type(), " inputs, got ",
                lse.scalar_type());
  check_same_device(lse, q, "lse", "q");
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{grad_k_cache, "grad_k_cache"}, {grad_v_cache, "grad_v_cache"}}) {
    COCONUT_CHECK(t.sizes() == k_cache.sizes(), name, " must have the cache's shape ", k_cache.sizes(), ", got ",
                  t.sizes());
    COCONUT_CHECK(t.scalar_type() == acc, name, " must be ", acc, " (the accumulation type of ",
                  k_cache.scalar_type(), "), got ", t.scalar_type());
    COCONUT_CHECK(t.is_contiguous(), name, " must be contiguous");
    check_same_device(t, k_cache, name, "k_cache");
  }
}

}  // namespace coconut
