// CUDA kernels of latent_attention (schemas in csrc/ops.cpp): the KV-cache append with rotary, a split-KV
// (flash-decoding) forward for the small query counts of decoding and latent passes, and a tiled,
// deterministic backward (dK/dV per key block, dQ per query block, no atomics). Passes with more query rows
// (prefix passes) run the tiled Triton forward instead: the dispatcher in coconut_kernels/ops/latent_attention.py
// routes them (cuda_forward_kernel).
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

// ---- backward: tiled, deterministic ---------------------------------------------------------------------
// The work split of flash-attention 2: delta = rowsum(dO * O) first; then one block per (b, kv head, key
// block) walks every query row of the kv head (all t, all G query heads of the group) and keeps the dK/dV of
// its keys in registers, adding them to the accumulators once: no other block touches those rows, so no
// atomics. One block per (b, kv head, query row block) walks the key blocks for dQ. Every sum runs in a fixed
// order, so two runs give bitwise equal results. fp32 on CUDA cores (no tensor cores). Tile sizes:
// launch_config.h; tests/test_latent_attention_cuda_bwd.py replays the same loops in PyTorch.

template <int DMAX>
struct BwdCfg {
  static constexpr int TPD = launch::bwd_tpd(DMAX);  // lanes per key (dK/dV) or per query row (dQ)
  // Lane dl holds the 4-dim chunks dl, dl + TPD, ...: chunk j starts at dim 4 * (dl + TPD * j).
  static constexpr int CHUNKS = DMAX / 4 / TPD;
  static constexpr int E = 4 * CHUNKS;
  static constexpr int BN = launch::bwd_key_block(DMAX);
  static constexpr int BM = launch::kBwdRowTile;
  static constexpr int BNQ = launch::bwd_dq_key_tile(DMAX);
  static_assert(CHUNKS * 4 * TPD == DMAX && TPD <= 32 && 32 % TPD == 0, "a key's lanes share one warp");
};

