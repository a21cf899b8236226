// The gelu_tanh CPU kernels proper. Compiled once per instruction set by gelu.cpp through isa_kernels.h (AVX-512,
// AVX2+FMA, the baseline ISA; chosen at run time).

#include "vec_math.h"

// gelu(x) = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x s with s = (1 + tanh u) / 2 =
// 1 / (1 + exp(-2u)): no cancellation at either end (1 + tanh u near -1 would lose the relative precision of
// the small negative outputs). Below u = -40 exp would saturate: the output is x * 0 there (-0, NaN at -inf, as
// aten gives).
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kLowU = -40.0f;

template <typename V>
__attribute__((always_inline)) inline V gelu_tanh_value(const V& x) {
  const V u = kSqrt2OverPi * (x + kCubic * x * x * x);
  const V s = 1.0f / (1.0f + exp_poly(-2.0f * u));
  return u < kLowU ? x * 0.0f : x * s;
}

// d gelu / dx = (1 + t) / 2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2) with t = tanh u, i.e.
// s + 2 x e s^2 sqrt(2/pi) (1 + 3 0.044715 x^2) with e = exp(-2u) (1 - s = e s), times the incoming gradient.
template <typename V>
__attribute__((always_inline)) inline V gelu_tanh_grad(const V& g, const V& x) {
  const V x2 = x * x;
  const V u = kSqrt2OverPi * (x + kCubic * x2 * x);
  const V e = exp_poly(-2.0f * u);
  const V s = 1.0f / (1.0f + e);
  const V d = s + 2.0f * x * e * s * s * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x2);
  return g * (u < kLowU ? x * 0.0f : d);
}

inline void gelu_tanh_block(const float* x, float* y, int64_t n) {
  using V = Vec<float>::type;
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(y + i, gelu_tanh_value(vload(x + i)));
  for (; i < n; ++i) y[i] = gelu_tanh_value(x[i]);
}

inline void gelu_tanh_backward_block(const float* g, const float* x, float* dx, int64_t n) {
  using V = Vec<float>::type;
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(dx + i, gelu_tanh_grad(vload(g + i), vload(x + i)));
  for (; i < n; ++i) dx[i] = gelu_tanh_grad(g[i], x[i]);
}
