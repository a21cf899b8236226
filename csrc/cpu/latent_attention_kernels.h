// The latent_attention CPU kernels proper. Compiled once per instruction set by latent_attention.cpp through
// isa_kernels.h (AVX-512, AVX2+FMA, the baseline ISA; chosen at run time). Relies on the includes and types of
// that file.

#include "vec_math.h"

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
inline void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

constexpr int64_t kNR = 2 * COCONUT_VEC_BYTES / sizeof(float);  // columns of the gemm tile (two float vectors)
constexpr int kMR = COCONUT_VEC_BYTES == 64 ? 12 : 6;  // rows of the gemm tile (see gemm_tile)

// y[j] = exp(x[j]) for a block. fp32: exp_poly on whole vectors (GCC does not vectorise the scalar loop: the
// selects count as control flow under its default -ftrapping-math), the tail scalar; fp64 keeps std::exp (fp64
// is for exact gradient checks).
inline void exp_block(float* y, const float* x, int64_t n) {
  using V = Vec<float>::type;
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t j = 0;
  for (; j + L <= n; j += L) vstore(y + j, exp_poly(vload(x + j)));
  for (; j < n; ++j) y[j] = exp_poly(x[j]);
}

inline void exp_block(double* y, const double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = std::exp(x[j]);
}

// Rotation of the first rotary_dim dims of x at `pos`; sign = -1 applies the transposed rotation (the
// gradient w.r.t. the un-rotated input).
template <typename acc_t>
inline void rotate(const Rotary<acc_t>& r, acc_t* x, int64_t pos, acc_t sign) {
  if (r.half == 0) return;
  pos = std::min(std::max<int64_t>(pos, 0), r.n_pos - 1);  // positions of never-attended pad rows
  const acc_t* c = r.cos + pos * r.half;
  const acc_t* s = r.sin + pos * r.half;
  for (int64_t i = 0; i < r.half; ++i) {
    const int64_t i1 = r.interleaved ? 2 * i : i;
    const int64_t i2 = r.interleaved ? 2 * i + 1 : i + r.half;
    const acc_t x1 = x[i1], x2 = x[i2], sn = sign * s[i];
    x[i1] = x1 * c[i] - x2 * sn;
    x[i2] = x2 * c[i] + x1 * sn;
  }
}

// C (M x N) = A (M x K) . B (K x N), or += with accumulate; row-major with leading dimensions. N must be a
// multiple of kNR and B/C hold that many columns (callers pad their buffers). A tile of MR rows x 2 vectors
// lives in 2 MR vector registers: each step broadcasts MR values of A and loads 2 vectors of B for 2 MR FMAs.
// MR = 6 keeps 12 accumulators in flight (two FMA pipes of latency 4 need at least 8) within AVX2's 16
// registers, as BLIS's Haswell kernel does; the AVX-512 copy's MR = 12 keeps 24 within its 32 (kMR). (GCC vector
// extensions; the loops over rows are fully unrolled.)
// kTransA: A is given transposed, as A^T (K x M) with leading dimension lda (element (i, k) at A[k * lda + i]),
// so that a product with a transposed operand needs no transposed copy.
template <int MR, typename T>
__attribute__((always_inline)) inline void gemm_tile(T* c, int64_t ldc, const T* a, int64_t row_step,
                                                     int64_t k_step, const T* B, int64_t ldb, int64_t K,
                                                     bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);  // lanes
  V acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = accumulate ? vload(c + r * ldc) : V{};
    acc[r][1] = accumulate ? vload(c + r * ldc + L) : V{};
  }
  for (int64_t k = 0; k < K; ++k, a += k_step) {
    const V b0 = vload(B + k * ldb), b1 = vload(B + k * ldb + L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T ar = a[r * row_step];
      acc[r][0] += ar * b0;
      acc[r][1] += ar * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    vstore(c + r * ldc, acc[r][0]);
    vstore(c + r * ldc + L, acc[r][1]);
  }
}

// The last R < kMR rows of a gemm (R = M mod kMR): gemm_tile<R>, chosen by a compile-time descent.
template <int R, typename T>
__attribute__((always_inline)) inline void gemm_rows_tail(int64_t rows, T* c, int64_t ldc, const T* a,
                                                          int64_t row_step, int64_t k_step, const T* B, int64_t ldb,
                                                          int64_t K, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) return gemm_tile<R>(c, ldc, a, row_step, k_step, B, ldb, K, accumulate);
    gemm_rows_tail<R - 1>(rows, c, ldc, a, row_step, k_step, B, ldb, K, accumulate);
  }
}

template <typename T, bool kTransA = false>
inline void gemm(T* C, int64_t ldc, const T* A, int64_t lda, const T* B, int64_t ldb, int64_t M, int64_t N,
                 int64_t K, bool accumulate) {
  constexpr int64_t L = sizeof(typename Vec<T>::type) / sizeof(T);
  const int64_t row_step = kTransA ? 1 : lda, k_step = kTransA ? lda : 1;  // strides of A's (i, k)
  for (int64_t j0 = 0; j0 < N; j0 += 2 * L) {
    int64_t i0 = 0;
    for (; i0 + kMR <= M; i0 += kMR)
      gemm_tile<kMR>(C + i0 * ldc + j0, ldc, A + i0 * row_step, row_step, k_step, B + j0, ldb, K, accumulate);
    gemm_rows_tail<kMR - 1>(M - i0, C + i0 * ldc + j0, ldc, A + i0 * row_step, row_step, k_step, B + j0, ldb, K,
                            accumulate);
  }
}

