// CPU kernels of gelu_tanh and gelu_tanh_backward: GPT-2's activation (the tanh approximation, HF's gelu_new)
// and its gradient, elementwise on float32. torch's CPU kernel for approximate="tanh" runs at a fraction of the
// speed of its erf GELU on some builds (README, "GELU on the CPU"); this one is x / (1 + exp(-2u)) on whole
// vectors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "../common.h"

namespace coconut {
namespace {

// The kernels, for AVX-512, AVX2+FMA and the baseline ISA, and COCONUT_CALL_KERNEL to run the one cpu_isa() picks.
#define COCONUT_KERNELS_HEADER "gelu_kernels.h"
#include "isa_kernels.h"

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

void check_input(const at::Tensor& t, const char* name) {
  COCONUT_CHECK(t.device().is_cpu(), name, " must be a CPU tensor (gelu_tanh is a CPU kernel), got ", t.device());
  COCONUT_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

at::Tensor gelu_tanh_cpu(const at::Tensor& x) {
  check_input(x, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    COCONUT_CALL_KERNEL(gelu_tanh_block, xp + i0, yp + i0, i1 - i0);
  });
  return y;
}

at::Tensor gelu_tanh_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x) {
  check_input(grad_out, "grad_out");
  check_input(x, "x");
  COCONUT_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have x's shape ", x.sizes(), ", got ",
                grad_out.sizes());
  const at::Tensor gc = grad_out.contiguous(), xc = x.contiguous();
  at::Tensor dx = at::empty_like(xc);
  const float* gp = gc.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    COCONUT_CALL_KERNEL(gelu_tanh_backward_block, gp + i0, xp + i0, dp + i0, i1 - i0);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CPU, m) {
  m.impl("gelu_tanh", &gelu_tanh_cpu);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward_cpu);
}

}  // namespace coconut
