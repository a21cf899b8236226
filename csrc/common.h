// Helpers shared by the CPU and CUDA kernels: argument checks that name the argument, and the
// fp32 accumulation type of each storage dtype.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace coconut {

// All checks raise c10::ValueError (Python ValueError) with the argument's name in the message.
#define COCONUT_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  COCONUT_CHECK(t.dim() == rank, name, " must be ", rank, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  COCONUT_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device (", ref.device(),
                "), got ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  COCONUT_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype (",
                ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  COCONUT_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
                " must be float32, float16, bfloat16 or float64, got ", s);
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  COCONUT_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                " must be int32 or int64, got ", t.scalar_type());
}

// Environment switch COCONUT_DEBUG=1: validate device-side values (indices, lengths) on CUDA
// tensors too, at the price of a host sync. CPU tensors are always validated.
bool debug_checks();

// The instruction sets the CPU kernels have fast paths for. They are compiled for each with a target attribute
// (cpu/isa_kernels.h) and chosen at run time, so one build runs on any x86-64.
enum class CpuIsa : int { base = 0, avx2 = 1, avx512 = 2 };

// The best the CPU supports: avx512 (F, DQ, BW, VL), avx2 (AVX2 + FMA) or base.
CpuIsa cpu_isa_supported();

// The one the kernels run: the supported one, capped by the environment variable COCONUT_CPU_ISA (base | avx2 |
// avx512, read once) or by set_cpu_isa_cap (the op coconut::_cpu_isa; tests run every copy that way).
CpuIsa cpu_isa();

// Caps cpu_isa() at `cap` (never above what the CPU supports).
void set_cpu_isa_cap(CpuIsa cap);

// The op coconut::_cpu_isa(isa=""): caps the instruction set at `isa` when given; returns the one that runs.
std::string cpu_isa_op(std::string isa);

template <typename T>
struct acc_type { using type = float; };
template <>
struct acc_type<double> { using type = double; };

}  // namespace coconut
