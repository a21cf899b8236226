// Device-generic ops built from the kernels of the others, registered once for every backend.
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <optional>

#include "common.h"
#include "dropout.h"
#include "latent_attention_checks.h"

namespace coconut {

at::Tensor latent_feedback(const at::Tensor& embeds, const at::Tensor& hidden,
                           const std::optional<at::Tensor>& batch_idx, const at::Tensor& dst_pos,
                           const at::Tensor& src_pos, c10::string_view norm,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                           double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("coconut::latent_feedback_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   const at::Tensor&, const at::Tensor&, c10::string_view,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   double)>();
  at::Tensor out = embeds.clone(at::MemoryFormat::Contiguous);
  op.call(out, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> latent_attention(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
    at::Tensor& v_cache, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& new_seqlens, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, std::optional<double> softmax_scale,
    bool causal, double dropout_p, int64_t dropout_seed) {
  static auto append = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("coconut::kv_cache_append_", "")
                           .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, bool)>();
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("coconut::latent_attention_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double,
                            bool, double, int64_t)>();
  // Everything is validated before the append, so a rejected call leaves the cache unchanged.
  check_latent_attention_args(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens,
                              rotary_cos, rotary_sin);
  const Dropout drop(dropout_p, dropout_seed);  // its checks, before the cache is written
  const double scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt((double)q.size(3));
  append.call(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin,
              rotary_interleaved);
  return fwd.call(q, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin,
                  rotary_interleaved, scale, causal, dropout_p, dropout_seed);
}

TORCH_LIBRARY_IMPL(coconut, CompositeExplicitAutograd, m) {
  m.impl("latent_feedback", &latent_feedback);
  m.impl("latent_attention", &latent_attention);
}

}  // namespace coconut
