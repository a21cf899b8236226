// CPU kernels of soft_embedding, the input of the "soft" and "mixture" latent feedback modes (Soft Thinking,
// Mixture of Inputs): per-row filter statistics (threshold, log-normaliser), then the probability-weighted sum
// of embedding rows, as a per-row gather when few tokens are kept and as a chunked GEMM otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "../common.h"

namespace coconut {
namespace {

// Vocabulary rows per GEMM of the dense path: the probabilities of one chunk (N x kChunk) are all that is
// materialised, and a bf16/fp16 weight chunk is converted to fp32 once per chunk.
constexpr int64_t kChunk = 1024;
// The per-row gather runs when the kept entries are at most 1/kSparseRatio of N x V: it then does fewer flops
// than the GEMM by more than the GEMM's efficiency advantage (MKL GEMM vs scalar axpy, measured on AVX-512).
constexpr int64_t kSparseRatio = 16;

// The per-row gather instead of the GEMM: few kept entries, or a problem too small for a (threaded) GEMM call.
bool use_gather(int64_t total_kept, int64_t N, int64_t V, int64_t d) {
  return total_kept * kSparseRatio <= N * V || N * V * d <= (int64_t{1} << 16);
}

// Rows per task of at::parallel_for: about 64k elements of work, so that small calls (decoding one batch of
// latents, gradcheck) run serially instead of paying for an OpenMP region.
int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_row));
}

void check_inputs(const at::Tensor& logits, const at::Tensor& weight, double temperature, int64_t top_k,
                  double top_p) {
  check_rank(logits, 2, "logits", "(N, V)");
  check_rank(weight, 2, "weight", "(V, d)");
  check_float_dtype(logits, "logits");
  check_float_dtype(weight, "weight");
  check_same_device(weight, logits, "weight", "logits");
  COCONUT_CHECK((logits.scalar_type() == at::kDouble) == (weight.scalar_type() == at::kDouble),
                "weight must be float64 exactly when logits is float64, got logits ", logits.scalar_type(),
                " and weight ", weight.scalar_type());
  const int64_t V = logits.size(1);
  COCONUT_CHECK(V >= 1, "logits must have at least one column (the vocabulary), got shape ", logits.sizes());
  COCONUT_CHECK(weight.size(0) == V, "weight must have ", V, " rows (logits' vocabulary size), got shape ",
                weight.sizes());
  COCONUT_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0, got ",
                temperature);
  COCONUT_CHECK(top_k >= 0 && top_k <= V, "top_k must be in [0, V] = [0, ", V, "], got ", top_k);
  COCONUT_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
}

