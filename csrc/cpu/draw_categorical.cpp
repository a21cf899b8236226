// CPU kernel of draw_categorical: one index per row of probs (n, V), the inverse of the row's cumulative sum at
// u[i] times its total mass. torch's route (a float64 cumsum of the whole batch, then searchsorted) writes and
// reads an (n, V) float64 copy: 10-12 ms on a (32, 50257) batch with 2 threads, half a decode step of the suite's
// model. This kernel sums each row in float64 in index order (the partial sums are torch's cumsum's, bit for
// bit), then sums again up to the first partial sum above the target: the same index, nothing written but it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "../common.h"

namespace coconut {
namespace {

constexpr int64_t kElemsPerTask = 1 << 16;  // rows per parallel task: about this many elements
constexpr int64_t kRowsAtOnce = 4;          // rows summed side by side: their sums are independent chains

// Rows [r0, r1) of p (rows of length V); u: each row's uniform in [0, 1).
template <typename T>
void draw_rows(const T* p, const double* u, int64_t* idx, bool* ok, int64_t r0, int64_t r1, int64_t V) {
  for (int64_t r = r0; r < r1; r += kRowsAtOnce) {
    const int64_t k = std::min(kRowsAtOnce, r1 - r);
    double total[kRowsAtOnce] = {0.0, 0.0, 0.0, 0.0};
    // One float64 chain per row, in index order; up to four rows at once, so that the adds' latency overlaps.
    if (k == kRowsAtOnce) {
      const T *a = p + r * V, *b = a + V, *c = b + V, *d = c + V;
      for (int64_t i = 0; i < V; ++i) {
        total[0] += static_cast<double>(a[i]);
        total[1] += static_cast<double>(b[i]);
        total[2] += static_cast<double>(c[i]);
        total[3] += static_cast<double>(d[i]);
      }
    } else {
      for (int64_t j = 0; j < k; ++j)
        for (int64_t i = 0; i < V; ++i) total[j] += static_cast<double>(p[(r + j) * V + i]);
    }
    for (int64_t j = 0; j < k; ++j) {
      const T* row = p + (r + j) * V;
      const double t = total[j];
      ok[r + j] = t > 0.0 && std::isfinite(t);
      // below the row's total, so that rounding cannot carry the target past the last index of positive mass
      const double target = std::fmin(u[r + j] * t, std::nextafter(t, 0.0));
      double c = 0.0;
      int64_t i = 0;
      for (; i < V; ++i) {
        c += static_cast<double>(row[i]);
        if (c > target) break;  // never at an index of zero mass: its partial sum equals the one before
      }
      idx[r + j] = std::min(i, V - 1);  // a NaN row finds no index: in range all the same
    }
  }
}

std::tuple<at::Tensor, at::Tensor> draw_categorical_cpu(const at::Tensor& probs, const at::Tensor& uniforms) {
  COCONUT_CHECK(probs.device().is_cpu(), "probs must be a CPU tensor (draw_categorical is a CPU kernel), got ",
                probs.device());
  COCONUT_CHECK(probs.scalar_type() == at::kFloat || probs.scalar_type() == at::kDouble,
                "probs must be float32 or float64, got ", probs.scalar_type());
  COCONUT_CHECK(probs.dim() == 2 && probs.size(1) > 0, "probs must have shape (n, V) with V >= 1, got shape ",
                probs.sizes());
  const int64_t n = probs.size(0), V = probs.size(1);
  COCONUT_CHECK(uniforms.device().is_cpu() && uniforms.scalar_type() == at::kDouble && uniforms.dim() == 1 &&
                    uniforms.size(0) == n,
                "uniforms must be a float64 CPU tensor of shape (", n, ",): one per row of probs, got ",
                uniforms.scalar_type(), " ", uniforms.sizes(), " on ", uniforms.device());
  const at::Tensor pc = probs.contiguous(), uc = uniforms.contiguous();
  at::Tensor idx = at::empty({n}, probs.options().dtype(at::kLong));
  at::Tensor ok = at::empty({n}, probs.options().dtype(at::kBool));
  const double* up = uc.data_ptr<double>();
  int64_t* ip = idx.data_ptr<int64_t>();
  bool* okp = ok.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(kRowsAtOnce, kElemsPerTask / V);
  AT_DISPATCH_FLOATING_TYPES(pc.scalar_type(), "draw_categorical", [&] {
    const scalar_t* pp = pc.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) { draw_rows(pp, up, ip, okp, r0, r1, V); });
  });
  return {idx, ok};
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CPU, m) { m.impl("draw_categorical", &draw_categorical_cpu); }

}  // namespace coconut
