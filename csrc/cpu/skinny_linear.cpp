// CPU kernels of skinny_linear and skinny_linear_input_grad: a linear layer on a few rows (a latent pass or a
// decode step: one row per sequence), where the weight is read once and the rows ride along.
//
// For M <= 16 rows, BLAS packs the weight into panels before multiplying: it reads and writes the whole weight
// to multiply it by a handful of rows, and streams it at a fraction of the memory bandwidth (README, "Skinny
// linear"; benchmarks/RESULTS.md, the skinny_linear tables).
// Here each weight row is read once, in order, straight from memory: an (M x NB) tile of dot products keeps
// one 8-lane fp32 accumulator per output in registers. Every output y[m, n] is summed in the same order
// whatever M and the thread split are (8 lanes over k, the lanes added, the k tail, then the bias), so a row's
// result does not depend on the rows beside it: a batch gives each row what it would get alone.
//
// AVX2 + FMA where the CPU has them (checked at run time), portable C++ otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define COCONUT_X86 1
#endif

#include "../common.h"

namespace coconut {
namespace {

constexpr int64_t kMaxRows = 16;   // the ops' contract; more rows are BLAS's job (they amortise the packing)
constexpr int kLanes = 8;
constexpr int64_t kRowsPerTask = 128;  // weight rows per at::parallel_for task (forward)
constexpr int64_t kColsPerTask = 256;      // weight columns per task (input gradient, one chunk of rows)
constexpr int64_t kGradRowsPerChunk = 128;  // weight rows per partial sum (input gradient)

// ---- portable ----------------------------------------------------------------------------------------------

void forward_rows_portable(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K,
                           int64_t N, int64_t n0, int64_t n1) {
  const int64_t K8 = K - K % kLanes;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float lane[kLanes] = {};
      for (int64_t k = 0; k < K8; k += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] = std::fma(xr[k + l], wr[k + l], lane[l]);
      float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
      for (int64_t k = K8; k < K; ++k) s = std::fma(xr[k], wr[k], s);
      y[m * N + n] = b ? s + b[n] : s;
    }
  }
}

// dx[m, k0:k1] += sum_{n0 <= n < n1} dy[m, n] w[n, k0:k1], n in order (dy's rows ldy apart).
void input_grad_portable(const float* dy, int64_t ldy, const float* w, float* dx, int64_t M, int64_t n0, int64_t n1,
                         int64_t K, int64_t k0, int64_t k1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float d = dy[m * ldy + n];
      float* o = dx + m * K;
      for (int64_t k = k0; k < k1; ++k) o[k] = std::fma(d, wr[k], o[k]);
    }
  }
}

// ---- AVX2 + FMA --------------------------------------------------------------------------------------------

#ifdef COCONUT_X86
#define COCONUT_AVX2 __attribute__((target("avx2,fma")))

// The lanes added as the portable path adds them: (0+4, 2+6), (1+5, 3+7).
COCONUT_AVX2 inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l, l+4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                          // (0+4)+(2+6), (1+5)+(3+7)
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m0 .. m0+MB, n0 .. n0+NB]: MB x NB accumulators, each weight vector loaded once for the MB rows.
template <int MB, int NB>
COCONUT_AVX2 void tile(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t N, int64_t m0,
                       int64_t n0) {
  const int64_t K8 = K - K % kLanes;
  __m256 acc[MB][NB];
  const float* wr[NB];
  const float* xr[MB];
  for (int j = 0; j < NB; ++j) wr[j] = w + (n0 + j) * K;
  for (int i = 0; i < MB; ++i) {
    xr[i] = x + (m0 + i) * K;
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K8; k += kLanes) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm256_loadu_ps(wr[j] + k);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(xr[i] + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = lane_sum(acc[i][j]);
      for (int64_t k = K8; k < K; ++k) s = std::fma(xr[i][k], wr[j][k], s);
      y[(m0 + i) * N + n0 + j] = b ? s + b[n0 + j] : s;
    }
}

// All M rows against weight rows [n0, n0 + NB).
template <int NB>
COCONUT_AVX2 void column_block(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K,
                               int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NB>(x, w, b, y, K, N, m, n0);
  switch (M - m) {
    case 3: tile<3, NB>(x, w, b, y, K, N, m, n0); break;
    case 2: tile<2, NB>(x, w, b, y, K, N, m, n0); break;
    case 1: tile<1, NB>(x, w, b, y, K, N, m, n0); break;
    default: break;
  }
}

COCONUT_AVX2 void forward_rows_avx2(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K,
                                    int64_t N, int64_t n0, int64_t n1) {
  // One or two rows: four weight rows at a time (enough independent FMA chains); more rows: two at a time
  // (4 x 2 accumulators, the weight vectors and an input vector fill the 16 registers).
  int64_t n = n0;
  if (M <= 2) {
    for (; n + 4 <= n1; n += 4) column_block<4>(x, w, b, y, M, K, N, n);
  } else {
    for (; n + 2 <= n1; n += 2) column_block<2>(x, w, b, y, M, K, N, n);
  }
  for (; n < n1; ++n) column_block<1>(x, w, b, y, M, K, N, n);
}

