// CPU kernels of latent_attention: append into the preallocated KV cache, forward (online softmax over key
// blocks, never an Sq x T score matrix) and backward. The backward runs one task per (sequence, kv head),
// so each task owns its cache rows' gradients and accumulates them without atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../latent_attention_checks.h"

namespace coconut {
namespace {

constexpr int64_t kKeyBlock = 64;    // keys per block: the block's K/V (and their gradients) stay in L1/L2
constexpr int64_t kQueryChunk = 16;  // query positions per forward task

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

// Per-sequence lengths, with the defaults of the optional arguments.
struct Lengths {
  const int32_t* seqlens;
  const int32_t* leftpad;
  const int32_t* n_new;
  int64_t Sq;
  int64_t seqlen(int64_t b) const { return seqlens[b]; }
  int64_t lpad(int64_t b) const { return leftpad ? leftpad[b] : 0; }
  int64_t nnew(int64_t b) const { return n_new ? n_new[b] : Sq; }
};

struct LengthTensors {
  at::Tensor seqlens, leftpad, n_new;
  LengthTensors(const at::Tensor& s, const std::optional<at::Tensor>& l, const std::optional<at::Tensor>& n)
      : seqlens(s.contiguous()),
        leftpad(l.has_value() ? l->contiguous() : at::Tensor()),
        n_new(n.has_value() ? n->contiguous() : at::Tensor()) {}
  Lengths view(int64_t Sq) const {
    return {seqlens.data_ptr<int32_t>(), leftpad.defined() ? leftpad.data_ptr<int32_t>() : nullptr,
            n_new.defined() ? n_new.data_ptr<int32_t>() : nullptr, Sq};
  }
};

// Rotation of the first rotary_dim dims, tables converted once to the accumulation type.
template <typename acc_t>
struct Rotary {
  const acc_t* cos = nullptr;
  const acc_t* sin = nullptr;
  int64_t half = 0, n_pos = 0;
  bool interleaved = false;
  // sign = -1 applies the transposed rotation (gradient w.r.t. the un-rotated input).
  void apply(acc_t* x, int64_t pos, acc_t sign) const {
    if (half == 0) return;
    pos = std::min(std::max<int64_t>(pos, 0), n_pos - 1);  // positions of never-attended pad rows
    const acc_t* c = cos + pos * half;
    const acc_t* s = sin + pos * half;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t i1 = interleaved ? 2 * i : i;
      const int64_t i2 = interleaved ? 2 * i + 1 : i + half;
      const acc_t x1 = x[i1], x2 = x[i2], sn = sign * s[i];
      x[i1] = x1 * c[i] - x2 * sn;
      x[i2] = x2 * c[i] + x1 * sn;
    }
  }
};

struct RotaryTables {
  at::Tensor cos, sin;
  RotaryTables(const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& s, at::ScalarType acc) {
    if (c.has_value()) {
      cos = c->to(acc).contiguous();
      sin = s->to(acc).contiguous();
    }
  }
  template <typename acc_t>
  Rotary<acc_t> view(bool interleaved) const {
    Rotary<acc_t> r;
    if (cos.defined() && cos.numel() > 0) {
      r.cos = cos.data_ptr<acc_t>();
      r.sin = sin.data_ptr<acc_t>();
      r.half = cos.size(1);
      r.n_pos = cos.size(0);
      r.interleaved = interleaved;
    }
    return r;
  }
};

inline at::ScalarType acc_scalar_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

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
  at::parallel_for(0, B * Sq, 16, [&](int64_t begin, int64_t end) {
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
          rot.apply(buf.data(), row - len.lpad(b), acc_t(1));
          for (int64_t d = 0; d < D; ++d) kdst[d] = static_cast<scalar_t>(buf[d]);
        } else {
          std::copy(ksrc, ksrc + D, kdst);
        }
        std::copy(vsrc, vsrc + D, vdst);
      }
    }
  });
}

