// CUDA kernels of latent_attention (schemas in csrc/ops.cpp): the KV-cache append with rotary, a split-KV
// (flash-decoding) forward for the small query counts of decoding and latent passes, and a simple backward
// (one block per query row, fp32 atomics into the gradient accumulators). The tiled Triton kernels
// (coconut_kernels/triton/latent_attention.py) are the alternative for long query blocks (prefix passes).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "../dropout.h"
#include "../latent_attention_checks.h"
#include "launch_config.h"

namespace coconut {
namespace {

constexpr int kThreads = launch::kAttnThreads;
constexpr int kWarps = kThreads / 32;
// Query heads of one GQA group handled by one forward block: each K/V row it loads serves all of them.
constexpr int kGroupTile = launch::kGroupTile;
// Keys each lane group loads before using any, so that enough bytes are in flight to saturate HBM.
constexpr int kUnroll = 2;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

struct Lengths {  // device pointers; null means the default (leftpad 0, Sq new rows)
  const int32_t* cache_seqlens;
  const int32_t* cache_leftpad;
  const int32_t* new_seqlens;
};

struct Rotary {  // fp32 tables (seqlen, dim / 2); dim 0 means no rotation
  const float* cos;
  const float* sin;
  int seqlen, dim;
  bool interleaved;
};

__device__ __forceinline__ void seq_lengths(const Lengths& L, int64_t b, int Sq, int& cs, int& lp, int& nn) {
  cs = L.cache_seqlens[b];
  lp = L.cache_leftpad != nullptr ? L.cache_leftpad[b] : 0;
  nn = L.new_seqlens != nullptr ? min(max(L.new_seqlens[b], 0), Sq) : Sq;
}

// Rotated element d: y[d] = x[d] * c + x[partner] * s (s carries the sign; inverse = the transpose).
struct RotCoef {
  int partner;
  float c, s;
};

__device__ __forceinline__ RotCoef rot_coef(const Rotary& R, int d, int pos, bool inverse) {
  RotCoef r{d, 1.f, 0.f};
  if (d >= R.dim) return r;
  const int half = R.dim / 2;
  int freq;
  float sign;
  if (R.interleaved) {
    r.partner = d ^ 1;
    freq = d >> 1;
    sign = (d & 1) ? 1.f : -1.f;
  } else if (d < half) {
    r.partner = d + half;
    freq = d;
    sign = -1.f;
  } else {
    r.partner = d - half;
    freq = d - half;
    sign = 1.f;
  }
  pos = min(max(pos, 0), R.seqlen - 1);
  r.c = R.cos[(int64_t)pos * half + freq];
  r.s = (inverse ? -sign : sign) * R.sin[(int64_t)pos * half + freq];
  return r;
}

// 16-byte vectors of T, converted to fp32; the scalar path handles ragged tails and unaligned tensors.
template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* p, float* out, int valid, bool aligned) {
    if (aligned && valid == N) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = static_cast<float>(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = i < valid ? static_cast<float>(p[i]) : 0.f;
    }
  }
  __device__ __forceinline__ static void store(T* p, const float* in, int valid, bool aligned) {
    if (aligned && valid == N) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < N; ++i) e[i] = T(in[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      for (int i = 0; i < valid; ++i) p[i] = T(in[i]);
    }
  }
};

// ---- append ---------------------------------------------------------------------------------------------

struct CacheStrides {
  int64_t b, t, h;
};

// One block per (b, t) new row; k_new / v_new contiguous (B, Sq, H, D).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    append_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k_new,
                  const T* __restrict__ v_new, Lengths L, Rotary R, CacheStrides ks, CacheStrides vs, int Sq, int H,
                  int D, int Tmax, bool aligned) {
  constexpr int N = Vec<T>::N;
  const int64_t b = blockIdx.x / Sq;
  const int t = blockIdx.x % Sq;
  int cs, lp, nn;
  seq_lengths(L, b, Sq, cs, lp, nn);
  const int row = cs + t;
  if (t >= nn || row < 0 || row >= Tmax) return;  // never write outside the cache, whatever the lengths
  const int pos = row - lp;
  const int64_t src = (b * Sq + t) * H * D;
  const int chunks = (D + N - 1) / N;
  for (int i = threadIdx.x; i < H * chunks; i += blockDim.x) {
    const int h = i / chunks, d0 = (i % chunks) * N, valid = min(N, D - d0);
    const T* kn = k_new + src + (int64_t)h * D;
    float x[N], y[N];
    Vec<T>::load(kn + d0, x, valid, aligned);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      y[j] = x[j];
      if (j < valid && d0 + j < R.dim) {
        const RotCoef rc = rot_coef(R, d0 + j, pos, false);
        y[j] = x[j] * rc.c + static_cast<float>(kn[rc.partner]) * rc.s;
      }
    }
    Vec<T>::store(k_cache + b * ks.b + row * ks.t + h * ks.h + d0, y, valid, aligned);
    Vec<T>::load(v_new + src + (int64_t)h * D + d0, x, valid, aligned);
    Vec<T>::store(v_cache + b * vs.b + row * vs.t + h * vs.h + d0, x, valid, aligned);
  }
}