// dx[m, k0:k1] += sum_{n0 <= n < n1} dy[m, n] w[n, k0:k1], the weight rows four at a time in order (then one at
// a time).
COCONUT_AVX2 void input_grad_avx2(const float* dy, int64_t ldy, const float* w, float* dx, int64_t M, int64_t n0,
                                  int64_t n1, int64_t K, int64_t k0, int64_t k1) {
  const int64_t kv1 = k0 + (k1 - k0) / kLanes * kLanes;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = w + n * K;
    const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    for (int64_t m = 0; m < M; ++m) {
      const float* d = dy + m * ldy + n;
      const __m256 d0 = _mm256_set1_ps(d[0]), d1 = _mm256_set1_ps(d[1]), d2 = _mm256_set1_ps(d[2]),
                   d3 = _mm256_set1_ps(d[3]);
      float* o = dx + m * K;
      for (int64_t k = k0; k < kv1; k += kLanes) {
        __m256 a = _mm256_loadu_ps(o + k);
        a = _mm256_fmadd_ps(d0, _mm256_loadu_ps(w0 + k), a);
        a = _mm256_fmadd_ps(d1, _mm256_loadu_ps(w1 + k), a);
        a = _mm256_fmadd_ps(d2, _mm256_loadu_ps(w2 + k), a);
        a = _mm256_fmadd_ps(d3, _mm256_loadu_ps(w3 + k), a);
        _mm256_storeu_ps(o + k, a);
      }
      for (int64_t k = kv1; k < k1; ++k) {
        float a = o[k];
        a = std::fma(d[0], w0[k], a);
        a = std::fma(d[1], w1[k], a);
        a = std::fma(d[2], w2[k], a);
        a = std::fma(d[3], w3[k], a);
        o[k] = a;
      }
    }
  }
  input_grad_portable(dy, ldy, w, dx, M, n, n1, K, k0, k1);
}

bool have_avx2() { return cpu_isa() >= CpuIsa::avx2; }
#endif  // COCONUT_X86

void check_operand(const at::Tensor& t, const char* name, int64_t rank) {
  COCONUT_CHECK(t.device().is_cpu(), name, " must be a CPU tensor (skinny_linear is a CPU kernel), got ",
                t.device());
  COCONUT_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  COCONUT_CHECK(t.dim() == rank, name, " must be ", rank, "-D, got shape ", t.sizes());
  COCONUT_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_rows(int64_t M, const char* name) {
  COCONUT_CHECK(M <= kMaxRows, name, " has ", M, " rows; skinny_linear takes at most ", kMaxRows,
                " (use F.linear: BLAS is the faster one there)");
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_operand(x, "x", 2);
  check_operand(weight, "weight", 2);
  check_rows(x.size(0), "x");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  COCONUT_CHECK(weight.size(1) == K, "weight must be (N, ", K, ") for x of shape ", x.sizes(), ", got ",
                weight.sizes());
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_operand(*bias, "bias", 1);
    COCONUT_CHECK(bias->size(0) == N, "bias must have shape (", N, ",), got ", bias->sizes());
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, kRowsPerTask, [&](int64_t n0, int64_t n1) {
#ifdef COCONUT_X86
    if (have_avx2()) return forward_rows_avx2(xp, wp, bp, yp, M, K, N, n0, n1);
#endif
    forward_rows_portable(xp, wp, bp, yp, M, K, N, n0, n1);
  });
  return y;
}

void input_grad_rows(const float* dy, int64_t ldy, const float* w, float* dx, int64_t M, int64_t n0, int64_t n1,
                     int64_t K, int64_t k0, int64_t k1) {
#ifdef COCONUT_X86
  if (have_avx2()) return input_grad_avx2(dy, ldy, w, dx, M, n0, n1, K, k0, k1);
#endif
  input_grad_portable(dy, ldy, w, dx, M, n0, n1, K, k0, k1);
}

at::Tensor skinny_linear_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight) {
  check_operand(grad_out, "grad_out", 2);
  check_operand(weight, "weight", 2);
  check_rows(grad_out.size(0), "grad_out");
  const int64_t M = grad_out.size(0), N = grad_out.size(1), K = weight.size(1);
  COCONUT_CHECK(weight.size(0) == N, "weight must be (", N, ", K) for grad_out of shape ", grad_out.sizes(),
                ", got ", weight.sizes());
  if (M == 0 || K == 0 || N == 0) return at::zeros({M, K}, grad_out.options());
  const float* dp = grad_out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  // The weight rows in fixed chunks (not one per thread): each chunk streams its rows whole into its own partial
  // sum, and the partials are added in chunk order, so every dx[m, k] is the same sum whatever M and the
  // thread count. One chunk: straight into dx, the columns split across threads.
  const int64_t chunks = (N + kGradRowsPerChunk - 1) / kGradRowsPerChunk;
  if (chunks == 1) {
    auto dx = at::zeros({M, K}, grad_out.options());  // the kernel adds into it
    float* op = dx.data_ptr<float>();
    at::parallel_for(0, K, kColsPerTask, [&](int64_t k0, int64_t k1) {
      input_grad_rows(dp, N, wp, op, M, 0, N, K, k0, k1);
    });
    return dx;
  }
  auto dx = at::empty({M, K}, grad_out.options());  // written whole by the ordered sum below
  float* op = dx.data_ptr<float>();
  auto partial = at::zeros({chunks, M, K}, grad_out.options());
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      input_grad_rows(dp, N, wp, pp + c * M * K, M, c * kGradRowsPerChunk, std::min(N, (c + 1) * kGradRowsPerChunk),
                      K, 0, K);
  });
  at::parallel_for(0, M * K, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float s = pp[i];
      for (int64_t c = 1; c < chunks; ++c) s += pp[c * M * K + i];
      op[i] = s;
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CPU, m) {
  m.impl("skinny_linear", &skinny_linear_cpu);
  m.impl("skinny_linear_input_grad", &skinny_linear_input_grad_cpu);
}

}  // namespace coconut
