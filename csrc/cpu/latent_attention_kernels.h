// The latent_attention CPU kernels proper. Included twice by latent_attention.cpp, inside a namespace compiled
// for AVX2+FMA and inside one for the baseline ISA, and chosen at run time: the extension is built without
// -march flags so that one wheel runs on any x86-64. Relies on the includes and types of that file.

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// s[j] = q . K[j] for j < n (rows of K `stride` apart), four rows at a time so that four independent
// accumulator chains hide the FMA latency.
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

template <typename T>
inline void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// y[j] = exp(x[j]) for a block. fp32: a branch-free polynomial the compiler vectorises (relative error
// ~2e-7, exp(x) = 0 below -87); fp64 keeps std::exp (fp64 is for exact gradient checks).
inline void exp_block(float* y, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float v = std::min(std::max(x[j], -87.3f), 88.3f);
    const float k = std::nearbyint(v * 1.44269504088896341f);
    const float r = (v - k * 0.693359375f) + k * 2.12194440e-4f;  // v - k ln2, ln2 split in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    y[j] = x[j] < -87.3f ? 0.0f : p * scale;
  }
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

// Rows [0, n) of a (row-strided) cache block as acc_t: the cache itself when no conversion is needed.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_rows(const scalar_t* base, int64_t stride, int64_t n, int64_t D, acc_t* buf,
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

