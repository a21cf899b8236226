// Vector helpers of the CPU kernels: GCC vectors of COCONUT_VEC_BYTES bytes, their loads and stores, and exp on a
// float or on each lane of a float vector. Included inside each ISA namespace of a kernel file (isa_kernels.h:
// one copy for AVX-512, one for AVX2+FMA, one for the baseline ISA), so it has neither an include guard nor a
// namespace of its own.

// COCONUT_VEC_BYTES-byte vectors (GCC vector extensions): one register of the ISA the copy is compiled for (64:
// AVX-512, 32: AVX2); two SSE registers in the baseline build (32).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(COCONUT_VEC_BYTES)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(COCONUT_VEC_BYTES)));
};

template <typename T>
__attribute__((always_inline)) inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
__attribute__((always_inline)) inline void vstore(T* p, const typename Vec<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

// 2^k for integral k in [-126, 127], as a float of that exponent (scalar, or every lane of a vector).
__attribute__((always_inline)) inline float exp2_int(float k) {
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename V>
__attribute__((always_inline)) inline V exp2_int(const V& k) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  return reinterpret_cast<V>((__builtin_convertvector(k, VI) + 127) << 23);
}

// exp(x) of a float or of each lane of a float vector: a branch-free polynomial (relative error ~2e-7,
// exp(x) = 0 below -87).
template <typename V>
__attribute__((always_inline)) inline V exp_poly(const V& x) {
  constexpr float lo = -87.3f, hi = 88.3f, magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V v = x < lo ? V{} + lo : x;
  v = v > hi ? V{} + hi : v;
  const V k = (v * 1.44269504088896341f + magic) - magic;  // round(v / ln 2), ties to even
  const V r = (v - k * 0.693359375f) + k * 2.12194440e-4f;  // v - k ln2, ln2 split in two parts
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return x < lo ? V{} : p * exp2_int(k);
}