struct BwdParams {
  const void* grad_out;  // contiguous (B, Sq, Hq, D), as q, out and dq
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const float* lse;  // (B, Hq, Sq)
  float* delta;      // (B, Hq, Sq): rowsum(dO * O), written by bwd_delta_kernel
  void* dq;
  float* grad_k;  // contiguous fp32 (B, Tmax, Hkv, D)
  float* grad_v;
  Lengths L;
  Rotary R;
  CacheStrides ks, vs;
  int B, Sq, Hq, Hkv, D, Tmax;
  float scale, scale_log2;
  bool causal, aligned;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the W adjacent lanes that hold one row (every lane of the warp takes part).
template <int W>
__device__ __forceinline__ float lanes_sum(float x) {
#pragma unroll
  for (int off = W / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Element d of query row `row` rotated to position `pos` (no rotation past R.dim).
template <typename T>
__device__ __forceinline__ float rotated(const T* row, const Rotary& R, int d, int pos) {
  const RotCoef rc = rot_coef(R, d, pos, false);
  return static_cast<float>(row[d]) * rc.c + static_cast<float>(row[rc.partner]) * rc.s;
}

__device__ __forceinline__ float dot4(const float4& a, const float* b) {
  return a.x * b[0] + a.y * b[1] + a.z * b[2] + a.w * b[3];
}

// One warp per query row (b, t, hq).
template <typename T>
__global__ void __launch_bounds__(launch::kBwdThreads) bwd_delta_kernel(BwdParams p) {
  const int64_t row = (int64_t)blockIdx.x * launch::kBwdDeltaRowsPerBlock + threadIdx.x / 32;  // (b*Sq+t)*Hq+hq
  const int lane = threadIdx.x % 32;
  if (row >= (int64_t)p.B * p.Sq * p.Hq) return;  // warp-uniform
  const T* go = static_cast<const T*>(p.grad_out) + row * p.D;
  const T* o = static_cast<const T*>(p.out) + row * p.D;
  float part = 0.f;
  for (int d = lane; d < p.D; d += 32) part += static_cast<float>(go[d]) * static_cast<float>(o[d]);
  part = warp_sum(part);
  if (lane == 0) {
    const int hq = row % p.Hq;
    const int t = (row / p.Hq) % p.Sq;
    const int64_t b = row / p.Hq / p.Sq;
    p.delta[(b * p.Hq + hq) * p.Sq + t] = part;
  }
}

// Block (b, kv head, key block of BN keys), the key blocks of one (b, kv head) adjacent in x. Thread: key
// n0 + tid / TPD, lane tid % TPD. Query rows m = t * G + g are staged BM at a time in shared memory (q rotated);
// for each row every key's lanes form s = q.k and dp = dO.v, then dV += p dO, dK += dS q.
template <typename T, int DMAX>
__global__ void __launch_bounds__(launch::kBwdThreads) bwd_dkdv_kernel(BwdParams p) {
  using C = BwdCfg<DMAX>;
  __shared__ __align__(16) float q_s[C::BM][DMAX];
  __shared__ __align__(16) float do_s[C::BM][DMAX];
  __shared__ float lse_s[C::BM];  // log2 domain
  __shared__ float delta_s[C::BM];
  __shared__ int t_s[C::BM];

  const int nkb = (p.Tmax + C::BN - 1) / C::BN;
  const int kb = blockIdx.x % nkb;
  const int64_t bh = blockIdx.x / nkb;
  const int hkv = bh % p.Hkv;
  const int64_t b = bh / p.Hkv;
  const int G = p.Hq / p.Hkv;
  int cs, lp, nn;
  seq_lengths(p.L, b, p.Sq, cs, lp, nn);
  const int lo = max(lp, 0);
  const int hi = min(cs + nn, p.Tmax);  // keys that some valid query row sees: [lo, hi)
  const int n0 = kb * C::BN;
  if (n0 >= hi || n0 + C::BN <= lo) return;  // block-uniform: nothing to add

  const int dl = threadIdx.x % C::TPD;
  const int n = n0 + threadIdx.x / C::TPD;
  const bool key_ok = n >= lo && n < hi;
  const T* krow = static_cast<const T*>(p.k) + b * p.ks.b + (int64_t)n * p.ks.t + (int64_t)hkv * p.ks.h;
  const T* vrow = static_cast<const T*>(p.v) + b * p.vs.b + (int64_t)n * p.vs.t + (int64_t)hkv * p.vs.h;
  float kr[C::E], vr[C::E], dk[C::E], dv[C::E];
#pragma unroll
  for (int j = 0; j < C::CHUNKS; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int d = 4 * (dl + C::TPD * j) + i, e = 4 * j + i;
      kr[e] = key_ok && d < p.D ? static_cast<float>(krow[d]) : 0.f;
      vr[e] = key_ok && d < p.D ? static_cast<float>(vrow[d]) : 0.f;
      dk[e] = dv[e] = 0.f;
    }

  // Causal: row t sees key n0 only once cs + t >= n0.
  const int m_lo = p.causal ? max(n0 - cs, 0) * G : 0;
  const int m_hi = nn * G;
  const T* q = static_cast<const T*>(p.q);
  const T* go = static_cast<const T*>(p.grad_out);
  for (int m0 = m_lo; m0 < m_hi; m0 += C::BM) {
    __syncthreads();  // the previous tile is no longer read
    for (int i = threadIdx.x; i < C::BM * DMAX; i += launch::kBwdThreads) {
      const int r = i / DMAX, d = i % DMAX, m = m0 + r;
      float qv = 0.f, gv = 0.f;
      if (m < m_hi && d < p.D) {
        const int t = m / G;
        const int64_t row = ((b * p.Sq + t) * p.Hq + hkv * G + m % G) * p.D;
        qv = rotated(q + row, p.R, d, cs + t - lp);
        gv = static_cast<float>(go[row + d]);
      }
      q_s[r][d] = qv;
      do_s[r][d] = gv;
    }
    if (threadIdx.x < C::BM) {
      const int m = m0 + threadIdx.x;
      if (m < m_hi) {
        const int t = m / G;
        const int64_t idx = (b * p.Hq + hkv * G + m % G) * p.Sq + t;
        lse_s[threadIdx.x] = p.lse[idx] * kLog2e;
        delta_s[threadIdx.x] = p.delta[idx];
        t_s[threadIdx.x] = t;
      }
    }
    __syncthreads();
    const int rows = min(C::BM, m_hi - m0);
    for (int r = 0; r < rows; ++r) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int j = 0; j < C::CHUNKS; ++j) {
        const int d = 4 * (dl + C::TPD * j);
        s += dot4(*reinterpret_cast<const float4*>(&q_s[r][d]), &kr[4 * j]);
        dp += dot4(*reinterpret_cast<const float4*>(&do_s[r][d]), &vr[4 * j]);
      }
      s = lanes_sum<C::TPD>(s);
      dp = lanes_sum<C::TPD>(dp);
      const bool ok = key_ok && (!p.causal || n <= cs + t_s[r]);
      const float pr = ok ? exp2f(s * p.scale_log2 - lse_s[r]) : 0.f;
      const float ds = pr * (dp - delta_s[r]);
#pragma unroll
      for (int j = 0; j < C::CHUNKS; ++j) {
        const int d = 4 * (dl + C::TPD * j);
        const float4 qv = *reinterpret_cast<const float4*>(&q_s[r][d]);
        const float4 gv = *reinterpret_cast<const float4*>(&do_s[r][d]);
        dv[4 * j] += pr * gv.x;
        dv[4 * j + 1] += pr * gv.y;
        dv[4 * j + 2] += pr * gv.z;
        dv[4 * j + 3] += pr * gv.w;
        dk[4 * j] += ds * qv.x;
        dk[4 * j + 1] += ds * qv.y;
        dk[4 * j + 2] += ds * qv.z;
        dk[4 * j + 3] += ds * qv.w;
      }
    }
  }
  if (!key_ok) return;
  // This block owns rows [n0, n0 + BN) of kv head hkv: a plain read-add-write, once.
  const int64_t g_off = ((b * p.Tmax + n) * p.Hkv + hkv) * p.D;
#pragma unroll
  for (int j = 0; j < C::CHUNKS; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int d = 4 * (dl + C::TPD * j) + i;
      if (d < p.D) {
        p.grad_k[g_off + d] += dk[4 * j + i] * p.scale;
        p.grad_v[g_off + d] += dv[4 * j + i];
      }
    }
}

// Block (b, kv head, block of RB query rows m = t * G + g), the row blocks of one (b, kv head) adjacent in x.
// Thread: row tid / TPD % RB, lane tid % TPD, key lane tid / (TPD * RB) of KSPLIT; the key lanes of a row take
// every KSPLIT-th key of each staged K/V tile and are summed in a fixed order at the end (KSPLIT > 1 keeps
// the threads busy when the pass has few rows, as at decode).
template <typename T, int DMAX, int KSPLIT>
__global__ void __launch_bounds__(launch::kBwdThreads) bwd_dq_kernel(BwdParams p) {
  using C = BwdCfg<DMAX>;
  constexpr int RB = launch::bwd_dq_rows(DMAX, KSPLIT);
  constexpr int kTile = C::BNQ * DMAX;
  constexpr int kRed = KSPLIT * RB * DMAX;
  static_assert(C::BNQ % KSPLIT == 0 && RB * C::TPD >= 32, "uniform trip counts; a warp shares one key lane");
  // The K and V tiles while the keys are walked, then each key lane's partial dq.
  __shared__ __align__(16) float smem[2 * kTile > kRed ? 2 * kTile : kRed];
  float* k_s = smem;
  float* v_s = smem + kTile;

  const int G = p.Hq / p.Hkv;
  const int rows_total = p.Sq * G;
  const int nrb = (rows_total + RB - 1) / RB;
  const int rb = blockIdx.x % nrb;
  const int64_t bh = blockIdx.x / nrb;
  const int hkv = bh % p.Hkv;
  const int64_t b = bh / p.Hkv;
  int cs, lp, nn;
  seq_lengths(p.L, b, p.Sq, cs, lp, nn);

  const int dl = threadIdx.x % C::TPD;
  const int r = (threadIdx.x / C::TPD) % RB;
  const int kl = threadIdx.x / (C::TPD * RB);
  const int m = rb * RB + r;
  const int t = m / G;
  const int hq = hkv * G + m % G;
  const bool row_ok = m < rows_total && t < nn;
  const int64_t row = (b * p.Sq + t) * p.Hq + hq;
  float qr[C::E], gr[C::E], dq[C::E];
#pragma unroll
  for (int j = 0; j < C::CHUNKS; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int d = 4 * (dl + C::TPD * j) + i, e = 4 * j + i;
      const bool in = row_ok && d < p.D;
      qr[e] = in ? rotated(static_cast<const T*>(p.q) + row * p.D, p.R, d, cs + t - lp) : 0.f;
      gr[e] = in ? static_cast<float>(static_cast<const T*>(p.grad_out)[row * p.D + d]) : 0.f;
      dq[e] = 0.f;
    }
  const int64_t stat = (b * p.Hq + hq) * p.Sq + t;
  const float lse2 = row_ok ? p.lse[stat] * kLog2e : 0.f;
  const float delta = row_ok ? p.delta[stat] : 0.f;
  const int row_hi = min(p.causal ? cs + t + 1 : cs + nn, p.Tmax);  // this row sees keys [lo, row_hi)

  // The block's key range: up to its last valid row's end; empty when no row is valid.
  const int lo = max(lp, 0);
  const int t_first = rb * RB / G;
  const int t_last = min((min(rb * RB + RB, rows_total) - 1) / G, nn - 1);
  const int hi = t_last >= t_first ? min(p.causal ? cs + t_last + 1 : cs + nn, p.Tmax) : lo;
  const T* kbase = static_cast<const T*>(p.k) + b * p.ks.b + (int64_t)hkv * p.ks.h;
  const T* vbase = static_cast<const T*>(p.v) + b * p.vs.b + (int64_t)hkv * p.vs.h;
  constexpr int VEC = Vec<T>::N, NV = DMAX / VEC;
  for (int n0 = lo; n0 < hi; n0 += C::BNQ) {
    __syncthreads();  // the previous tile is no longer read
    for (int i = threadIdx.x; i < C::BNQ * NV; i += launch::kBwdThreads) {
      const int c = i / NV, d0 = (i % NV) * VEC, nk = n0 + c;
      const int valid = nk < hi ? min(max(p.D - d0, 0), VEC) : 0;
      float kx[VEC], vx[VEC];
      if (valid > 0) {
        Vec<T>::load(kbase + (int64_t)nk * p.ks.t + d0, kx, valid, p.aligned);
        Vec<T>::load(vbase + (int64_t)nk * p.vs.t + d0, vx, valid, p.aligned);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) kx[e] = vx[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        k_s[c * DMAX + d0 + e] = kx[e];
        v_s[c * DMAX + d0 + e] = vx[e];
      }
    }
    __syncthreads();
    for (int c = kl; c < C::BNQ; c += KSPLIT) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int j = 0; j < C::CHUNKS; ++j) {
        const int d = c * DMAX + 4 * (dl + C::TPD * j);
        s += dot4(*reinterpret_cast<const float4*>(&k_s[d]), &qr[4 * j]);
        dp += dot4(*reinterpret_cast<const float4*>(&v_s[d]), &gr[4 * j]);
      }
      s = lanes_sum<C::TPD>(s);
      dp = lanes_sum<C::TPD>(dp);
      const bool ok = row_ok && n0 + c < row_hi;  // n0 + c >= lo by the loop
      const float ds = ok ? exp2f(s * p.scale_log2 - lse2) * (dp - delta) : 0.f;
#pragma unroll
      for (int j = 0; j < C::CHUNKS; ++j) {
        const float4 kv = *reinterpret_cast<const float4*>(&k_s[c * DMAX + 4 * (dl + C::TPD * j)]);
        dq[4 * j] += ds * kv.x;
        dq[4 * j + 1] += ds * kv.y;
        dq[4 * j + 2] += ds * kv.z;
        dq[4 * j + 3] += ds * kv.w;
      }
    }
  }

  __syncthreads();  // the K/V tiles are no longer read: the buffer takes the partial dq of each key lane
  float* red = smem;  // [KSPLIT][RB][DMAX]