// ---- forward: split-KV ----------------------------------------------------------------------------------

// Lane layout: a "lane group" of TPK lanes holds one key row (each lane ELEMS contiguous-by-vector elements);
// a warp holds KPW keys, the block GROUPS keys at a time.
template <typename T, int DMAX>
struct FwdCfg {
  static constexpr int VEC = Vec<T>::N;
  static constexpr int NVEC = DMAX / VEC;
  static constexpr int TPK = NVEC < 32 ? NVEC : 32;
  static constexpr int EPL = NVEC / TPK;
  static constexpr int ELEMS = EPL * VEC;
  static constexpr int KPW = 32 / TPK;
  static constexpr int GROUPS = kWarps * KPW;
};

struct FwdParams {
  const void* q;  // contiguous (B, Sq, Hq, D)
  const void* k;
  const void* v;
  void* out;        // contiguous (B, Sq, Hq, D)
  float* lse;       // (B, Hq, Sq)
  float* part_out;  // (splits, B*Sq*Hq, D), only when splits > 1
  float* part_lse;  // (splits, B*Sq*Hq)
  Lengths L;
  Rotary R;
  CacheStrides ks, vs;
  int Sq, Hq, Hkv, D, Tmax, splits;
  float scale_log2;
  bool causal, aligned;
};

// Block (row = (b, t, kv head), split, group tile): the query heads g0.. of the group attend the split's
// share of the row's key range with an online softmax; the partial results (normalised out, lse) go to the
// combine kernel, or straight to out / lse when there is one split.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) fwd_split_kernel(FwdParams p) {
  using C = FwdCfg<T, DMAX>;
  __shared__ float q_s[kGroupTile][DMAX];
  __shared__ float red_acc[C::GROUPS][kGroupTile][DMAX];
  __shared__ float red_m[C::GROUPS][kGroupTile];
  __shared__ float red_l[C::GROUPS][kGroupTile];

  const int G = p.Hq / p.Hkv;
  const int64_t rowblk = blockIdx.x;
  const int hkv = rowblk % p.Hkv;
  const int t = (rowblk / p.Hkv) % p.Sq;
  const int64_t b = rowblk / p.Hkv / p.Sq;
  const int split = blockIdx.y;
  const int g0 = blockIdx.z * kGroupTile;
  const int ng = min(kGroupTile, G - g0);
  int cs, lp, nn;
  seq_lengths(p.L, b, p.Sq, cs, lp, nn);
  const int lo = max(lp, 0);
  const int hi = min(p.causal ? cs + t + 1 : cs + nn, p.Tmax);
  const int len = t < nn ? max(hi - lo, 0) : 0;
  const int chunk = (len + p.splits - 1) / p.splits;
  const int k_begin = lo + split * chunk;
  const int k_end = min(k_begin + chunk, lo + len);

  // q of the group's heads, rotated and scaled into the log2 domain of the softmax.
  const T* q = static_cast<const T*>(p.q);
  const int pos = cs + t - lp;
  for (int i = threadIdx.x; i < kGroupTile * DMAX; i += kThreads) {
    const int g = i / DMAX, d = i % DMAX;
    float val = 0.f;
    if (g < ng && d < p.D) {
      const T* qr = q + ((b * p.Sq + t) * p.Hq + hkv * G + g0 + g) * p.D;
      const RotCoef rc = rot_coef(p.R, d, pos, false);
      val = (static_cast<float>(qr[d]) * rc.c + static_cast<float>(qr[rc.partner]) * rc.s) * p.scale_log2;
    }
    q_s[g][d] = val;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = warp * C::KPW + lane / C::TPK;
  const int lt = lane % C::TPK;
  float qr[kGroupTile][C::ELEMS];
  float m[kGroupTile], l[kGroupTile], acc[kGroupTile][C::ELEMS];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
    m[g] = -1e30f;  // finite: an all-masked step then gives alpha = 1, p = 0, never NaN
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < C::EPL; ++e)
#pragma unroll
      for (int j = 0; j < C::VEC; ++j) {
        qr[g][e * C::VEC + j] = q_s[g][(lt + e * C::TPK) * C::VEC + j];
        acc[g][e * C::VEC + j] = 0.f;
      }
  }

  const T* kbase = static_cast<const T*>(p.k) + b * p.ks.b + hkv * p.ks.h;
  const T* vbase = static_cast<const T*>(p.v) + b * p.vs.b + hkv * p.vs.h;
  // Warp-uniform trip count (the shuffles need every lane); lanes past k_end mask their key.
  for (int base = k_begin; base < k_end; base += C::GROUPS * kUnroll) {
    float kf[kUnroll][C::ELEMS], vf[kUnroll][C::ELEMS];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = base + u * C::GROUPS + slot;
      ok[u] = r < k_end;
#pragma unroll
      for (int e = 0; e < C::EPL; ++e) {
        const int d0 = (lt + e * C::TPK) * C::VEC;
        const int valid = ok[u] ? min(max(p.D - d0, 0), C::VEC) : 0;
        if (valid > 0) {
          Vec<T>::load(kbase + (int64_t)r * p.ks.t + d0, &kf[u][e * C::VEC], valid, p.aligned);
          Vec<T>::load(vbase + (int64_t)r * p.vs.t + d0, &vf[u][e * C::VEC], valid, p.aligned);
        } else {
#pragma unroll
          for (int j = 0; j < C::VEC; ++j) kf[u][e * C::VEC + j] = vf[u][e * C::VEC + j] = 0.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float s[kGroupTile];
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < C::ELEMS; ++i) dot += qr[g][i] * kf[u][i];
        s[g] = dot;
      }
#pragma unroll
      for (int off = C::TPK / 2; off > 0; off /= 2)
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], off);
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        const float sg = ok[u] ? s[g] : -INFINITY;
        const float m_new = fmaxf(m[g], sg);
        const float alpha = exp2f(m[g] - m_new);
        const float pr = exp2f(sg - m_new);
        l[g] = l[g] * alpha + pr;
