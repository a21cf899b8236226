// CPU kernels of latent_feedback_ and latent_feedback_backward: at::parallel_for over the N written
// rows, the optional LayerNorm/RMSNorm computed in fp32 (fp64 for double) on a row buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "../latent_feedback.h"

namespace coconut {
namespace {

// Lanes of the explicit partial sums: floating-point sums are not reassociated by the compiler, so
// independent accumulators are what lets it vectorise the reductions (and they sum more accurately).
constexpr int kLanes = 8;

template <typename acc_t>
acc_t row_sum(const acc_t* x, int64_t d) {
  acc_t lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += x[j + l];
  acc_t s = 0;
  for (; j < d; ++j) s += x[j];
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// sum((x - c) * (y - c')) style reductions reduce to this: sum(x * y).
template <typename acc_t>
acc_t row_dot(const acc_t* x, const acc_t* y, int64_t d) {
  acc_t lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += x[j + l] * y[j + l];
  acc_t s = 0;
  for (; j < d; ++j) s += x[j] * y[j];
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// Reads index values of either integer width without converting the tensor.
struct Index {
  const void* p = nullptr;
  bool wide = false;
  explicit Index(const at::Tensor& t) : p(t.data_ptr()), wide(t.scalar_type() == at::kLong) {}
  Index() = default;
  int64_t operator[](int64_t i) const {
    return wide ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
  }
};

// Overwrites x by x_hat = (x - mean) * rstd (mean = 0 for RMSNorm) and returns rstd.
template <typename acc_t>
acc_t normalise(acc_t* x, int64_t d, FeedbackNorm norm, double eps) {
  acc_t mean = 0;
  if (norm == FeedbackNorm::kLayerNorm) {
    mean = row_sum(x, d) / static_cast<acc_t>(d);
    for (int64_t j = 0; j < d; ++j) x[j] -= mean;
  }
  const acc_t rstd = acc_t(1) / std::sqrt(row_dot(x, x, d) / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
  for (int64_t j = 0; j < d; ++j) x[j] *= rstd;
  return rstd;
}

// Weight and bias as acc_t arrays (they may be stored in hidden's dtype or float32), or empty.
template <typename acc_t>
std::vector<acc_t> param_values(const std::optional<at::Tensor>& p) {
  if (!p.has_value()) return {};
  at::Tensor c = p->to(at::kCPU, c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return std::vector<acc_t>(c.data_ptr<acc_t>(), c.data_ptr<acc_t>() + c.numel());
}

struct Rows {
  Index bat, dst, src;
  int64_t e_bs, e_rs, h_bs, h_rs;  // batch and row strides of embeds (or grad_embeds) and hidden
};

Rows make_rows(const FeedbackArgs& a, const at::Tensor& embeds, const at::Tensor& hidden,
               const std::optional<at::Tensor>& batch_idx, const at::Tensor& dst, const at::Tensor& src) {
  Rows r;
  if (a.batched) r.bat = Index(*batch_idx);
  r.dst = Index(dst);
  r.src = Index(src);
  r.e_bs = batch_stride(embeds, a.batched);
  r.e_rs = row_stride(embeds, a.batched);
  r.h_bs = batch_stride(hidden, a.batched);
  r.h_rs = row_stride(hidden, a.batched);
  return r;
}

template <typename scalar_t>
void forward_kernel(const FeedbackArgs& a, at::Tensor& embeds, const at::Tensor& hidden, const Rows& r,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  using acc_t = typename acc_type<scalar_t>::type;
  scalar_t* out = embeds.data_ptr<scalar_t>();
  const scalar_t* in = hidden.data_ptr<scalar_t>();
  const std::vector<acc_t> w = param_values<acc_t>(weight), bs = param_values<acc_t>(bias);
  const int64_t d = a.d;
  const int64_t grain = std::max<int64_t>(1, 32768 / d);
  at::parallel_for(0, a.n, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(a.norm == FeedbackNorm::kNone ? 0 : d);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = a.batched ? r.bat[i] : 0;
      const scalar_t* xs = in + b * r.h_bs + r.src[i] * r.h_rs;
      scalar_t* y = out + b * r.e_bs + r.dst[i] * r.e_rs;
      if (a.norm == FeedbackNorm::kNone) {
        std::memcpy(y, xs, d * sizeof(scalar_t));
        continue;
      }
      for (int64_t j = 0; j < d; ++j) x[j] = static_cast<acc_t>(xs[j]);
      normalise(x.data(), d, a.norm, eps);
      if (!w.empty() && !bs.empty()) {
        for (int64_t j = 0; j < d; ++j) y[j] = static_cast<scalar_t>(x[j] * w[j] + bs[j]);
      } else if (!w.empty()) {
        for (int64_t j = 0; j < d; ++j) y[j] = static_cast<scalar_t>(x[j] * w[j]);
      } else if (!bs.empty()) {
        for (int64_t j = 0; j < d; ++j) y[j] = static_cast<scalar_t>(x[j] + bs[j]);
      } else {
        for (int64_t j = 0; j < d; ++j) y[j] = static_cast<scalar_t>(x[j]);
      }
    }
  });
}

void latent_feedback_cpu(at::Tensor& embeds, const at::Tensor& hidden, const std::optional<at::Tensor>& batch_idx,
                         const at::Tensor& dst_pos, const at::Tensor& src_pos, c10::string_view norm,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         double eps) {
  const FeedbackArgs a = check_feedback_args(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps,
                                             "embeds");
  check_feedback_indices(a, batch_idx, dst_pos, src_pos);
  if (a.n == 0) return;
  const at::Tensor h = rows_view(hidden), dst = dst_pos.contiguous(), src = src_pos.contiguous();
  const std::optional<at::Tensor> bat = a.batched ? std::optional<at::Tensor>(batch_idx->contiguous()) : std::nullopt;
  at::Tensor e = rows_view(embeds);
  const Rows r = make_rows(a, e, h, bat, dst, src);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "latent_feedback_", [&] {
    forward_kernel<scalar_t>(a, e, h, r, weight, bias, eps);
  });
  if (!e.is_same(embeds)) embeds.copy_(e);
}

// Backward. Several i may read the same source row, so the rows are grouped by source (stable order of
// i) and each group is summed by one thread: no atomics, and the result does not depend on the number
// of threads. grad_weight/grad_bias are summed per fixed block of groups, then the blocks in order.
template <typename scalar_t>
void backward_kernel(const FeedbackArgs& a, const at::Tensor& grad, const at::Tensor& hidden, const Rows& r,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                     at::Tensor& grad_hidden, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = typename acc_type<scalar_t>::type;
  const int64_t d = a.d, n = a.n;
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* in = hidden.data_ptr<scalar_t>();
  scalar_t* gh = grad_hidden.data_ptr<scalar_t>();  // contiguous (B, S, d) or (rows, d)
  const std::vector<acc_t> w = param_values<acc_t>(weight);
  const bool want_w = weight.has_value(), want_b = bias.has_value();

  std::vector<int64_t> key(n), order(n);
  for (int64_t i = 0; i < n; ++i) key[i] = (a.batched ? r.bat[i] : 0) * a.s_len + r.src[i];
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return key[x] < key[y]; });
  std::vector<int64_t> group_start;  // positions in `order` where a new source row begins
  for (int64_t k = 0; k < n; ++k)
    if (k == 0 || key[order[k]] != key[order[k - 1]]) group_start.push_back(k);
  const int64_t n_groups = static_cast<int64_t>(group_start.size());
  group_start.push_back(n);