#pragma unroll
  for (int j = 0; j < C::CHUNKS; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[(kl * RB + r) * DMAX + 4 * (dl + C::TPD * j) + i] = dq[4 * j + i];
  __syncthreads();
  if (KSPLIT > 1) {  // key lane 0's slots take the sum, in key-lane order
    for (int i = threadIdx.x; i < RB * DMAX; i += launch::kBwdThreads) {
      float acc = red[i];
      for (int k = 1; k < KSPLIT; ++k) acc += red[k * RB * DMAX + i];
      red[i] = acc;
    }
    __syncthreads();
  }
  // dq of the un-rotated q: the transposed rotation mixes dims held by other lanes, hence through red.
  T* dq_out = static_cast<T*>(p.dq);
  for (int i = threadIdx.x; i < RB * DMAX; i += launch::kBwdThreads) {
    const int rr = i / DMAX, d = i % DMAX, mm = rb * RB + rr;
    if (mm >= rows_total || d >= p.D) continue;
    const int tt = mm / G;
    const float* x = red + rr * DMAX;
    const RotCoef rc = rot_coef(p.R, d, cs + tt - lp, true);
    const float val = tt < nn ? (x[d] * rc.c + x[rc.partner] * rc.s) * p.scale : 0.f;  // rows past new_seqlens: 0
    dq_out[((b * p.Sq + tt) * p.Hq + hkv * G + mm % G) * p.D + d] = T(val);
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
  switch (launch::head_dim_tile(D)) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 256>{});
  }
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
  at::Tensor delta = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(at::kFloat));
  BwdParams p{go.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), o.data_ptr(), l.data_ptr<float>(),
              delta.data_ptr<float>(), dq.data_ptr(), grad_k_cache.data_ptr<float>(),
              grad_v_cache.data_ptr<float>(), lengths_of(cache_seqlens, cache_leftpad, new_seqlens), rot.args,
              strides_of(k_cache), strides_of(v_cache), (int)d.B, (int)d.Sq, (int)d.Hq, (int)d.Hkv, (int)d.D,
              (int)d.Tmax, (float)softmax_scale, (float)(softmax_scale * kLog2e), causal,
              aligned16(k_cache) && aligned16(v_cache)};
  const launch::Shape delta_shape = launch::bwd_delta_shape(d.B, d.Sq, d.Hq);
  const launch::Shape dkdv_shape = launch::bwd_dkdv_shape(d.B, d.Hkv, d.Tmax, d.D);
  const launch::Shape dq_shape = launch::bwd_dq_shape(d.B, d.Sq, d.Hq, d.Hkv, d.D);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bwd_delta_kernel<T><<<(unsigned)delta_shape.grid_x, launch::kBwdThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_head_dim(d.D, [&](auto dmax) {
      constexpr int DM = decltype(dmax)::value;
      if (dkdv_shape.grid_x > 0) {  // Tmax = 0: no key, nothing to add
        bwd_dkdv_kernel<T, DM><<<(unsigned)dkdv_shape.grid_x, launch::kBwdThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (dq_shape.key_split == 1) {
        bwd_dq_kernel<T, DM, 1><<<(unsigned)dq_shape.grid_x, launch::kBwdThreads, 0, stream>>>(p);
      } else {
        bwd_dq_kernel<T, DM, launch::kBwdKeySplit><<<(unsigned)dq_shape.grid_x, launch::kBwdThreads, 0, stream>>>(p);
      }
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