#pragma unroll
        for (int i = 0; i < C::ELEMS; ++i) acc[g][i] = acc[g][i] * alpha + pr * vf[u][i];
        m[g] = m_new;
      }
    }
  }

  // Merge the lane groups' softmax states through shared memory.
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
    if (lt == 0) {
      red_m[slot][g] = m[g];
      red_l[slot][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < C::EPL; ++e)
#pragma unroll
      for (int j = 0; j < C::VEC; ++j) red_acc[slot][g][(lt + e * C::TPK) * C::VEC + j] = acc[g][e * C::VEC + j];
  }
  __syncthreads();
  const int64_t rows = (int64_t)gridDim.x / p.Hkv * p.Hq;  // B * Sq * Hq
  for (int i = threadIdx.x; i < ng * DMAX; i += kThreads) {
    const int g = i / DMAX, d = i % DMAX;
    if (d >= p.D) continue;
    float M = -1e30f;
    for (int s = 0; s < C::GROUPS; ++s) M = fmaxf(M, red_m[s][g]);
    float Lsum = 0.f, O = 0.f;
    for (int s = 0; s < C::GROUPS; ++s) {
      const float w = exp2f(red_m[s][g] - M);
      Lsum += red_l[s][g] * w;
      O += red_acc[s][g][d] * w;
    }
    const int hq = hkv * G + g0 + g;
    const int64_t row = (b * p.Sq + t) * p.Hq + hq;
    const float o = Lsum > 0.f ? O / Lsum : 0.f;
    const float lse = Lsum > 0.f ? (M + log2f(Lsum)) * kLn2 : -INFINITY;
    if (p.splits == 1) {
      static_cast<T*>(p.out)[row * p.D + d] = T(o);
      if (d == 0) p.lse[(b * p.Hq + hq) * p.Sq + t] = lse;
    } else {
      p.part_out[(split * rows + row) * p.D + d] = o;
      if (d == 0) p.part_lse[split * rows + row] = lse;
    }
  }
}