// s[j] = q . K[j] for j < n (rows `stride` apart), four rows at a time so that four independent accumulator
// chains hide the FMA latency: the path for one or two query rows (decode), where a block product would spend
// its time transposing K.
template <typename T>
inline void dot_rows(T* s, const T* q, const T* K, int64_t stride, int64_t n, int64_t D) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T *k0 = K + j * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      s0 += q[d] * k0[d];
      s1 += q[d] * k1[d];
      s2 += q[d] * k2[d];
      s3 += q[d] * k3[d];
    }
    s[j] = s0;
    s[j + 1] = s1;
    s[j + 2] = s2;
    s[j + 3] = s3;
  }
  for (; j < n; ++j) s[j] = dot(q, K + j * stride, D);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Ask for rows [0, n) of a row-strided block, D elements each, to be brought into the cache.
template <typename T>
inline void prefetch_rows(const T* base, int64_t stride, int64_t n, int64_t D) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D * (int64_t)sizeof(T); d += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(base + j * stride) + d);
}

// Rows [0, n) of a row-strided cache block as acc_t rows: the cache itself when no conversion is needed,
// else converted into buf (ld = D).
template <typename scalar_t, typename acc_t>
inline const acc_t* row_view(const scalar_t* base, int64_t stride, int64_t n, int64_t D, acc_t* buf,
                             int64_t& out_stride) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    out_stride = stride;
    return base;
  } else {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = static_cast<acc_t>(base[j * stride + d]);
    out_stride = D;
    return buf;
  }
}

// cols[d * ldc + j] = row j's element d for rows [0, n) of a row-strided cache block, as acc_t.
template <typename scalar_t, typename acc_t>
inline void transpose_rows(const scalar_t* base, int64_t stride, int64_t n, int64_t D, acc_t* cols, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* src = base + j * stride;
    for (int64_t d = 0; d < D; ++d) cols[d * ldc + j] = static_cast<acc_t>(src[d]);
  }
}

// Rows [0, n) of a row-strided cache block as acc_t, into `rows` (ld = Dp, columns D..Dp zero) and/or its
// transpose `cols` (D x kKeyBlock, columns n..round_up(n, kNR) zero).
template <typename scalar_t, typename acc_t>
inline void load_block(const scalar_t* base, int64_t stride, int64_t n, int64_t D, int64_t Dp, acc_t* rows,
                       acc_t* cols) {
  if (rows != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t d = 0; d < D; ++d) rows[j * Dp + d] = static_cast<acc_t>(base[j * stride + d]);
      for (int64_t d = D; d < Dp; ++d) rows[j * Dp + d] = 0;
    }
  }
  if (cols != nullptr) {
    transpose_rows(base, stride, n, D, cols, kKeyBlock);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = n; j < round_up(n, kNR); ++j) cols[d * kKeyBlock + j] = 0;
  }
}

// ---- append ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void append_kernel(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                   const Lengths& len, const Rotary<typename acc_type<scalar_t>::type>& rot) {
  using acc_t = typename acc_type<scalar_t>::type;
  const int64_t B = k_new.size(0), Sq = k_new.size(1), H = k_new.size(2), D = k_new.size(3);
  const int64_t Tmax = k_cache.size(1);
  scalar_t* kc = k_cache.data_ptr<scalar_t>();
  scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const scalar_t* kn = k_new.data_ptr<scalar_t>();
  const scalar_t* vn = v_new.data_ptr<scalar_t>();
  const auto ks = k_cache.strides(), vs = v_cache.strides();
  at::parallel_for(0, B * Sq, grain_for(H * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Sq, t = i % Sq;
      const int64_t row = len.seqlen(b) + t;
      if (t >= len.nnew(b) || row < 0 || row >= Tmax) continue;  // never write outside the cache
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* ksrc = kn + ((i * H) + h) * D;
        const scalar_t* vsrc = vn + ((i * H) + h) * D;
        scalar_t* kdst = kc + b * ks[0] + row * ks[1] + h * ks[2];
        scalar_t* vdst = vc + b * vs[0] + row * vs[1] + h * vs[2];
        if (rot.half > 0) {
          for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<acc_t>(ksrc[d]);
          rotate(rot, buf.data(), row - len.lpad(b), acc_t(1));
          for (int64_t d = 0; d < D; ++d) kdst[d] = static_cast<scalar_t>(buf[d]);
        } else {
          std::copy(ksrc, ksrc + D, kdst);
        }
        std::copy(vsrc, vsrc + D, vdst);
      }
    }
  });
}

// One key block of an online softmax: s[0, n) := exp(s - m_new) in place, the running max m and sum l updated,
// the output row o (o_len long) rescaled to the new max.
template <typename acc_t>
inline void online_softmax_block(acc_t* s, int64_t n, acc_t& m, acc_t& l, acc_t* o, int64_t o_len) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  // max and sum lane-wise, then across the lanes (a scalar reduction is not vectorised without -ffast-math)
  V vm = V{} + m;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V x = vload(s + j);
    vm = x > vm ? x : vm;
  }
  acc_t mb = m;
  for (int64_t i = 0; i < L; ++i) mb = std::max(mb, vm[i]);
  for (; j < n; ++j) mb = std::max(mb, s[j]);
  const acc_t alpha = std::exp(m - mb);  // 0 on the first block (m = -inf)
  for (j = 0; j < n; ++j) s[j] -= mb;
  exp_block(s, s, n);
  V vs{};
  for (j = 0; j + L <= n; j += L) vs += vload(s + j);
  acc_t sum = 0;
  for (int64_t i = 0; i < L; ++i) sum += vs[i];
  for (; j < n; ++j) sum += s[j];
  l = l * alpha + sum;
  m = mb;
  if (alpha != acc_t(1))
    for (int64_t d = 0; d < o_len; ++d) o[d] *= alpha;
}

