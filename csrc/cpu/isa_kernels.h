// Compiles the kernel header named by COCONUT_KERNELS_HEADER twice, inside namespace avx2 (for AVX2+FMA, by a
// target attribute) and inside namespace base (the baseline ISA), and defines COCONUT_CALL_KERNEL(name, ...) to
// call the copy the CPU runs (checked at run time): the extension is built without -march flags so that one
// build runs on any x86-64. Include it inside the kernel file's own namespace, once per file.

// The baseline copy uses 32-byte GCC vectors in always-inline helpers only, so the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__GNUC__) && defined(__x86_64__)
#define COCONUT_HAVE_AVX2_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include COCONUT_KERNELS_HEADER
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace base {
#include COCONUT_KERNELS_HEADER
}  // namespace base

#ifdef COCONUT_HAVE_AVX2_KERNELS
#define COCONUT_CALL_KERNEL(name, ...) (cpu_has_avx2_fma() ? avx2::name(__VA_ARGS__) : base::name(__VA_ARGS__))
#else
#define COCONUT_CALL_KERNEL(name, ...) base::name(__VA_ARGS__)
#endif