template <typename acc_t, typename src_t>
void convert(const src_t* src, int64_t len, acc_t* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// dst[0:len] = t[row, col0:col0+len] in acc_t (t contiguous 2-D).
template <typename acc_t>
void load_row(const at::Tensor& t, int64_t row, int64_t col0, int64_t len, acc_t* dst) {
  const int64_t off = row * t.size(1) + col0;
  switch (t.scalar_type()) {
    case at::kDouble: convert(t.const_data_ptr<double>() + off, len, dst); break;
    case at::kFloat: convert(t.const_data_ptr<float>() + off, len, dst); break;
    case at::kHalf: convert(t.const_data_ptr<at::Half>() + off, len, dst); break;
    case at::kBFloat16: convert(t.const_data_ptr<at::BFloat16>() + off, len, dst); break;
    default: TORCH_CHECK(false, "unreachable dtype ", t.scalar_type());
  }
}

template <typename acc_t>
void store_row(at::Tensor& t, int64_t row, const acc_t* src) {
  const int64_t len = t.size(1), off = row * len;
  switch (t.scalar_type()) {
    case at::kDouble: convert(src, len, t.mutable_data_ptr<double>() + off); break;
    case at::kFloat: convert(src, len, t.mutable_data_ptr<float>() + off); break;
    case at::kHalf: convert(src, len, t.mutable_data_ptr<at::Half>() + off); break;
    case at::kBFloat16: convert(src, len, t.mutable_data_ptr<at::BFloat16>() + off); break;
    default: TORCH_CHECK(false, "unreachable dtype ", t.scalar_type());
  }
}

// The smallest value-closed set (all entries >= some value) of v[lo, hi) whose weight w reaches `need`;
// returns its smallest value. Three-way quickselect on (v, w) pairs: expected O(hi - lo), no full sort.
// Masses are summed in double: with thousands of tokens in a nucleus, float32 sums err by about one
// boundary token's probability.
template <typename acc_t>
acc_t mass_threshold(acc_t* v, acc_t* w, int64_t lo, int64_t hi, double need) {
  while (true) {
    const acc_t pivot = v[lo + (hi - lo) / 2];
    int64_t a = lo, i = lo, b = hi;  // [lo, a) > pivot, [a, b) == pivot, [b, hi) < pivot
    while (i < b) {
      if (v[i] > pivot) {
        std::swap(v[i], v[a]), std::swap(w[i], w[a]);
        ++a, ++i;
      } else if (v[i] < pivot) {
        --b;
        std::swap(v[i], v[b]), std::swap(w[i], w[b]);
      } else {
        ++i;
      }
    }
    double gt = 0, eq = 0;
    for (int64_t j = lo; j < a; ++j) gt += w[j];
    for (int64_t j = a; j < b; ++j) eq += w[j];
    if (a > lo && gt >= need) {
      hi = a;
      continue;
    }
    // b == hi: nothing smaller is left (the mass fell short of top_p * Z by rounding): keep everything.
    if (gt + eq >= need || b == hi) return pivot;
    need -= gt + eq;
    lo = b;
  }
}

template <typename acc_t>
struct RowStats {
  acc_t thr;    // kept: x >= thr
  acc_t max;    // largest logit
  double sum;   // sum over the kept set of exp((x - max) / T)
  int64_t kept;
};

// x: one row of logits in acc_t. v, w: scratch reused across rows.
template <typename acc_t>
RowStats<acc_t> row_stats(const acc_t* x, int64_t V, acc_t inv_t, int64_t top_k, double top_p, std::vector<acc_t>& v,
                          std::vector<acc_t>& w) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < V; ++i) m = std::max(m, x[i]);
  acc_t thr = -std::numeric_limits<acc_t>::infinity();
  if (top_k > 0 && top_k < V) {
    v.assign(x, x + V);
    std::nth_element(v.begin(), v.begin() + (top_k - 1), v.end(), std::greater<acc_t>());
    thr = v[top_k - 1];
  }
  if (top_p < 1) {
    v.clear();
    w.clear();
    double z = 0;
    for (int64_t i = 0; i < V; ++i) {
      if (x[i] >= thr) {
        const acc_t e = std::exp((x[i] - m) * inv_t);
        v.push_back(x[i]);
        w.push_back(e);
        z += e;
      }
    }
    thr = mass_threshold(v.data(), w.data(), 0, static_cast<int64_t>(v.size()), top_p * z);
  }
  double s = 0;
  int64_t kept = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] >= thr) {
      s += std::exp((x[i] - m) * inv_t);
      ++kept;
    }
  }
  return {thr, m, s, kept};
}