// dst = o / l and lse = m + log l; a row that saw no key (l = 0) gets zeros and lse = -inf.
template <typename scalar_t, typename acc_t>
inline void finish_row(scalar_t* dst, const acc_t* o, int64_t D, acc_t m, acc_t l, acc_t* lse) {
  if (l > 0) {
    const acc_t inv = acc_t(1) / l;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
    *lse = m + std::log(l);
  } else {
    std::fill_n(dst, D, scalar_t(0));
    *lse = -std::numeric_limits<acc_t>::infinity();
  }
}

// ---- forward ----------------------------------------------------------------------------------------------

// The data of a forward call (fwd_kernel and decode_kernel).
template <typename scalar_t>
struct FwdPointers {
  using acc_t = typename acc_type<scalar_t>::type;
  const scalar_t *q, *k, *v;
  scalar_t* out;
  acc_t* lse;
  at::IntArrayRef ks, vs;  // cache strides
  acc_t scale, neg_inf;
  FwdPointers(const at::Tensor& q_, const at::Tensor& kc, const at::Tensor& vc, at::Tensor& o, at::Tensor& l,
              double softmax_scale)
      : q(q_.data_ptr<scalar_t>()), k(kc.data_ptr<scalar_t>()), v(vc.data_ptr<scalar_t>()),
        out(o.data_ptr<scalar_t>()), lse(l.data_ptr<acc_t>()), ks(kc.strides()), vs(vc.strides()),
        scale(static_cast<acc_t>(softmax_scale)), neg_inf(-std::numeric_limits<acc_t>::infinity()) {}
};