template <typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out,
                at::Tensor& lse, const Lengths& len, const Rotary<typename acc_type<scalar_t>::type>& rot,
                double softmax_scale, bool causal) {
  using acc_t = typename acc_type<scalar_t>::type;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), G = Hq / Hkv;
  const int64_t n_chunks = (Sq + kQueryChunk - 1) / kQueryChunk;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kc = k_cache.data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const auto ks = k_cache.strides(), vs = v_cache.strides();
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  const int64_t work = G * std::min(Sq, kQueryChunk) * mean_keys(len, B) * D;
  at::parallel_for(0, B * Hkv * n_chunks, grain_for(work), [&](int64_t begin, int64_t end) {
    const int64_t M_max = G * kQueryChunk;
    std::vector<acc_t> Q(M_max * D), acc(M_max * D), m(M_max), l(M_max), s(kKeyBlock);
    std::vector<acc_t> kbuf(kKeyBlock * D), vbuf(kKeyBlock * D);
    std::vector<int64_t> hi(M_max);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % n_chunks, g = (task / n_chunks) % Hkv, b = task / (n_chunks * Hkv);
      const int64_t seqlen = len.seqlen(b), lo = len.lpad(b), n_new = len.nnew(b);
      const int64_t t0 = c * kQueryChunk, t1 = std::min({Sq, t0 + kQueryChunk, n_new});
      if (t0 >= t1) continue;
      // Row i = (t - t0) * G + head-in-group: the queries of one position share their key range.
      const int64_t M = (t1 - t0) * G;
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t hg = 0; hg < G; ++hg) {
          const int64_t i = (t - t0) * G + hg;
          const scalar_t* src = qp + ((b * Sq + t) * Hq + g * G + hg) * D;
          acc_t* dst = Q.data() + i * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
          rotate(rot, dst, seqlen + t - lo, acc_t(1));
          for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
          hi[i] = causal ? seqlen + t : seqlen + n_new - 1;  // last row this query sees
          m[i] = neg_inf;
          l[i] = 0;
        }
      }
      std::fill(acc.begin(), acc.begin() + M * D, acc_t(0));
      const int64_t kv_end = std::min(hi[M - 1] + 1, k_cache.size(1));
      for (int64_t k0 = lo; k0 < kv_end; k0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, kv_end - k0);
        int64_t kst, vst;
        const acc_t* K = load_rows<scalar_t, acc_t>(kc + b * ks[0] + k0 * ks[1] + g * ks[2], ks[1], nk, D,
                                                    kbuf.data(), kst);
        const acc_t* V = load_rows<scalar_t, acc_t>(vc + b * vs[0] + k0 * vs[1] + g * vs[2], vs[1], nk, D,
                                                    vbuf.data(), vst);
        for (int64_t i = 0; i < M; ++i) {
          const int64_t nj = std::min(nk, hi[i] + 1 - k0);
          if (nj <= 0) continue;
          const acc_t* qi = Q.data() + i * D;
          acc_t mb = m[i];
          dot_rows(s.data(), qi, K, kst, nj, D);
          for (int64_t j = 0; j < nj; ++j) mb = std::max(mb, s[j]);
          const acc_t alpha = std::exp(m[i] - mb);  // 0 on the first block (m = -inf)
          for (int64_t j = 0; j < nj; ++j) s[j] -= mb;
          exp_block(s.data(), s.data(), nj);
          acc_t* ai = acc.data() + i * D;
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
          for (int64_t j = 0; j < nj; ++j) {
            sum += s[j];
            axpy(ai, s[j], V + j * vst, D);
          }
          l[i] = l[i] * alpha + sum;
          m[i] = mb;
        }
      }
      for (int64_t i = 0; i < M; ++i) {
        const int64_t t = t0 + i / G, h = g * G + i % G;
        scalar_t* dst = op + ((b * Sq + t) * Hq + h) * D;
        if (l[i] > 0) {
          const acc_t inv = acc_t(1) / l[i];
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[i * D + d] * inv);
          lp[(b * Hq + h) * Sq + t] = m[i] + std::log(l[i]);
        }  // else no key in range (a pad query of a left-padded pass): out stays 0, lse -inf
      }
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& grad_k, at::Tensor& grad_v,
                const Lengths& len, const Rotary<typename acc_type<scalar_t>::type>& rot, double softmax_scale,
                bool causal) {
  using acc_t = typename acc_type<scalar_t>::type;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), G = Hq / Hkv, Tmax = k_cache.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* gop = grad_out.data_ptr<scalar_t>();
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* kc = k_cache.data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const acc_t* lp = lse.data_ptr<acc_t>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  acc_t* gk = grad_k.data_ptr<acc_t>();
  acc_t* gv = grad_v.data_ptr<acc_t>();
  const auto ks = k_cache.strides(), vs = v_cache.strides();
  const acc_t scale = static_cast<acc_t>(softmax_scale);

  at::parallel_for(0, B * Hkv, grain_for(3 * G * Sq * mean_keys(len, B) * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Q, dO, dQ, Di, L, P(kKeyBlock), kbuf(kKeyBlock * D), vbuf(kKeyBlock * D);
    std::vector<int64_t> hi;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task % Hkv, b = task / Hkv;
      const int64_t seqlen = len.seqlen(b), lo = len.lpad(b), n_new = std::min(len.nnew(b), Sq);
      if (n_new <= 0) continue;
      const int64_t M = n_new * G;
      Q.assign(M * D, 0);
      dO.assign(M * D, 0);
      dQ.assign(M * D, 0);
      Di.assign(M, 0);
      L.assign(M, 0);
      hi.assign(M, 0);
      for (int64_t t = 0; t < n_new; ++t) {
        for (int64_t hg = 0; hg < G; ++hg) {
          const int64_t i = t * G + hg, h = g * G + hg;
          const int64_t off = ((b * Sq + t) * Hq + h) * D;
          acc_t* qi = Q.data() + i * D;
          acc_t* doi = dO.data() + i * D;
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
        const int64_t nk = std::min(kKeyBlock, kv_end - k0);
        int64_t kst, vst;
        const acc_t* K = load_rows<scalar_t, acc_t>(kc + b * ks[0] + k0 * ks[1] + g * ks[2], ks[1], nk, D,
                                                    kbuf.data(), kst);
        const acc_t* V = load_rows<scalar_t, acc_t>(vc + b * vs[0] + k0 * vs[1] + g * vs[2], vs[1], nk, D,
                                                    vbuf.data(), vst);
        acc_t* dK = gk + ((b * Tmax + k0) * Hkv + g) * D;  // accumulators are contiguous
        acc_t* dV = gv + ((b * Tmax + k0) * Hkv + g) * D;
        const int64_t gst = Hkv * D;
        for (int64_t i = 0; i < M; ++i) {
          const int64_t nj = std::min(nk, hi[i] + 1 - k0);
          if (nj <= 0) continue;
          const acc_t* qi = Q.data() + i * D;
          const acc_t* doi = dO.data() + i * D;
          acc_t* dqi = dQ.data() + i * D;
          dot_rows(P.data(), qi, K, kst, nj, D);
          for (int64_t j = 0; j < nj; ++j) P[j] = scale * P[j] - L[i];
          exp_block(P.data(), P.data(), nj);
          for (int64_t j = 0; j < nj; ++j) {
            const acc_t p = P[j];
            const acc_t ds = p * (dot(doi, V + j * vst, D) - Di[i]) * scale;
            axpy(dV + j * gst, p, doi, D);
            axpy(dqi, ds, K + j * kst, D);
            axpy(dK + j * gst, ds, qi, D);
          }
        }
      }
      for (int64_t t = 0; t < n_new; ++t) {
        for (int64_t hg = 0; hg < G; ++hg) {
          acc_t* dqi = dQ.data() + (t * G + hg) * D;
          rotate(rot, dqi, seqlen + t - lo, acc_t(-1));
          scalar_t* dst = dqp + ((b * Sq + t) * Hq + g * G + hg) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(dqi[d]);
        }
      }
    }
  });
}