void kv_cache_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                         const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                         const std::optional<at::Tensor>& new_seqlens, const std::optional<at::Tensor>& rotary_cos,
                         const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved) {
  const auto d = check_latent_attention_args(at::Tensor(), k_new, v_new, k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  const LengthTensors lt(cache_seqlens, cache_leftpad, new_seqlens);
  const RotaryTables rt(rotary_cos, rotary_sin, acc_scalar_type(k_cache.scalar_type()));
  const at::Tensor kn = k_new.contiguous(), vn = v_new.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "kv_cache_append_", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    append_kernel<scalar_t>(k_cache, v_cache, kn, vn, lt.view(d.Sq), rt.view<acc_t>(rotary_interleaved));
  });
}

// ---- forward ----------------------------------------------------------------------------------------------

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

  at::parallel_for(0, B * Hkv * n_chunks, 1, [&](int64_t begin, int64_t end) {
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
          rot.apply(dst, seqlen + t - lo, acc_t(1));
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
          for (int64_t j = 0; j < nj; ++j) {
            s[j] = dot(qi, K + j * kst, D);
            mb = std::max(mb, s[j]);
          }
          const acc_t alpha = std::exp(m[i] - mb);  // 0 on the first block (m = -inf)
          acc_t* ai = acc.data() + i * D;
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
          for (int64_t j = 0; j < nj; ++j) {
            const acc_t p = std::exp(s[j] - mb);
            sum += p;
            axpy(ai, p, V + j * vst, D);
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

std::tuple<at::Tensor, at::Tensor> latent_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& new_seqlens,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, double softmax_scale, bool causal) {
  const auto d = check_latent_attention_args(q, at::Tensor(), at::Tensor(), k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  const LengthTensors lt(cache_seqlens, cache_leftpad, new_seqlens);
  const RotaryTables rt(rotary_cos, rotary_sin, acc_scalar_type(q.scalar_type()));
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::zeros_like(qc);
  at::Tensor lse = at::full({d.B, d.Hq, d.Sq}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(acc_scalar_type(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "latent_attention_fwd", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    fwd_kernel<scalar_t>(qc, k_cache, v_cache, out, lse, lt.view(d.Sq), rt.view<acc_t>(rotary_interleaved),
                         softmax_scale, causal);
  });
  return {out, lse};
}

// ---- backward ---------------------------------------------------------------------------------------------

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

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Q, dO, dQ, Di, L, kbuf(kKeyBlock * D), vbuf(kKeyBlock * D);
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
          rot.apply(qi, seqlen + t - lo, acc_t(1));
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
          for (int64_t j = 0; j < nj; ++j) {
            const acc_t p = std::exp(scale * dot(qi, K + j * kst, D) - L[i]);
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
          rot.apply(dqi, seqlen + t - lo, acc_t(-1));
          scalar_t* dst = dqp + ((b * Sq + t) * Hq + g * G + hg) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(dqi[d]);
        }
      }
    }
  });
}

at::Tensor latent_attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                                    const std::optional<at::Tensor>& new_seqlens,
                                    const std::optional<at::Tensor>& rotary_cos,
                                    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                                    double softmax_scale, bool causal, at::Tensor& grad_k_cache,
                                    at::Tensor& grad_v_cache) {
  const auto d = check_latent_attention_args(q, at::Tensor(), at::Tensor(), k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  check_latent_attention_bwd_args(d, q, grad_out, out, lse, k_cache, grad_k_cache, grad_v_cache);
  const LengthTensors lt(cache_seqlens, cache_leftpad, new_seqlens);
  const RotaryTables rt(rotary_cos, rotary_sin, acc_scalar_type(q.scalar_type()));
  const at::Tensor qc = q.contiguous(), goc = grad_out.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::zeros_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "latent_attention_bwd", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    bwd_kernel<scalar_t>(goc, qc, k_cache, v_cache, oc, lc, dq, grad_k_cache, grad_v_cache, lt.view(d.Sq),
                         rt.view<acc_t>(rotary_interleaved), softmax_scale, causal);
  });
  return dq;
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CPU, m) {
  m.impl("kv_cache_append_", &kv_cache_append_cpu);
  m.impl("latent_attention_fwd", &latent_attention_fwd_cpu);
  m.impl("latent_attention_bwd", &latent_attention_bwd_cpu);
}

}  // namespace coconut