// One task = (sequence, kv head, chunk of query positions); its M = positions x group rows share each key
// block: S = Q K^T and O += P V run as register-tiled block products.
template <typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out,
                at::Tensor& lse, const Lengths& len, const Rotary<typename acc_type<scalar_t>::type>& rot,
                double softmax_scale, bool causal, const Dropout& drop) {
  using acc_t = typename acc_type<scalar_t>::type;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), G = Hq / Hkv, Dp = round_up(D, kNR), Tmax = k_cache.size(1);
  const int64_t n_chunks = (Sq + kQueryChunk - 1) / kQueryChunk;
  const FwdPointers<scalar_t> P(q, k_cache, v_cache, out, lse, softmax_scale);
  const scalar_t *qp = P.q, *kc = P.k, *vc = P.v;
  scalar_t* op = P.out;
  acc_t* lp = P.lse;
  const auto ks = P.ks, vs = P.vs;
  const acc_t scale = P.scale, neg_inf = P.neg_inf;

  // K^T of a (sequence, kv head) is made once for all its query chunks (a thread takes them in order), in
  // columns [0, ldt) for the cache rows from its left pad on.
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b)
    max_keys = std::max(max_keys, std::min(len.seqlen(b) + len.nnew(b), Tmax) - len.lpad(b));
  const int64_t ldt = round_up(std::max<int64_t>(max_keys, 1), kNR);

  const int64_t work = G * std::min(Sq, kQueryChunk) * mean_keys(len, B) * D;
  at::parallel_for(0, B * Hkv * n_chunks, grain_for(work), [&](int64_t begin, int64_t end) {
    const int64_t M_max = G * kQueryChunk;
    std::vector<acc_t> Q(M_max * Dp), O(M_max * Dp), S(M_max * kKeyBlock), m(M_max), l(M_max);
    std::vector<acc_t> Kr_buf(kKeyBlock * D), Vb(kKeyBlock * Dp), Kt, f(drop.on() ? kKeyBlock : 0);
    std::vector<int64_t> hi(M_max);
    int64_t kt_task = -1, kt_end = 0;  // Kt holds the (b, g) = kt_task's transposed rows [lo, kt_end)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % n_chunks, g = (task / n_chunks) % Hkv, b = task / (n_chunks * Hkv);
      const int64_t seqlen = len.seqlen(b), lo = len.lpad(b), n_new = len.nnew(b);
      const int64_t t0 = c * kQueryChunk, t1 = std::min({Sq, t0 + kQueryChunk, n_new});
      // out/lse are allocated uninitialised: rows past new_seqlens get out = 0, lse = -inf here.
      for (int64_t t = std::max(t0, t1); t < std::min(Sq, t0 + kQueryChunk); ++t) {
        for (int64_t hg = 0; hg < G; ++hg) {
          std::fill_n(op + ((b * Sq + t) * Hq + g * G + hg) * D, D, scalar_t(0));
          lp[(b * Hq + g * G + hg) * Sq + t] = neg_inf;
        }
      }
      if (t0 >= t1) continue;
      // Row i = (t - t0) * G + head-in-group: the queries of one position share their key range.
      const int64_t M = (t1 - t0) * G;
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t hg = 0; hg < G; ++hg) {
          const int64_t i = (t - t0) * G + hg;
          const scalar_t* src = qp + ((b * Sq + t) * Hq + g * G + hg) * D;
          acc_t* dst = Q.data() + i * Dp;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
          rotate(rot, dst, seqlen + t - lo, acc_t(1));
          for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
          for (int64_t d = D; d < Dp; ++d) dst[d] = 0;
          hi[i] = causal ? seqlen + t : seqlen + n_new - 1;  // last row this query sees
          m[i] = neg_inf;
          l[i] = 0;
        }
      }
      std::fill(O.begin(), O.begin() + M * Dp, acc_t(0));
      const int64_t kv_end = std::min(hi[M - 1] + 1, k_cache.size(1));
      const bool few_rows = M < 4;  // decode: row-wise products straight from the cache rows
      if (!few_rows && kv_end > lo) {
        if (kt_task != b * Hkv + g) {
          kt_task = b * Hkv + g;
          kt_end = lo;
        }
        if (kt_end < kv_end) {  // transpose the rows this chunk adds; zero the columns up to a multiple of kNR
          Kt.resize(D * ldt);
          transpose_rows(kc + b * ks[0] + kt_end * ks[1] + g * ks[2], ks[1], kv_end - kt_end, D,
                         Kt.data() + (kt_end - lo), ldt);
          for (int64_t d = 0; d < D; ++d)
            for (int64_t j = kv_end - lo; j < round_up(kv_end - lo, kNR); ++j) Kt[d * ldt + j] = 0;
          kt_end = kv_end;
        }
      }
      for (int64_t k0 = lo; k0 < kv_end; k0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, kv_end - k0), np = round_up(nk, kNR);
        const scalar_t* kblock = kc + b * ks[0] + k0 * ks[1] + g * ks[2];
        const scalar_t* vblock = vc + b * vs[0] + k0 * vs[1] + g * vs[2];
        int64_t vst = Dp;
        const acc_t* Vr = Vb.data();
        // The next block's rows: D-long pieces Hkv * D apart, which the hardware prefetcher misses.
        if (k0 + kKeyBlock < kv_end) {
          const int64_t n_next = std::min(kKeyBlock, kv_end - k0 - kKeyBlock);
          if (few_rows) prefetch_rows(kblock + kKeyBlock * ks[1], ks[1], n_next, D);
          prefetch_rows(vblock + kKeyBlock * vs[1], vs[1], n_next, D);
        }
        // V rows in place (fp32 with D a multiple of kNR), else as acc_t rows: padded to Dp for the block product
        if (few_rows || D == Dp)
          Vr = row_view(vblock, vs[1], nk, D, Vb.data(), vst);
        else
          load_block(vblock, vs[1], nk, D, Dp, Vb.data(), (acc_t*)nullptr);
        if (few_rows) {
          int64_t kst = 0;
          const acc_t* Kr = row_view(kblock, ks[1], nk, D, Kr_buf.data(), kst);
          for (int64_t i = 0; i < M; ++i)
            dot_rows(S.data() + i * kKeyBlock, Q.data() + i * Dp, Kr, kst, nk, D);
        } else {
          gemm(S.data(), kKeyBlock, Q.data(), Dp, Kt.data() + (k0 - lo), ldt, M, np, D, false);
        }
        for (int64_t i = 0; i < M; ++i) {
          acc_t* si = S.data() + i * kKeyBlock;
          const int64_t nj = std::max<int64_t>(0, std::min(nk, hi[i] + 1 - k0));
          if (nj > 0) online_softmax_block(si, nj, m[i], l[i], O.data() + i * Dp, Dp);
          if (nj > 0 && drop.on()) {  // l keeps the whole sum: only the values' weights are dropped
            const int64_t t = t0 + i / G, h = g * G + i % G;
            drop.factors(f.data(), nj, ((b * Hq + h) * Sq + t) * Tmax + k0);
            for (int64_t j = 0; j < nj; ++j) si[j] *= f[j];
          }
          for (int64_t j = nj; j < nk; ++j) si[j] = 0;  // masked keys
        }
        if (few_rows && D != Dp) {
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < nk; ++j) axpy(O.data() + i * Dp, S[i * kKeyBlock + j], Vr + j * vst, D);
        } else {  // O rows stay in registers across the block
          gemm(O.data(), Dp, S.data(), kKeyBlock, Vr, vst, M, Dp, nk, true);
        }
      }
      for (int64_t i = 0; i < M; ++i) {
        const int64_t t = t0 + i / G, h = g * G + i % G;
        // l = 0: no key in range (a pad query of a left-padded pass)
        finish_row(op + ((b * Sq + t) * Hq + h) * D, O.data() + i * Dp, D, m[i], l[i], lp + (b * Hq + h) * Sq + t);
      }
    }
  });
}

// The data of a backward call (decode_bwd_kernel and bwd_kernel).
template <typename scalar_t>
struct BwdPointers {
  using acc_t = typename acc_type<scalar_t>::type;
  const scalar_t *grad_out, *q, *k, *v, *out;
  const acc_t* lse;
  scalar_t* dq;
  acc_t *grad_k, *grad_v;
  BwdPointers(const at::Tensor& go, const at::Tensor& q_, const at::Tensor& kc, const at::Tensor& vc,
              const at::Tensor& o, const at::Tensor& l, at::Tensor& dq_, at::Tensor& gk, at::Tensor& gv)
      : grad_out(go.data_ptr<scalar_t>()), q(q_.data_ptr<scalar_t>()), k(kc.data_ptr<scalar_t>()),
        v(vc.data_ptr<scalar_t>()), out(o.data_ptr<scalar_t>()), lse(l.data_ptr<acc_t>()),
        dq(dq_.data_ptr<scalar_t>()), grad_k(gk.data_ptr<acc_t>()), grad_v(gv.data_ptr<acc_t>()) {}
};

// ---- decode (Sq = 1) ------------------------------------------------------------------------------------

// One query row per head: the work is one read of the cache, so the kernels are streams over memory. The
// per-(sequence, kv head) tasks of fwd_kernel/bwd_kernel read pieces D elements long and Hkv * D apart; here
// one task holds every head of a sequence and walks the cache rows in order, so it reads each row's Hkv * D
// contiguous elements and the hardware prefetcher sees one stream per tensor. Long caches with few sequences
// are split along the keys so that every thread has work: the forward merges the splits through their (max,
// sum, unnormalised output), as in flash decoding; the backward's splits own disjoint cache rows and add
// their partial dq.
constexpr int64_t kDecodeBlock = 32;      // keys per block: the block's scores for every head stay in L1
constexpr int64_t kDecodeMinSplit = 256;  // fewest keys a split handles