// One block per query row (b, t, hq): out = Σ_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fwd_combine_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse, T* __restrict__ out,
                       float* __restrict__ lse, int splits, int64_t rows, int Sq, int Hq, int D) {
  const int64_t row = blockIdx.x;
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, part_lse[s * rows + row]);
  float wsum = 0.f;
  for (int s = 0; s < splits; ++s) wsum += M == -INFINITY ? 0.f : __expf(part_lse[s * rows + row] - M);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    if (wsum > 0.f)
      for (int s = 0; s < splits; ++s) o += __expf(part_lse[s * rows + row] - M) * part_out[(s * rows + row) * D + d];
    out[row * D + d] = T(wsum > 0.f ? o / wsum : 0.f);
  }
  if (threadIdx.x == 0) {
    const int hq = row % Hq;
    const int t = (row / Hq) % Sq;
    const int64_t b = row / Hq / Sq;
    lse[(b * Hq + hq) * Sq + t] = wsum > 0.f ? M + __logf(wsum) : -INFINITY;
  }
}

// ---- backward -------------------------------------------------------------------------------------------

struct BwdParams {
  const void* grad_out;  // contiguous (B, Sq, Hq, D), as q, out and dq
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const float* lse;
  void* dq;
  float* grad_k;  // contiguous fp32 (B, Tmax, Hkv, D)
  float* grad_v;
  Lengths L;
  Rotary R;
  CacheStrides ks, vs;
  int Sq, Hq, Hkv, D, Tmax;
  float scale;
  bool causal;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// One block per query row: warps walk the keys, lanes the head dims; dK/dV go to the fp32 accumulators with
// atomics (rows of one key are shared by every query row and head of the group), dq is un-rotated at the end.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) bwd_row_kernel(BwdParams p) {
  constexpr int PER_LANE = DMAX / 32;
  __shared__ float vec_s[DMAX];
  __shared__ float dq_s[kWarps][DMAX];
  __shared__ float red_s[kWarps];

  const int64_t row = blockIdx.x;  // (b * Sq + t) * Hq + hq
  const int hq = row % p.Hq;
  const int t = (row / p.Hq) % p.Sq;
  const int64_t b = row / p.Hq / p.Sq;
  const int hkv = hq / (p.Hq / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int cs, lp, nn;
  seq_lengths(p.L, b, p.Sq, cs, lp, nn);
  T* dq = static_cast<T*>(p.dq) + row * p.D;
  if (t >= nn) {  // rows past new_seqlens contribute nothing
    for (int d = threadIdx.x; d < p.D; d += kThreads) dq[d] = T(0.f);
    return;
  }
  const int pos = cs + t - lp;
  const T* qr = static_cast<const T*>(p.q) + row * p.D;
  const T* go = static_cast<const T*>(p.grad_out) + row * p.D;
  const T* o = static_cast<const T*>(p.out) + row * p.D;
  float part = 0.f;
  for (int d = threadIdx.x; d < DMAX; d += kThreads) {
    float val = 0.f;
    if (d < p.D) {
      const RotCoef rc = rot_coef(p.R, d, pos, false);
      val = static_cast<float>(qr[d]) * rc.c + static_cast<float>(qr[rc.partner]) * rc.s;
      part += static_cast<float>(go[d]) * static_cast<float>(o[d]);
    }
    vec_s[d] = val;
  }
  part = warp_sum(part);
  if (lane == 0) red_s[warp] = part;
  __syncthreads();
  float delta = 0.f;  // rowsum(dO * O)
  for (int w = 0; w < kWarps; ++w) delta += red_s[w];
  const float lse = p.lse[(b * p.Hq + hq) * p.Sq + t];

  float qv[PER_LANE], gv[PER_LANE], dqv[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int d = lane + 32 * j;
    qv[j] = vec_s[d];
    gv[j] = d < p.D ? static_cast<float>(go[d]) : 0.f;
    dqv[j] = 0.f;
  }
  const int lo = max(lp, 0);
  const int hi = min(p.causal ? cs + t + 1 : cs + nn, p.Tmax);
  const T* kbase = static_cast<const T*>(p.k) + b * p.ks.b + hkv * p.ks.h;
  const T* vbase = static_cast<const T*>(p.v) + b * p.vs.b + hkv * p.vs.h;
  for (int r = lo + warp; r < hi; r += kWarps) {
    float kv[PER_LANE], vv[PER_LANE];
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int d = lane + 32 * j;
      kv[j] = d < p.D ? static_cast<float>(kbase[(int64_t)r * p.ks.t + d]) : 0.f;
      vv[j] = d < p.D ? static_cast<float>(vbase[(int64_t)r * p.vs.t + d]) : 0.f;
      s += qv[j] * kv[j];
      dp += gv[j] * vv[j];
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    const float pr = __expf(s * p.scale - lse);
    const float ds = pr * (dp - delta) * p.scale;
    const int64_t g_off = ((b * p.Tmax + r) * p.Hkv + hkv) * p.D;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int d = lane + 32 * j;
      if (d < p.D) {
        atomicAdd(p.grad_v + g_off + d, pr * gv[j]);
        atomicAdd(p.grad_k + g_off + d, ds * qv[j]);
        dqv[j] += ds * kv[j];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) dq_s[warp][lane + 32 * j] = dqv[j];
  __syncthreads();
  for (int d = threadIdx.x; d < DMAX; d += kThreads) {
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += dq_s[w][d];
    vec_s[d] = sum;  // dq of the rotated q
  }
  __syncthreads();
  for (int d = threadIdx.x; d < p.D; d += kThreads) {
    const RotCoef rc = rot_coef(p.R, d, pos, true);
    dq[d] = T(vec_s[d] * rc.c + vec_s[rc.partner] * rc.s);
  }
}

// ---- host side ------------------------------------------------------------------------------------------

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: COCONUT_CHECK(false, "the CUDA kernels of latent_attention take float32, float16 or bfloat16, got ", st);
  }
}

