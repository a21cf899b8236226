// Compiles the kernel header named by COCONUT_KERNELS_HEADER three times: inside namespace avx512 (AVX-512, by a
// target attribute, 64-byte vectors), namespace avx2 (AVX2+FMA, 32-byte vectors) and namespace base (the baseline
// ISA), and defines COCONUT_CALL_KERNEL(name, ...) to call the copy of the ISA that cpu_isa() selects at run time:
// the extension is built without -march flags so that one build runs on any x86-64. Include it inside the kernel
// file's own namespace, once per file.

// The baseline and AVX-512 copies pass GCC vectors wider than their default ABI only to always-inline helpers, so
// the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__GNUC__) && defined(__x86_64__)
#define COCONUT_HAVE_X86_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define COCONUT_VEC_BYTES 64
namespace avx512 {
#include COCONUT_KERNELS_HEADER
}  // namespace avx512
#undef COCONUT_VEC_BYTES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define COCONUT_VEC_BYTES 32
namespace avx2 {
#include COCONUT_KERNELS_HEADER
}  // namespace avx2
#undef COCONUT_VEC_BYTES
#pragma GCC pop_options
#endif

#define COCONUT_VEC_BYTES 32
#define COCONUT_BASELINE_ISA 1  // a kernel may narrow its vectors here (GCC lowers some 32-byte ops to scalars)
namespace base {
#include COCONUT_KERNELS_HEADER
}  // namespace base
#undef COCONUT_BASELINE_ISA
#undef COCONUT_VEC_BYTES

#ifdef COCONUT_HAVE_X86_KERNELS
#define COCONUT_CALL_KERNEL(name, ...)                                                              \
  (cpu_isa() == CpuIsa::avx512 ? avx512::name(__VA_ARGS__)                                          \
                               : cpu_isa() == CpuIsa::avx2 ? avx2::name(__VA_ARGS__) : base::name(__VA_ARGS__))
#else
#define COCONUT_CALL_KERNEL(name, ...) base::name(__VA_ARGS__)
#endif