struct DecodeSplits {
  const Lengths& len;
  int64_t Tmax, keys, n;  // keys: mean rows a sequence attends; n: splits per sequence
  DecodeSplits(const Lengths& l, int64_t B, int64_t Tmax_) : len(l), Tmax(Tmax_), keys(mean_keys(l, B)) {
    const int64_t threads = at::get_num_threads();
    n = std::max<int64_t>(1, std::min((2 * threads + B - 1) / B, (keys + kDecodeMinSplit - 1) / kDecodeMinSplit));
  }
  // Cache rows [first, second) that split `s` of sequence b attends. The one query sits at the last new row,
  // so causal or not it sees the rows up to its own; empty without a new token.
  std::pair<int64_t, int64_t> rows(int64_t b, int64_t s) const {
    if (len.nnew(b) < 1) return {0, 0};
    const int64_t lo = len.lpad(b), hi = std::max(lo, std::min(len.seqlen(b) + 1, Tmax));
    const int64_t per = (hi - lo + n - 1) / n, first = std::min(hi, lo + s * per);
    return {first, std::min(hi, first + per)};
  }
};

// Block rows [0, nk) of a (rows, Hkv, D) cache slice as acc_t: (row j, kv head g) is at ptr + j * rs + g * hs.
// The cache itself when it is already acc_t, else converted into buf.
template <typename scalar_t, typename acc_t>
struct AccRows {
  const acc_t* ptr;
  int64_t rs, hs;
  AccRows(const scalar_t* block, int64_t row_stride, int64_t head_stride, int64_t nk, int64_t Hkv, int64_t D,
          std::vector<acc_t>& buf) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      ptr = block, rs = row_stride, hs = head_stride;
    } else {
      buf.resize(kDecodeBlock * Hkv * D);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t g = 0; g < Hkv; ++g)
          for (int64_t d = 0; d < D; ++d)
            buf[(j * Hkv + g) * D + d] = static_cast<acc_t>(block[j * row_stride + g * head_stride + d]);
      ptr = buf.data(), rs = Hkv * D, hs = D;
    }
  }
  const acc_t* at(int64_t j, int64_t g) const { return ptr + j * rs + g * hs; }
};

template <typename scalar_t>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out,
                   at::Tensor& lse, const Lengths& len, const Rotary<typename acc_type<scalar_t>::type>& rot,
                   double softmax_scale, const Dropout& drop) {
  using acc_t = typename acc_type<scalar_t>::type;
  const int64_t B = q.size(0), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), G = Hq / Hkv, Tmax = k_cache.size(1);
  const FwdPointers<scalar_t> P(q, k_cache, v_cache, out, lse, softmax_scale);
  const scalar_t *qp = P.q, *kc = P.k, *vc = P.v;
  scalar_t* op = P.out;
  acc_t* lp = P.lse;
  const auto ks = P.ks, vs = P.vs;
  const acc_t scale = P.scale, neg_inf = P.neg_inf;
  const DecodeSplits splits(len, B, k_cache.size(1));
  const int64_t n_split = splits.n, W = 2 + D;  // per split and head: max, sum, unnormalised output
  std::vector<acc_t> part(n_split > 1 ? B * n_split * Hq * W : 0);

  at::parallel_for(0, B * n_split, grain_for(Hq * splits.keys * D / n_split), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Q(Hq * D), O(Hq * D), S(Hq * kDecodeBlock), m(Hq), l(Hq), Kb, Vb,
        f(drop.on() ? kDecodeBlock : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_split, split = task % n_split;
      const auto [k_lo, k_hi] = splits.rows(b, split);
      for (int64_t h = 0; h < Hq; ++h) {
        acc_t* dst = Q.data() + h * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(qp[(b * Hq + h) * D + d]);
        rotate(rot, dst, len.seqlen(b) - len.lpad(b), acc_t(1));
        for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
        m[h] = neg_inf;
        l[h] = 0;
      }
      std::fill(O.begin(), O.end(), acc_t(0));
      for (int64_t k0 = k_lo; k0 < k_hi; k0 += kDecodeBlock) {
        const int64_t nk = std::min(kDecodeBlock, k_hi - k0);
        const AccRows<scalar_t, acc_t> K(kc + b * ks[0] + k0 * ks[1], ks[1], ks[2], nk, Hkv, D, Kb);
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t h = 0; h < Hq; ++h) S[h * kDecodeBlock + j] = dot(Q.data() + h * D, K.at(j, h / G), D);
        for (int64_t h = 0; h < Hq; ++h) {
          acc_t* sh = S.data() + h * kDecodeBlock;
          online_softmax_block(sh, nk, m[h], l[h], O.data() + h * D, D);
          if (drop.on()) {  // the one query row: t = 0
            drop.factors(f.data(), nk, (b * Hq + h) * Tmax + k0);
            for (int64_t j = 0; j < nk; ++j) sh[j] *= f[j];
          }
        }
        const AccRows<scalar_t, acc_t> V(vc + b * vs[0] + k0 * vs[1], vs[1], vs[2], nk, Hkv, D, Vb);
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t h = 0; h < Hq; ++h) axpy(O.data() + h * D, S[h * kDecodeBlock + j], V.at(j, h / G), D);
      }
      for (int64_t h = 0; h < Hq; ++h) {
        if (n_split > 1) {  // merged below
          acc_t* p = part.data() + ((b * n_split + split) * Hq + h) * W;
          p[0] = m[h], p[1] = l[h];
          std::copy(O.begin() + h * D, O.begin() + (h + 1) * D, p + 2);
          continue;
        }
        finish_row(op + (b * Hq + h) * D, O.data() + h * D, D, m[h], l[h], lp + b * Hq + h);
      }
    }
  });
  if (n_split == 1) return;
  at::parallel_for(0, B * Hq, grain_for(n_split * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const acc_t* p = part.data() + (bh / Hq * n_split * Hq + bh % Hq) * W;  // split s at p + s * Hq * W
      acc_t mx = neg_inf;
      for (int64_t s = 0; s < n_split; ++s)
        if (p[s * Hq * W + 1] > 0) mx = std::max(mx, p[s * Hq * W]);
      acc_t total = 0;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t s = 0; s < n_split; ++s) {
        const acc_t* ps = p + s * Hq * W;
        if (!(ps[1] > 0)) continue;  // an empty split
        const acc_t w = std::exp(ps[0] - mx);
        total += w * ps[1];
        axpy(acc.data(), w, ps + 2, D);
      }
      finish_row(op + bh * D, acc.data(), D, mx, total, lp + bh);
    }
  });
}