// Register tiles are sized by the head dim rounded up to 64, 128 or 256 (D <= 256 is checked).
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  if (D <= 64) f(std::integral_constant<int, 64>{});
  else if (D <= 128) f(std::integral_constant<int, 128>{});
  else f(std::integral_constant<int, 256>{});
}

Lengths lengths_of(const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                   const std::optional<at::Tensor>& new_seqlens) {
  return {cache_seqlens.data_ptr<int32_t>(), cache_leftpad ? cache_leftpad->data_ptr<int32_t>() : nullptr,
          new_seqlens ? new_seqlens->data_ptr<int32_t>() : nullptr};
}

// The tables travel as contiguous fp32 (a tiny copy that a CUDA graph captures like any kernel).
struct RotaryTables {
  at::Tensor cos, sin;
  Rotary args{nullptr, nullptr, 1, 0, false};
  RotaryTables(const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& s, bool interleaved) {
    if (!c.has_value()) return;
    cos = c->to(at::kFloat).contiguous();
    sin = s->to(at::kFloat).contiguous();
    args = {cos.data_ptr<float>(), sin.data_ptr<float>(), (int)cos.size(0), (int)(2 * cos.size(1)), interleaved};
  }
};

void check_cuda_dtype(const at::Tensor& k_cache) {
  COCONUT_CHECK(k_cache.scalar_type() != at::kDouble,
                "the CUDA kernels of latent_attention take float32, float16 or bfloat16, got float64 (use CPU "
                "tensors for float64)");
}

bool aligned16(const at::Tensor& t) {
  const int64_t n = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.size(-1) % n == 0 && t.stride(0) % n == 0 &&
         t.stride(1) % n == 0 && t.stride(2) % n == 0;
}

CacheStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void kv_cache_append_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                          const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                          const std::optional<at::Tensor>& new_seqlens, const std::optional<at::Tensor>& rotary_cos,
                          const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved) {
  const auto d = check_latent_attention_args(at::Tensor(), k_new, v_new, k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  check_cuda_dtype(k_cache);
  if (d.B == 0 || d.Sq == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor kn = k_new.contiguous(), vn = v_new.contiguous();
  const RotaryTables rot(rotary_cos, rotary_sin, rotary_interleaved);
  const bool aligned = aligned16(k_cache) && aligned16(v_cache) && aligned16(kn) && aligned16(vn);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(k_cache.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    append_kernel<T><<<(unsigned)launch::append_shape(d.B, d.Sq).grid_x, kThreads, 0, stream>>>(
        static_cast<T*>(k_cache.data_ptr()), static_cast<T*>(v_cache.data_ptr()),
        static_cast<const T*>(kn.data_ptr()), static_cast<const T*>(vn.data_ptr()),
        lengths_of(cache_seqlens, cache_leftpad, new_seqlens), rot.args, strides_of(k_cache), strides_of(v_cache),
        (int)d.Sq, (int)d.Hkv, (int)d.D, (int)d.Tmax, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// These kernels have no attention dropout: the op's Python entry point sends calls with dropout_p > 0 to the
// Triton kernels (or the reference), so a direct call with dropout is refused rather than silently not dropped.
void check_no_dropout(double dropout_p, int64_t dropout_seed) {
  const Dropout drop(dropout_p, dropout_seed);  // the argument checks every backend makes
  COCONUT_CHECK(!drop.on(), "the CUDA C++ kernels of latent_attention have no attention dropout (dropout_p = ",
                dropout_p, "); run with dropout_p = 0, or use the Triton backend (set_backend(\"triton\"))");
}

std::tuple<at::Tensor, at::Tensor> latent_attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& new_seqlens,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
    double softmax_scale, bool causal, double dropout_p, int64_t dropout_seed) {
  const auto d = check_latent_attention_args(q_in, at::Tensor(), at::Tensor(), k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  check_no_dropout(dropout_p, dropout_seed);
  check_cuda_dtype(k_cache);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse.fill_(-INFINITY)};
  const RotaryTables rot(rotary_cos, rotary_sin, rotary_interleaved);
  const launch::Shape shape = launch::fwd_split_shape(
      d.B, d.Sq, d.Hq, d.Hkv, d.Tmax, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int splits = (int)shape.grid_y;
  const int64_t rows = launch::per_query_row_shape(d.B, d.Sq, d.Hq, "latent_attention forward").grid_x;
  at::Tensor part_out, part_lse;
  if (splits > 1) {
    part_out = at::empty({splits, rows, d.D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({splits, rows}, q.options().dtype(at::kFloat));
  }
  FwdParams p{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
              splits > 1 ? part_out.data_ptr<float>() : nullptr, splits > 1 ? part_lse.data_ptr<float>() : nullptr,
              lengths_of(cache_seqlens, cache_leftpad, new_seqlens), rot.args, strides_of(k_cache),
              strides_of(v_cache), (int)d.Sq, (int)d.Hq, (int)d.Hkv, (int)d.D, (int)d.Tmax, splits,
              (float)(softmax_scale * kLog2e), causal, aligned16(k_cache) && aligned16(v_cache)};
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid((unsigned)shape.grid_x, (unsigned)shape.grid_y, (unsigned)shape.grid_z);
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(d.D, [&](auto dmax) {
      fwd_split_kernel<T, decltype(dmax)::value><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (splits > 1) {
      fwd_combine_kernel<T><<<(unsigned)rows, kThreads, 0, stream>>>(
          p.part_out, p.part_lse, static_cast<T*>(out.data_ptr()), lse.data_ptr<float>(), splits, rows, (int)d.Sq,
          (int)d.Hq, (int)d.D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, lse};
}

at::Tensor latent_attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
                                     const std::optional<at::Tensor>& new_seqlens,
                                     const std::optional<at::Tensor>& rotary_cos,
                                     const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
                                     double softmax_scale, bool causal, at::Tensor& grad_k_cache,
                                     at::Tensor& grad_v_cache, double dropout_p, int64_t dropout_seed) {
  const auto d = check_latent_attention_args(q_in, at::Tensor(), at::Tensor(), k_cache, v_cache, cache_seqlens,
                                             cache_leftpad, new_seqlens, rotary_cos, rotary_sin);
  check_latent_attention_bwd_args(d, q_in, grad_out, out, lse, k_cache, grad_k_cache, grad_v_cache);
  check_no_dropout(dropout_p, dropout_seed);
  check_cuda_dtype(k_cache);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  at::Tensor dq = at::empty_like(q);
  if (q.numel() == 0) return dq;
  const RotaryTables rot(rotary_cos, rotary_sin, rotary_interleaved);
  BwdParams p{go.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), o.data_ptr(), l.data_ptr<float>(),
              dq.data_ptr(), grad_k_cache.data_ptr<float>(), grad_v_cache.data_ptr<float>(),
              lengths_of(cache_seqlens, cache_leftpad, new_seqlens), rot.args, strides_of(k_cache),
              strides_of(v_cache), (int)d.Sq, (int)d.Hq, (int)d.Hkv, (int)d.D, (int)d.Tmax, (float)softmax_scale,
              causal};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(d.D, [&](auto dmax) {
      const auto shape = launch::per_query_row_shape(d.B, d.Sq, d.Hq, "latent_attention backward");
      bwd_row_kernel<T, decltype(dmax)::value><<<(unsigned)shape.grid_x, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dq;
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CUDA, m) {
  m.impl("kv_cache_append_", &kv_cache_append_cuda);
  m.impl("latent_attention_fwd", &latent_attention_fwd_cuda);
  m.impl("latent_attention_bwd", &latent_attention_bwd_cuda);
}

}  // namespace coconut
