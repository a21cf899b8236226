// CPU kernel of argmax_last: the index of each row's maximum along the last dimension, as torch.argmax(x, -1)
// gives it. aten's CPU argmax takes ~2 ms on a (32, 50257) float32 logits batch with 2 threads, ten times what
// reading the batch once costs (its amax); greedy decoding takes one per step (README, "Greedy argmax on the CPU").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common.h"

namespace coconut {
namespace {

// The kernel, for AVX-512, AVX2+FMA and the baseline ISA, and COCONUT_CALL_KERNEL to run the one cpu_isa() picks.
#define COCONUT_KERNELS_HEADER "argmax_kernels.h"
#include "isa_kernels.h"

constexpr int64_t kElemsPerTask = 1 << 16;  // rows per parallel task: about this many elements

at::Tensor argmax_last_cpu(const at::Tensor& x) {
  COCONUT_CHECK(x.device().is_cpu(), "x must be a CPU tensor (argmax_last is a CPU kernel), got ", x.device());
  COCONUT_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64, got ",
                x.scalar_type());
  COCONUT_CHECK(x.dim() >= 1, "x must have at least one dimension (the one reduced), got a 0-D tensor");
  const int64_t n = x.size(-1);
  COCONUT_CHECK(n > 0, "x's last dimension must not be empty (argmax of no elements), got shape ", x.sizes());
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / n;
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kElemsPerTask / n);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "argmax_last", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      COCONUT_CALL_KERNEL(argmax_rows<scalar_t>, xp, op, r0, r1, n);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CPU, m) { m.impl("argmax_last", &argmax_last_cpu); }

}  // namespace coconut