// Backward of decode_kernel. Per block of rows: S = q . K and dP = dO . V for every head, P = exp(scale S - lse)
// and dS = P (dP - Di) scale, then dK += dS q, dV += P dO (contiguous accumulator rows owned by this task) and
// dq += dS K.
//
// With a Deferral, the rows j < def.end[b] take no accumulator update: their P and dS go to def.p / def.ds and
// the rotated q to def.q, for the caller to add over many passes in one product.
template <typename scalar_t>
void decode_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                       at::Tensor& grad_k, at::Tensor& grad_v, const Lengths& len,
                       const Rotary<typename acc_type<scalar_t>::type>& rot, double softmax_scale,
                       const Dropout& drop, const Deferral<typename acc_type<scalar_t>::type>& def = {}) {
  using acc_t = typename acc_type<scalar_t>::type;
  const int64_t B = q.size(0), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), G = Hq / Hkv, Tmax = k_cache.size(1);
  const BwdPointers<scalar_t> P(grad_out, q, k_cache, v_cache, out, lse, dq, grad_k, grad_v);
  const scalar_t *qp = P.q, *gop = P.grad_out, *op = P.out, *kc = P.k, *vc = P.v;
  const acc_t* lp = P.lse;
  scalar_t* dqp = P.dq;
  acc_t *gk = P.grad_k, *gv = P.grad_v;
  const auto ks = k_cache.strides(), vs = v_cache.strides();
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const DecodeSplits splits(len, B, Tmax);
  const int64_t n_split = splits.n;
  std::vector<acc_t> part(n_split > 1 ? B * n_split * Hq * D : 0);  // each split's dq, summed below

  at::parallel_for(0, B * n_split, grain_for(3 * Hq * splits.keys * D / n_split), [&](int64_t begin,
                                                                                           int64_t end) {
    std::vector<acc_t> Q(Hq * D), dO(Hq * D), dQ(Hq * D), Di(Hq), L(Hq), P(Hq * kDecodeBlock),
        dS(Hq * kDecodeBlock), Kb, Vb, f(drop.on() ? kDecodeBlock : 0);
    std::vector<char> live(Hq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_split, split = task % n_split;
      const auto [k_lo, k_hi] = splits.rows(b, split);
      const int64_t defer_end = def.on() ? def.end[b] : 0;
      std::fill(dQ.begin(), dQ.end(), acc_t(0));
      for (int64_t h = 0; h < Hq; ++h) {
        acc_t di = 0;
        for (int64_t d = 0; d < D; ++d) {
          Q[h * D + d] = static_cast<acc_t>(qp[(b * Hq + h) * D + d]);
          dO[h * D + d] = static_cast<acc_t>(gop[(b * Hq + h) * D + d]);
          di += dO[h * D + d] * static_cast<acc_t>(op[(b * Hq + h) * D + d]);
        }
        rotate(rot, Q.data() + h * D, len.seqlen(b) - len.lpad(b), acc_t(1));
        if (def.on() && split == 0) std::copy(Q.begin() + h * D, Q.begin() + (h + 1) * D, def.q + (b * Hq + h) * D);
        Di[h] = di;
        L[h] = lp[b * Hq + h];
        live[h] = !std::isinf(L[h]);  // -inf lse: no key in range, the head contributes nothing
      }
      for (int64_t k0 = k_lo; k0 < k_hi; k0 += kDecodeBlock) {
        const int64_t nk = std::min(kDecodeBlock, k_hi - k0);
        const AccRows<scalar_t, acc_t> K(kc + b * ks[0] + k0 * ks[1], ks[1], ks[2], nk, Hkv, D, Kb);
        const AccRows<scalar_t, acc_t> V(vc + b * vs[0] + k0 * vs[1], vs[1], vs[2], nk, Hkv, D, Vb);
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t h = 0; h < Hq; ++h) {
            P[h * kDecodeBlock + j] = dot(Q.data() + h * D, K.at(j, h / G), D);
            dS[h * kDecodeBlock + j] = dot(dO.data() + h * D, V.at(j, h / G), D);
          }
        for (int64_t h = 0; h < Hq; ++h) {
          acc_t* p = P.data() + h * kDecodeBlock;
          acc_t* ds = dS.data() + h * kDecodeBlock;
          if (!live[h]) {
            std::fill_n(p, nk, acc_t(0));
            std::fill_n(ds, nk, acc_t(0));
            continue;
          }
          for (int64_t j = 0; j < nk; ++j) p[j] = scale * p[j] - L[h];
          exp_block(p, p, nk);
          if (drop.on()) {  // dS = P (mask * dP - Di); dV takes the dropped P
            drop.factors(f.data(), nk, (b * Hq + h) * Tmax + k0);
            for (int64_t j = 0; j < nk; ++j) {
              ds[j] = p[j] * (ds[j] * f[j] - Di[h]) * scale;
              p[j] *= f[j];
            }
            continue;
          }
          for (int64_t j = 0; j < nk; ++j) ds[j] = p[j] * (ds[j] - Di[h]) * scale;
        }
        for (int64_t j = 0; j < nk; ++j) {
          if (k0 + j < defer_end) {  // P and dS handed to the caller
            for (int64_t h = 0; h < Hq; ++h) {
              const acc_t ds = dS[h * kDecodeBlock + j];
              def.p[(b * Hq + h) * def.R + k0 + j] = P[h * kDecodeBlock + j];
              def.ds[(b * Hq + h) * def.R + k0 + j] = ds;
              axpy(dQ.data() + h * D, ds, K.at(j, h / G), D);
            }
            continue;
          }
          acc_t* dk = gk + ((b * Tmax + k0 + j) * Hkv) * D;  // accumulators are contiguous
          acc_t* dv = gv + ((b * Tmax + k0 + j) * Hkv) * D;
          for (int64_t h = 0; h < Hq; ++h) {
            const int64_t g = h / G;
            const acc_t p = P[h * kDecodeBlock + j], ds = dS[h * kDecodeBlock + j];
            axpy(dk + g * D, ds, Q.data() + h * D, D);
            axpy(dv + g * D, p, dO.data() + h * D, D);
            axpy(dQ.data() + h * D, ds, K.at(j, g), D);
          }
        }
      }
      for (int64_t h = 0; h < Hq; ++h) {
        if (n_split > 1) {  // summed below, then rotated
          std::copy(dQ.begin() + h * D, dQ.begin() + (h + 1) * D, part.data() + ((b * n_split + split) * Hq + h) * D);
          continue;
        }
        rotate(rot, dQ.data() + h * D, len.seqlen(b) - len.lpad(b), acc_t(-1));
        for (int64_t d = 0; d < D; ++d) dqp[(b * Hq + h) * D + d] = static_cast<scalar_t>(dQ[h * D + d]);
      }
    }
  });
  if (n_split == 1) return;
  at::parallel_for(0, B * Hq, grain_for(n_split * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t s = 0; s < n_split; ++s) axpy(acc.data(), acc_t(1), part.data() + ((b * n_split + s) * Hq + bh % Hq) * D, D);
      rotate(rot, acc.data(), len.seqlen(b) - len.lpad(b), acc_t(-1));
      for (int64_t d = 0; d < D; ++d) dqp[bh * D + d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------------------

// One task = (sequence, kv head) with all its M = new tokens x group rows, so the task owns the gradient of
// its cache rows. Per key block: S = Q K^T, dP = dO V^T, P and dS elementwise, then dQ += dS K,
// dV += P^T dO, dK += dS^T Q as register-tiled block products (P and dS read transposed where they are); rows
// that cannot see the block are skipped.
template <typename scalar_t>
void bwd_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& grad_k, at::Tensor& grad_v,
                const Lengths& len, const Rotary<typename acc_type<scalar_t>::type>& rot, double softmax_scale,
                bool causal, const Dropout& drop) {
  using acc_t = typename acc_type<scalar_t>::type;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), G = Hq / Hkv, Tmax = k_cache.size(1), Dp = round_up(D, kNR);
  const BwdPointers<scalar_t> P(grad_out, q, k_cache, v_cache, out, lse, dq, grad_k, grad_v);
  const scalar_t *qp = P.q, *gop = P.grad_out, *op = P.out, *kc = P.k, *vc = P.v;
  const acc_t* lp = P.lse;
  scalar_t* dqp = P.dq;
  acc_t *gk = P.grad_k, *gv = P.grad_v;
  const auto ks = k_cache.strides(), vs = v_cache.strides();
  const acc_t scale = static_cast<acc_t>(softmax_scale);

  at::parallel_for(0, B * Hkv, grain_for(3 * G * Sq * mean_keys(len, B) * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Q, dO, dQ, Di, L, S, dP;
    std::vector<acc_t> Kt(D * kKeyBlock), Vt(D * kKeyBlock), Kb(kKeyBlock * Dp), dKb(kKeyBlock * Dp),
        dVb(kKeyBlock * Dp), f(drop.on() ? kKeyBlock : 0);
    std::vector<int64_t> hi;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % Hkv, b = task / Hkv;
      const int64_t seqlen = len.seqlen(b), lo = len.lpad(b), n_new = std::min(len.nnew(b), Sq);
      for (int64_t t = std::max<int64_t>(n_new, 0); t < Sq; ++t)  // dq is allocated uninitialised
        for (int64_t hg = 0; hg < G; ++hg) std::fill_n(dqp + ((b * Sq + t) * Hq + g * G + hg) * D, D, scalar_t(0));
      if (n_new <= 0) continue;
      const int64_t M = n_new * G;
      Q.assign(M * Dp, 0);
      dO.assign(M * Dp, 0);
      dQ.assign(M * Dp, 0);
      Di.assign(M, 0);
      L.assign(M, 0);
      hi.assign(M, 0);
      S.resize(M * kKeyBlock);
      dP.resize(M * kKeyBlock);
      for (int64_t t = 0; t < n_new; ++t) {
        for (int64_t hg = 0; hg < G; ++hg) {
          const int64_t i = t * G + hg, h = g * G + hg;
          const int64_t off = ((b * Sq + t) * Hq + h) * D;
          acc_t* qi = Q.data() + i * Dp;
          acc_t* doi = dO.data() + i * Dp;
          acc_t di = 0;
          for (int64_t d = 0; d < D; ++d) {
            qi[d] = static_cast<acc_t>(qp[off + d]);
            doi[d] = static_cast<acc_t>(gop[off + d]);
            di += doi[d] * static_cast<acc_t>(op[off + d]);
          }
          rotate(rot, qi, seqlen + t - lo, acc_t(1));
          Di[i] = di;
          L[i] = lp[(b * Hq + h) * Sq + t];
          // -inf lse: no key in range, the row contributes nothing.
          hi[i] = std::isinf(L[i]) ? lo - 1 : (causal ? seqlen + t : seqlen + n_new - 1);
        }
      }
      const int64_t kv_end = std::min(seqlen + n_new, Tmax);
      for (int64_t k0 = lo; k0 < kv_end; k0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, kv_end - k0), np = round_up(nk, kNR);
        // hi is nondecreasing in the row index (rows are ordered by position; rows with no key come first),
        // so the rows that see this block are a suffix [i0, M).
        int64_t i0 = 0;
        while (i0 < M && hi[i0] < k0) ++i0;
        const int64_t Mi = M - i0;
        if (Mi == 0) continue;
        const scalar_t* kblock = kc + b * ks[0] + k0 * ks[1] + g * ks[2];
        const scalar_t* vblock = vc + b * vs[0] + k0 * vs[1] + g * vs[2];
        if (k0 + kKeyBlock < kv_end) {  // the next block (K/V, and the accumulator rows it will update)
          const int64_t n_next = std::min(kKeyBlock, kv_end - k0 - kKeyBlock);
          prefetch_rows(kblock + kKeyBlock * ks[1], ks[1], n_next, D);
          prefetch_rows(vblock + kKeyBlock * vs[1], vs[1], n_next, D);
          prefetch_rows(gk + ((b * Tmax + k0 + kKeyBlock) * Hkv + g) * D, Hkv * D, n_next, D);
          prefetch_rows(gv + ((b * Tmax + k0 + kKeyBlock) * Hkv + g) * D, Hkv * D, n_next, D);
        }
        load_block(kblock, ks[1], nk, D, Dp, Kb.data(), Kt.data());
        load_block(vblock, vs[1], nk, D, Dp, (acc_t*)nullptr, Vt.data());
        gemm(S.data(), kKeyBlock, Q.data() + i0 * Dp, Dp, Kt.data(), kKeyBlock, Mi, np, D, false);
        gemm(dP.data(), kKeyBlock, dO.data() + i0 * Dp, Dp, Vt.data(), kKeyBlock, Mi, np, D, false);
        for (int64_t r = 0; r < Mi; ++r) {
          const int64_t i = i0 + r;
          acc_t* p = S.data() + r * kKeyBlock;
          acc_t* ds = dP.data() + r * kKeyBlock;
          const int64_t nj = std::max<int64_t>(0, std::min(nk, hi[i] + 1 - k0));
          for (int64_t j = 0; j < nj; ++j) p[j] = scale * p[j] - L[i];
          exp_block(p, p, nj);
          if (drop.on()) {  // dS = P (mask * dP - Di); dV takes the dropped P
            const int64_t t = i / G, h = g * G + i % G;
            drop.factors(f.data(), nj, ((b * Hq + h) * Sq + t) * Tmax + k0);
            for (int64_t j = 0; j < nj; ++j) {
              ds[j] = p[j] * (ds[j] * f[j] - Di[i]) * scale;
              p[j] *= f[j];
            }
          } else {
            for (int64_t j = 0; j < nj; ++j) ds[j] = p[j] * (ds[j] - Di[i]) * scale;
          }
          for (int64_t j = nj; j < kKeyBlock; ++j) p[j] = ds[j] = 0;  // masked keys
        }
        // dQ += dS K, dV = P^T dO, dK = dS^T Q (P and dS read transposed in place)
        gemm(dQ.data() + i0 * Dp, Dp, dP.data(), kKeyBlock, Kb.data(), Dp, Mi, Dp, nk, true);
        gemm<acc_t, true>(dVb.data(), Dp, S.data(), kKeyBlock, dO.data() + i0 * Dp, Dp, nk, Dp, Mi, false);
        gemm<acc_t, true>(dKb.data(), Dp, dP.data(), kKeyBlock, Q.data() + i0 * Dp, Dp, nk, Dp, Mi, false);
        for (int64_t j = 0; j < nk; ++j) {
          acc_t* dk = gk + ((b * Tmax + k0 + j) * Hkv + g) * D;  // accumulators are contiguous
          acc_t* dv = gv + ((b * Tmax + k0 + j) * Hkv + g) * D;
          for (int64_t d = 0; d < D; ++d) {
            dk[d] += dKb[j * Dp + d];
            dv[d] += dVb[j * Dp + d];
          }
        }
      }
      for (int64_t t = 0; t < n_new; ++t) {
        for (int64_t hg = 0; hg < G; ++hg) {
          acc_t* dqi = dQ.data() + (t * G + hg) * Dp;
          rotate(rot, dqi, seqlen + t - lo, acc_t(-1));
          scalar_t* dst = dqp + ((b * Sq + t) * Hq + g * G + hg) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(dqi[d]);
        }
      }
    }
  });
}