  // At most 64 blocks of consecutive groups, fixed by n_groups alone.
  const int64_t per_block = (n_groups + 63) / 64;
  const int64_t n_blocks = (n_groups + per_block - 1) / per_block;
  std::vector<acc_t> part_w(want_w ? n_blocks * d : 0), part_b(want_b ? n_blocks * d : 0);

  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<acc_t> x(d), dy(d), dx(d);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      acc_t* pw = want_w ? part_w.data() + blk * d : nullptr;
      acc_t* pb = want_b ? part_b.data() + blk * d : nullptr;
      const int64_t g_end = std::min(n_groups, (blk + 1) * per_block);
      for (int64_t grp = blk * per_block; grp < g_end; ++grp) {
        std::fill(dx.begin(), dx.end(), acc_t(0));
        const int64_t first = order[group_start[grp]];
        const int64_t b = a.batched ? r.bat[first] : 0;
        const scalar_t* xs = in + b * r.h_bs + r.src[first] * r.h_rs;
        acc_t rstd = 0;
        if (a.norm != FeedbackNorm::kNone) {
          for (int64_t j = 0; j < d; ++j) x[j] = static_cast<acc_t>(xs[j]);
          // x_hat is the same for every i of the group (same source row): compute it once.
          rstd = normalise(x.data(), d, a.norm, eps);
        }
        for (int64_t k = group_start[grp]; k < group_start[grp + 1]; ++k) {
          const int64_t i = order[k];
          const scalar_t* gy = g + b * r.e_bs + r.dst[i] * r.e_rs;
          if (a.norm == FeedbackNorm::kNone) {
            for (int64_t j = 0; j < d; ++j) dx[j] += static_cast<acc_t>(gy[j]);
            continue;
          }
          for (int64_t j = 0; j < d; ++j) dy[j] = static_cast<acc_t>(gy[j]);
          if (pw)
            for (int64_t j = 0; j < d; ++j) pw[j] += dy[j] * x[j];
          if (pb)
            for (int64_t j = 0; j < d; ++j) pb[j] += dy[j];
          if (!w.empty())
            for (int64_t j = 0; j < d; ++j) dy[j] *= w[j];  // dy becomes d(loss)/d(x_hat)
          const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
          const acc_t c1 = row_dot(dy.data(), x.data(), d) * inv_d;
          const acc_t c0 = a.norm == FeedbackNorm::kLayerNorm ? row_sum(dy.data(), d) * inv_d : acc_t(0);
          for (int64_t j = 0; j < d; ++j) dx[j] += rstd * (dy[j] - c0 - x[j] * c1);
        }
        scalar_t* out = gh + key[first] * d;
        for (int64_t j = 0; j < d; ++j) out[j] = static_cast<scalar_t>(dx[j]);
      }
    }
  });

  auto reduce = [&](const std::vector<acc_t>& part, at::Tensor& dst) {
    acc_t* o = dst.data_ptr<acc_t>();
    for (int64_t j = 0; j < d; ++j) o[j] = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk)
      for (int64_t j = 0; j < d; ++j) o[j] += part[blk * d + j];
  };
  if (want_w) reduce(part_w, grad_weight);
  if (want_b) reduce(part_b, grad_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_feedback_backward_cpu(
    const at::Tensor& grad_embeds, const at::Tensor& hidden, const std::optional<at::Tensor>& batch_idx,
    const at::Tensor& dst_pos, const at::Tensor& src_pos, c10::string_view norm,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  const FeedbackArgs a = check_feedback_args(grad_embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias,
                                             eps, "grad_embeds");
  check_feedback_indices(a, batch_idx, dst_pos, src_pos);
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto fopt = hidden.options().dtype(acc);
  at::Tensor grad_hidden = at::zeros(hidden.sizes(), hidden.options());
  at::Tensor grad_weight = at::empty({weight.has_value() ? a.d : 0}, fopt);
  at::Tensor grad_bias = at::empty({bias.has_value() ? a.d : 0}, fopt);
  if (a.n == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }
  const at::Tensor g = rows_view(grad_embeds), h = rows_view(hidden);
  const at::Tensor dst = dst_pos.contiguous(), src = src_pos.contiguous();
  const std::optional<at::Tensor> bat = a.batched ? std::optional<at::Tensor>(batch_idx->contiguous()) : std::nullopt;
  const Rows r = make_rows(a, g, h, bat, dst, src);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "latent_feedback_backward", [&] {
    backward_kernel<scalar_t>(a, g, h, r, weight, bias, eps, grad_hidden, grad_weight, grad_bias);
  });
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CPU, m) {
  m.impl("latent_feedback_", &latent_feedback_cpu);
  m.impl("latent_feedback_backward", &latent_feedback_backward_cpu);
}

}  // namespace coconut
