// The row argmax CPU kernel proper. Compiled once per instruction set by argmax.cpp through isa_kernels.h
// (AVX-512, AVX2+FMA, the baseline ISA; chosen at run time). Included inside a namespace: argmax.cpp includes what
// it uses (<algorithm>, <cstring>) first.

// The kernel's vectors: the copy's width, except in the baseline copy, where GCC lowers comparisons of 32-byte
// vectors (two SSE registers) to scalar code: one SSE register there.
#ifdef COCONUT_BASELINE_ISA
#define COCONUT_ARGMAX_BYTES 16
#else
#define COCONUT_ARGMAX_BYTES COCONUT_VEC_BYTES
#endif

// Index of the first maximum of row x[0, n), n >= 1, with torch.argmax's rules: a NaN is larger than every
// number (the first NaN wins), and ties go to the first index. One pass: each lane keeps its maximum and the
// block where it first saw it (a strict > keeps the first), and a flag records any NaN; the lanes holding the
// overall maximum then give the lowest index. A row with a NaN is scanned again for its first NaN.
template <typename T>
inline int64_t argmax_row(const T* x, int64_t n) {
  typedef T V __attribute__((vector_size(COCONUT_ARGMAX_BYTES)));
  using M = decltype(V{} > V{});  // a lane mask: integers of T's width, here also the block indices
  constexpr int64_t L = sizeof(V) / sizeof(T);
  T m = x[0];
  int64_t best = 0, i = 1;
  bool nan = false;
  if (n >= L) {
    V vm;
    std::memcpy(&vm, x, sizeof(V));
    M vblock = M{}, bad = vm != vm;
    for (i = L; i + L <= n; i += L) {
      V v;
      std::memcpy(&v, x + i, sizeof(V));
      const M gt = v > vm;
      vm = (V)((gt & (M)v) | (~gt & (M)vm));
      vblock = (gt & (M{} + static_cast<decltype(vblock[0] + 0)>(i / L))) | (~gt & vblock);
      bad |= v != v;
    }
    m = vm[0];
    for (int64_t j = 1; j < L; ++j) m = vm[j] > m ? vm[j] : m;
    best = n;
    for (int64_t j = 0; j < L; ++j) {
      nan = nan || bad[j] != 0;
      if (vm[j] == m) best = std::min<int64_t>(best, static_cast<int64_t>(vblock[j]) * L + j);
    }
  } else {
    nan = x[0] != x[0];
  }
  for (; i < n; ++i) {  // the tail after the last whole vector: higher indices, so only a larger value wins
    if (x[i] > m) m = x[i], best = i;
    nan = nan || x[i] != x[i];
  }
  if (nan) {
    for (i = 0; i < n; ++i)
      if (x[i] != x[i]) return i;
  }
  return best;
}

template <typename T>
inline void argmax_rows(const T* x, int64_t* out, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) out[r] = argmax_row(x + r * n, n);
}

#undef COCONUT_ARGMAX_BYTES