// probs[n, j] = prob(n, x) for the kept logits x = logits[n, v0 + j] (x >= thr[n]), else 0, j < len: one chunk
// of the vocabulary for every row (ld: the row stride of probs).
template <typename acc_t, typename Prob>
void probs_chunk(const at::Tensor& logits, int64_t N, int64_t v0, int64_t len, const acc_t* thr, acc_t* probs,
                 int64_t ld, Prob prob) {
  at::parallel_for(0, N, row_grain(len), [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> x(len);
    for (int64_t n = n0; n < n1; ++n) {
      load_row(logits, n, v0, len, x.data());
      acc_t* p = probs + n * ld;
      for (int64_t j = 0; j < len; ++j) p[j] = x[j] >= thr[n] ? prob(n, x[j]) : acc_t(0);
    }
  });
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& logits_in, const at::Tensor& weight_in,
                                                         double temperature, int64_t top_k, double top_p) {
  const at::Tensor logits = logits_in.contiguous(), weight = weight_in.contiguous();
  const auto acc_opts = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t N = logits.size(0), V = logits.size(1), d = weight.size(1);
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  at::Tensor thr = at::empty({N}, acc_opts), lse = at::empty({N}, acc_opts);
  std::vector<acc_t> row_max(N), row_inv_sum(N);
  std::vector<int64_t> kept(N);
  acc_t* thr_p = thr.mutable_data_ptr<acc_t>();
  acc_t* lse_p = lse.mutable_data_ptr<acc_t>();

  at::parallel_for(0, N, row_grain(V), [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> x(V), v, w;
    for (int64_t n = n0; n < n1; ++n) {
      load_row(logits, n, 0, V, x.data());
      const RowStats<acc_t> st = row_stats(x.data(), V, inv_t, top_k, top_p, v, w);
      thr_p[n] = st.thr;
      lse_p[n] = static_cast<acc_t>(st.max * inv_t + std::log(st.sum));
      row_max[n] = st.max;
      row_inv_sum[n] = static_cast<acc_t>(1.0 / st.sum);
      kept[n] = st.kept;
    }
  });

  int64_t total_kept = 0;
  for (int64_t k : kept) total_kept += k;
  at::Tensor acc = at::zeros({N, d}, acc_opts);
  acc_t* acc_p = acc.mutable_data_ptr<acc_t>();
  if (use_gather(total_kept, N, V, d)) {
    at::parallel_for(0, N, row_grain(V), [&](int64_t n0, int64_t n1) {
      std::vector<acc_t> x(V), wrow(d);
      for (int64_t n = n0; n < n1; ++n) {
        load_row(logits, n, 0, V, x.data());
        acc_t* o = acc_p + n * d;
        for (int64_t i = 0; i < V; ++i) {
          if (!(x[i] >= thr_p[n])) continue;
          const acc_t p = std::exp((x[i] - row_max[n]) * inv_t) * row_inv_sum[n];
          load_row(weight, i, 0, d, wrow.data());
          for (int64_t j = 0; j < d; ++j) o[j] += p * wrow[j];
        }
      }
    });
  } else {
    at::Tensor probs = at::empty({N, std::min(kChunk, V)}, acc_opts);
    acc_t* probs_p = probs.mutable_data_ptr<acc_t>();
    const int64_t ld = probs.size(1);
    for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
      const int64_t len = std::min(kChunk, V - v0);
      probs_chunk(logits, N, v0, len, thr_p, probs_p, ld, [&](int64_t n, acc_t x) {
        return std::exp((x - row_max[n]) * inv_t) * row_inv_sum[n];
      });
      acc.addmm_(probs.narrow(1, 0, len), weight.narrow(0, v0, len).to(acc_opts.dtype()));
    }
  }
  return {acc.to(weight.scalar_type()), thr, lse};
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> bwd_impl(const at::Tensor& grad_out, const at::Tensor& logits_in,
                                            const at::Tensor& weight_in, const at::Tensor& thr_in,
                                            const at::Tensor& lse_in, double temperature, bool need_logits,
                                            bool need_weight) {
  const at::Tensor logits = logits_in.contiguous(), weight = weight_in.contiguous();
  const auto acc_opts = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t N = logits.size(0), V = logits.size(1), d = weight.size(1);
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const at::Tensor go = grad_out.to(acc_opts.dtype()).contiguous();
  const at::Tensor thr = thr_in.contiguous(), lse = lse_in.contiguous();
  const acc_t* go_p = go.const_data_ptr<acc_t>();
  const acc_t* thr_p = thr.const_data_ptr<acc_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  at::Tensor grad_logits = need_logits ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor grad_weight = need_weight ? at::empty_like(weight) : at::empty({0}, weight.options());
  if (!need_logits && !need_weight) return {grad_logits, grad_weight};

  // The kept set of each row, as in the forward (the filter is a constant selection here).
  std::vector<std::vector<int64_t>> idx(N);
  std::vector<std::vector<acc_t>> prob(N);
  at::parallel_for(0, N, row_grain(V), [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> x(V);
    for (int64_t n = n0; n < n1; ++n) {
      load_row(logits, n, 0, V, x.data());
      for (int64_t i = 0; i < V; ++i) {
        if (x[i] >= thr_p[n]) {
          idx[n].push_back(i);
          prob[n].push_back(std::exp(x[i] * inv_t - lse_p[n]));
        }
      }
    }
  });
  int64_t total_kept = 0;
  for (const auto& r : idx) total_kept += static_cast<int64_t>(r.size());

  if (use_gather(total_kept, N, V, d)) {
    if (need_logits) {
      at::parallel_for(0, N, row_grain(V), [&](int64_t n0, int64_t n1) {
        std::vector<acc_t> gl(V), wrow(d), g;
        for (int64_t n = n0; n < n1; ++n) {
          const acc_t* gon = go_p + n * d;
          const int64_t k = static_cast<int64_t>(idx[n].size());
          g.assign(k, acc_t(0));
          acc_t s = 0;
          for (int64_t t = 0; t < k; ++t) {
            load_row(weight, idx[n][t], 0, d, wrow.data());
            acc_t dot = 0;
            for (int64_t j = 0; j < d; ++j) dot += gon[j] * wrow[j];
            g[t] = dot;
            s += prob[n][t] * dot;
          }
          std::fill(gl.begin(), gl.end(), acc_t(0));
          for (int64_t t = 0; t < k; ++t) gl[idx[n][t]] = prob[n][t] * (g[t] - s) * inv_t;
          store_row(grad_logits, n, gl.data());
        }
      });
    }
    if (need_weight) {
      // Parallel over slices of d, so that rows kept by several n never race. A (V, d) buffer costs more in
      // page faults than the scatter itself: accumulate in grad_weight unless it is bf16/fp16.
      const bool direct = weight.scalar_type() == acc_opts.dtype();
      at::Tensor gw = direct ? grad_weight.zero_() : at::zeros({V, d}, acc_opts);
      acc_t* gw_p = gw.mutable_data_ptr<acc_t>();
      at::parallel_for(0, d, std::max<int64_t>(64, (int64_t{1} << 16) / std::max<int64_t>(1, total_kept)),
                       [&](int64_t j0, int64_t j1) {
        for (int64_t n = 0; n < N; ++n) {
          const acc_t* gon = go_p + n * d;
          for (size_t t = 0; t < idx[n].size(); ++t) {
            acc_t* dst = gw_p + idx[n][t] * d;
            const acc_t p = prob[n][t];
            for (int64_t j = j0; j < j1; ++j) dst[j] += p * gon[j];
          }
        }
      });
      if (!direct) grad_weight.copy_(gw);
    }
    return {grad_logits, grad_weight};
  }

  // Dense path, chunk by chunk over the vocabulary: G = dOut W^T gives p * g, then with
  // s = sum_i p_i g_i (complete only after the last chunk) grad_logits = p (g - s) / T.
  const bool direct = logits.scalar_type() == acc_opts.dtype();
  at::Tensor pg = need_logits ? (direct ? grad_logits : at::empty({N, V}, acc_opts)) : at::Tensor();
  std::vector<acc_t> s(N, acc_t(0));
  at::Tensor probs = at::empty({N, std::min(kChunk, V)}, acc_opts);
  acc_t* probs_p = probs.mutable_data_ptr<acc_t>();
  const int64_t ld = probs.size(1);
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int64_t len = std::min(kChunk, V - v0);
    probs_chunk(logits, N, v0, len, thr_p, probs_p, ld,
                [&](int64_t n, acc_t x) { return std::exp(x * inv_t - lse_p[n]); });
    const at::Tensor p_chunk = probs.narrow(1, 0, len);
    const at::Tensor w_chunk = weight.narrow(0, v0, len).to(acc_opts.dtype());
    if (need_logits) {
      const at::Tensor g = at::mm(go, w_chunk.t()).contiguous();
      const acc_t* g_p = g.const_data_ptr<acc_t>();
      acc_t* pg_p = pg.mutable_data_ptr<acc_t>();
      at::parallel_for(0, N, row_grain(len), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          acc_t* dst = pg_p + n * V + v0;
          const acc_t* p = probs_p + n * ld;
          acc_t sn = 0;
          for (int64_t j = 0; j < len; ++j) {
            dst[j] = p[j] * g_p[n * len + j];
            sn += dst[j];
          }
          s[n] += sn;
        }
      });
    }
    if (need_weight) {
      at::Tensor dst = grad_weight.narrow(0, v0, len);
      if (weight.scalar_type() == acc_opts.dtype()) {
        at::mm_out(dst, p_chunk.t(), go);
      } else {
        dst.copy_(at::mm(p_chunk.t(), go));
      }
    }
  }
  if (need_logits) {
    acc_t* pg_p = pg.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t n0, int64_t n1) {
      std::vector<acc_t> x(V);
      for (int64_t n = n0; n < n1; ++n) {
        load_row(logits, n, 0, V, x.data());
        acc_t* row = pg_p + n * V;
        for (int64_t i = 0; i < V; ++i) {
          const acc_t p = x[i] >= thr_p[n] ? std::exp(x[i] * inv_t - lse_p[n]) : acc_t(0);
          row[i] = (row[i] - p * s[n]) * inv_t;
        }
      }
    });
    if (!direct) grad_logits.copy_(pg);
  }
  return {grad_logits, grad_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_embedding_fwd(const at::Tensor& logits, const at::Tensor& weight,
                                                                   double temperature, int64_t top_k, double top_p) {
  check_inputs(logits, weight, temperature, top_k, top_p);
  if (logits.scalar_type() == at::kDouble) return fwd_impl<double>(logits, weight, temperature, top_k, top_p);
  return fwd_impl<float>(logits, weight, temperature, top_k, top_p);
}

std::tuple<at::Tensor, at::Tensor> soft_embedding_bwd(const at::Tensor& grad_out, const at::Tensor& logits,
                                                      const at::Tensor& weight, const at::Tensor& threshold,
                                                      const at::Tensor& lse, double temperature,
                                                      std::array<bool, 2> output_mask) {
  check_inputs(logits, weight, temperature, 0, 1.0);
  const int64_t N = logits.size(0), d = weight.size(1);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  COCONUT_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == d,
                "grad_out must have shape (N, d) = (", N, ", ", d, "), got ", grad_out.sizes());
  check_float_dtype(grad_out, "grad_out");
  for (const auto& [t, name] : {std::pair{&threshold, "threshold"}, std::pair{&lse, "lse"}}) {
    COCONUT_CHECK(t->dim() == 1 && t->size(0) == N, name, " must have shape (N,) = (", N, ",), got ", t->sizes());
    COCONUT_CHECK(t->scalar_type() == acc_dtype, name, " must be ", acc_dtype, ", got ", t->scalar_type());
  }
  if (acc_dtype == at::kDouble)
    return bwd_impl<double>(grad_out, logits, weight, threshold, lse, temperature, output_mask[0], output_mask[1]);
  return bwd_impl<float>(grad_out, logits, weight, threshold, lse, temperature, output_mask[0], output_mask[1]);
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CPU, m) {
  m.impl("soft_embedding_fwd", &soft_embedding_fwd);
  m.impl("soft_embedding_bwd", &soft_embedding_bwd);
}

}  // namespace coconut
