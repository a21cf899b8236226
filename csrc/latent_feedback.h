// Argument handling of latent_feedback_ shared by the CPU and CUDA kernels: validation of shapes,
// dtypes and devices, the norm name, and a strided view of the rows both kernels read and write.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common.h"

namespace coconut {

enum class FeedbackNorm : int { kNone = 0, kLayerNorm = 1, kRMSNorm = 2 };

// The geometry of one call. Rows are addressed as base + b * batch_stride + pos * row_stride, with the
// feature dimension contiguous; the packed layout is the case B = 1, batch_stride = 0.
struct FeedbackArgs {
  FeedbackNorm norm;
  bool batched;
  int64_t n;        // number of rows to write
  int64_t d;        // feature size
  int64_t batch;    // B (1 when packed)
  int64_t t_len;    // rows per sequence of embeds (T) or packed rows
  int64_t s_len;    // rows per sequence of hidden (S) or packed rows
};

// Validates everything that needs no look at index values and returns the geometry.
// `out_name` names the written tensor in messages ("embeds" or "grad_embeds").
FeedbackArgs check_feedback_args(const at::Tensor& embeds, const at::Tensor& hidden,
                                 const std::optional<at::Tensor>& batch_idx, const at::Tensor& dst_pos,
                                 const at::Tensor& src_pos, c10::string_view norm,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 double eps, const char* out_name);

// Checks index ranges and that no (batch, destination) pair repeats. Reads the index values, so it
// syncs the host when they live on a GPU: the CPU kernel always calls it, the CUDA one under COCONUT_DEBUG.
void check_feedback_indices(const FeedbackArgs& a, const std::optional<at::Tensor>& batch_idx,
                            const at::Tensor& dst_pos, const at::Tensor& src_pos);

// Rows with a contiguous feature dimension and any row/batch strides: the tensor itself when it has that
// form, else a contiguous copy (the caller copies back into a written tensor when `.is_same` is false).
at::Tensor rows_view(const at::Tensor& t);

inline int64_t batch_stride(const at::Tensor& t, bool batched) { return batched ? t.stride(0) : 0; }
inline int64_t row_stride(const at::Tensor& t, bool batched) { return t.stride(batched ? 1 : 0); }

}  // namespace coconut
