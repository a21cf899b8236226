// CUDA kernels of latent_feedback_ and latent_feedback_backward. One row per warp (d <= 1024) or per
// block, 16-byte loads where the rows allow, the row and its norm statistics in registers; bad indices
// skip their row (validated with a host sync only under COCONUT_DEBUG=1).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../latent_feedback.h"
#include "launch_config.h"

namespace coconut {
namespace {

constexpr int kWarp = launch::kWarp;
constexpr int kElemsPerThread = launch::kFeedbackElemsPerThread;

struct DevIndex {
  const void* p;
  bool wide;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return wide ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
  }
};

struct Geometry {
  DevIndex bat, dst, src;
  bool batched;
  int64_t n, d, B, T, S;
  int64_t e_bs, e_rs, h_bs, h_rs;  // strides of embeds (grad_embeds in backward) and hidden, in elements
};

__device__ __forceinline__ bool row_of(const Geometry& g, int64_t i, int64_t& b, int64_t& dst, int64_t& src) {
  b = g.batched ? g.bat[i] : 0;
  dst = g.dst[i];
  src = g.src[i];
  return b >= 0 && b < g.B && dst >= 0 && dst < g.T && src >= 0 && src < g.S;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename acc_t, typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* row, int64_t c, acc_t (&out)[VEC]) {
  const Pack<T, VEC> p = reinterpret_cast<const Pack<T, VEC>*>(row)[c];
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<acc_t>(p.v[k]);
}

// Sum over the threads of one row: its warp (blockDim.x == 32) or its whole block (blockDim.y == 1).
template <typename acc_t>
__device__ __forceinline__ acc_t row_sum(acc_t v, acc_t* shared) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (blockDim.x == kWarp) return v;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? shared[lane] : acc_t(0);
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Loads the row (x) in chunks of VEC elements, in registers when IN_REGS, and returns its mean (0 for
// RMSNorm) and rstd; xs[k] then holds x - mean for the k-th chunk of this thread.
template <typename acc_t, typename T, int VEC, bool IN_REGS, int NREG>
__device__ __forceinline__ void row_stats(const T* x, int64_t nchunks, int64_t d, int norm, acc_t eps,
                                          acc_t (&xs)[NREG][VEC], acc_t* shared, acc_t& mean, acc_t& rstd) {
  const int tid = threadIdx.x, G = blockDim.x;
  acc_t s = 0;
  if (IN_REGS) {
#pragma unroll
    for (int k = 0; k < NREG; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * G;
      if (c < nchunks) {
        load_pack<acc_t, T, VEC>(x, c, xs[k]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += xs[k][j];
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xs[k][j] = 0;
      }
    }
  } else {
    for (int64_t c = tid; c < nchunks; c += G) {
      acc_t v[VEC];
      load_pack<acc_t, T, VEC>(x, c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += v[j];
    }
  }
  mean = norm == static_cast<int>(FeedbackNorm::kLayerNorm) ? row_sum(s, shared) / static_cast<acc_t>(d) : acc_t(0);
  acc_t ss = 0;
  if (IN_REGS) {
#pragma unroll
    for (int k = 0; k < NREG; ++k) {
      if (tid + static_cast<int64_t>(k) * G < nchunks) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xs[k][j] -= mean;
          ss += xs[k][j] * xs[k][j];
        }
      }
    }
  } else {
    for (int64_t c = tid; c < nchunks; c += G) {
      acc_t v[VEC];
      load_pack<acc_t, T, VEC>(x, c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += (v[j] - mean) * (v[j] - mean);
    }
  }
  rstd = acc_t(1) / sqrt(row_sum(ss, shared) / static_cast<acc_t>(d) + eps);
}

template <typename T, typename W, typename acc_t, int VEC, bool IN_REGS>
__global__ void latent_feedback_fwd_kernel(T* __restrict__ E, const T* __restrict__ H, Geometry g,
                                           const W* __restrict__ weight, const W* __restrict__ bias, int norm,
                                           acc_t eps) {
  constexpr int NREG = IN_REGS ? kElemsPerThread / VEC : 1;
  __shared__ acc_t shared[kWarp];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  int64_t b, dst, src;
  if (i >= g.n || !row_of(g, i, b, dst, src)) return;  // uniform over the threads of a row
  const T* x = H + b * g.h_bs + src * g.h_rs;
  T* y = E + b * g.e_bs + dst * g.e_rs;
  const int64_t nchunks = g.d / VEC;
  const int tid = threadIdx.x, G = blockDim.x;
  if (norm == static_cast<int>(FeedbackNorm::kNone)) {
    for (int64_t c = tid; c < nchunks; c += G)
      reinterpret_cast<Pack<T, VEC>*>(y)[c] = reinterpret_cast<const Pack<T, VEC>*>(x)[c];
    return;
  }
  acc_t xs[NREG][VEC];
  acc_t mean, rstd;
  row_stats<acc_t, T, VEC, IN_REGS, NREG>(x, nchunks, g.d, norm, eps, xs, shared, mean, rstd);
  auto write = [&](int64_t c, const acc_t(&v)[VEC]) {
    Pack<T, VEC> p;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t col = c * VEC + j;
      acc_t o = v[j] * rstd;
      if (weight) o *= static_cast<acc_t>(weight[col]);
      if (bias) o += static_cast<acc_t>(bias[col]);
      p.v[j] = static_cast<T>(o);
    }
    reinterpret_cast<Pack<T, VEC>*>(y)[c] = p;
  };
  if (IN_REGS) {
#pragma unroll
    for (int k = 0; k < NREG; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * G;
      if (c < nchunks) write(c, xs[k]);
    }
  } else {
    for (int64_t c = tid; c < nchunks; c += G) {
      acc_t v[VEC];
      load_pack<acc_t, T, VEC>(x, c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] -= mean;
      write(c, v);
    }
  }
}

// Backward of one row: dx accumulates atomically into the fp32 (fp64) accumulator gh, since several rows
// may read the same source; dweight/dbias go to row i's slice of the (n, d) partials gw/gb, which the host
// sums in a fixed order (atomics there would make those gradients differ from run to run).
template <typename T, typename W, typename acc_t, int VEC, bool IN_REGS>
__global__ void latent_feedback_bwd_kernel(const T* __restrict__ Gr, const T* __restrict__ H, Geometry g,
                                           const W* __restrict__ weight, int norm, acc_t eps, acc_t* gh,
                                           acc_t* gw, acc_t* gb) {
  constexpr int NREG = IN_REGS ? kElemsPerThread / VEC : 1;
  __shared__ acc_t shared[kWarp];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  int64_t b, dst, src;
  if (i >= g.n || !row_of(g, i, b, dst, src)) return;
  const T* x = H + b * g.h_bs + src * g.h_rs;
  const T* dy_row = Gr + b * g.e_bs + dst * g.e_rs;
  acc_t* dx_row = gh + (b * g.S + src) * g.d;
  if (gw) gw += i * g.d;
  if (gb) gb += i * g.d;
  const int64_t nchunks = g.d / VEC;
  const int tid = threadIdx.x, G = blockDim.x;
  if (norm == static_cast<int>(FeedbackNorm::kNone)) {
    for (int64_t c = tid; c < nchunks; c += G) {
      acc_t v[VEC];
      load_pack<acc_t, T, VEC>(dy_row, c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) atomicAdd(dx_row + c * VEC + j, v[j]);
    }
    return;
  }
  acc_t xs[NREG][VEC];
  acc_t mean, rstd;
  row_stats<acc_t, T, VEC, IN_REGS, NREG>(x, nchunks, g.d, norm, eps, xs, shared, mean, rstd);
  // First sweep: dweight/dbias and the two row sums of dx; xs becomes x_hat, dys holds weight * dy.
  acc_t dys[NREG][VEC];
  acc_t s_dy = 0, s_dyx = 0;
  auto sweep = [&](int64_t c, acc_t(&xv)[VEC], acc_t(&dv)[VEC]) {
    load_pack<acc_t, T, VEC>(dy_row, c, dv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t col = c * VEC + j;
      xv[j] *= rstd;
      if (gw) gw[col] = dv[j] * xv[j];
      if (gb) gb[col] = dv[j];
      if (weight) dv[j] *= static_cast<acc_t>(weight[col]);
      s_dy += dv[j];
      s_dyx += dv[j] * xv[j];
    }
  };
  if (IN_REGS) {
#pragma unroll
    for (int k = 0; k < NREG; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * G;
      if (c < nchunks) sweep(c, xs[k], dys[k]);
    }
  } else {
    for (int64_t c = tid; c < nchunks; c += G) {
      acc_t xv[VEC], dv[VEC];
      load_pack<acc_t, T, VEC>(x, c, xv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[j] -= mean;
      sweep(c, xv, dv);
    }
  }
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(g.d);
  const acc_t c0 = norm == static_cast<int>(FeedbackNorm::kLayerNorm) ? row_sum(s_dy, shared) * inv_d : acc_t(0);
  const acc_t c1 = row_sum(s_dyx, shared) * inv_d;
  auto emit = [&](int64_t c, const acc_t(&xv)[VEC], const acc_t(&dv)[VEC]) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(dx_row + c * VEC + j, rstd * (dv[j] - c0 - xv[j] * c1));
  };
  if (IN_REGS) {
#pragma unroll
    for (int k = 0; k < NREG; ++k) {
      const int64_t c = tid + static_cast<int64_t>(k) * G;
      if (c < nchunks) emit(c, xs[k], dys[k]);
    }
  } else {
    for (int64_t c = tid; c < nchunks; c += G) {
      acc_t xv[VEC], dv[VEC];
      load_pack<acc_t, T, VEC>(x, c, xv);
      load_pack<acc_t, T, VEC>(dy_row, c, dv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xv[j] = (xv[j] - mean) * rstd;
        if (weight) dv[j] *= static_cast<acc_t>(weight[c * VEC + j]);
      }
      emit(c, xv, dv);
    }
  }
}

Geometry make_geometry(const FeedbackArgs& a, const at::Tensor& e, const at::Tensor& h,
                       const std::optional<at::Tensor>& bat, const at::Tensor& dst, const at::Tensor& src) {
  Geometry g;
  g.bat = {a.batched ? bat->data_ptr() : nullptr, a.batched && bat->scalar_type() == at::kLong};
  g.dst = {dst.data_ptr(), dst.scalar_type() == at::kLong};
  g.src = {src.data_ptr(), src.scalar_type() == at::kLong};
  g.batched = a.batched;
  g.n = a.n;
  g.d = a.d;
  g.B = a.batch;
  g.T = a.t_len;
  g.S = a.s_len;
  g.e_bs = batch_stride(e, a.batched);
  g.e_rs = row_stride(e, a.batched);
  g.h_bs = batch_stride(h, a.batched);
  g.h_rs = row_stride(h, a.batched);
  return g;
}

// 16-byte packs when d, both base pointers and every row stride allow them.
template <typename T>
int pack_width(const Geometry& g, const at::Tensor& e, const at::Tensor& h) {
  constexpr int vec = 16 / sizeof(T);
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool ok = g.d % vec == 0 && aligned(e.data_ptr()) && aligned(h.data_ptr()) && g.e_bs % vec == 0 &&
                  g.e_rs % vec == 0 && g.h_bs % vec == 0 && g.h_rs % vec == 0;
  return ok ? vec : 1;
}

struct LaunchShape {
  dim3 grid, block;
  bool in_regs;
};

// The largest block both variants (row in registers or not) of a kernel can launch with their registers.
template <typename K1, typename K2>
int max_block_threads(K1 in_regs_kernel, K2 loop_kernel) {
  cudaFuncAttributes a1, a2;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a1, in_regs_kernel));
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a2, loop_kernel));
  return std::min(a1.maxThreadsPerBlock, a2.maxThreadsPerBlock);
}

LaunchShape launch_shape(int64_t n, int64_t d, int vec, int max_threads) {
  const launch::Shape s = launch::feedback_shape(n, d, vec, max_threads);
  return {dim3(static_cast<unsigned>(s.grid_x)), dim3(s.block_x, s.block_y), s.in_regs};
}

// Weight and bias in one storage type W: hidden's dtype or, when either is float32, float32 (then the
// other, if any, is cast: d elements).
template <typename T, typename Fn>
void with_params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, Fn&& fn) {
  using acc_t = typename acc_type<T>::type;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const bool any_acc = (weight && weight->scalar_type() == acc) || (bias && bias->scalar_type() == acc);
  auto prep = [&](const std::optional<at::Tensor>& p, at::ScalarType st) {
    return p.has_value() ? std::optional<at::Tensor>(p->to(st).contiguous()) : std::nullopt;
  };
  if (any_acc || std::is_same<T, acc_t>::value) {
    const auto w = prep(weight, acc), b = prep(bias, acc);
    fn(w ? w->template data_ptr<acc_t>() : nullptr, b ? b->template data_ptr<acc_t>() : nullptr);
  } else {
    const auto w = prep(weight, c10::CppTypeToScalarType<T>::value), b = prep(bias, c10::CppTypeToScalarType<T>::value);
    fn(w ? w->template data_ptr<T>() : nullptr, b ? b->template data_ptr<T>() : nullptr);
  }
}

template <typename T, typename W, typename acc_t, int VEC>
void launch_fwd_vec(T* e, const T* h, const Geometry& g, const W* w, const W* b, int norm, acc_t eps,
                    cudaStream_t stream) {
  const int max_threads = max_block_threads(latent_feedback_fwd_kernel<T, W, acc_t, VEC, true>,
                                            latent_feedback_fwd_kernel<T, W, acc_t, VEC, false>);
  const LaunchShape s = launch_shape(g.n, g.d, VEC, max_threads);
  if (s.in_regs)
    latent_feedback_fwd_kernel<T, W, acc_t, VEC, true><<<s.grid, s.block, 0, stream>>>(e, h, g, w, b, norm, eps);
  else
    latent_feedback_fwd_kernel<T, W, acc_t, VEC, false><<<s.grid, s.block, 0, stream>>>(e, h, g, w, b, norm, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename W, typename acc_t, int VEC>
void launch_bwd_vec(const T* gr, const T* h, const Geometry& g, const W* w, int norm, acc_t eps, acc_t* gh, acc_t* gw,
                    acc_t* gb, cudaStream_t stream) {
  const int max_threads = max_block_threads(latent_feedback_bwd_kernel<T, W, acc_t, VEC, true>,
                                            latent_feedback_bwd_kernel<T, W, acc_t, VEC, false>);
  const LaunchShape s = launch_shape(g.n, g.d, VEC, max_threads);
  if (s.in_regs)
    latent_feedback_bwd_kernel<T, W, acc_t, VEC, true><<<s.grid, s.block, 0, stream>>>(gr, h, g, w, norm, eps, gh, gw,
                                                                                         gb);
  else
    latent_feedback_bwd_kernel<T, W, acc_t, VEC, false><<<s.grid, s.block, 0, stream>>>(gr, h, g, w, norm, eps, gh,
                                                                                          gw, gb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void latent_feedback_cuda(at::Tensor& embeds, const at::Tensor& hidden, const std::optional<at::Tensor>& batch_idx,
                          const at::Tensor& dst_pos, const at::Tensor& src_pos, c10::string_view norm,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          double eps) {
  const FeedbackArgs a = check_feedback_args(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps,
                                             "embeds");
  if (debug_checks()) check_feedback_indices(a, batch_idx, dst_pos, src_pos);
  if (a.n == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor h = rows_view(hidden), dst = dst_pos.contiguous(), src = src_pos.contiguous();
  const std::optional<at::Tensor> bat = a.batched ? std::optional<at::Tensor>(batch_idx->contiguous()) : std::nullopt;
  at::Tensor e = rows_view(embeds);
  const Geometry g = make_geometry(a, e, h, bat, dst, src);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "latent_feedback_", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int vec = pack_width<scalar_t>(g, e, h);
    with_params<scalar_t>(weight, bias, [&](auto* w, auto* b) {
      using W = std::remove_const_t<std::remove_pointer_t<decltype(w)>>;
      if (vec == kVec)
        launch_fwd_vec<scalar_t, W, acc_t, kVec>(e.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), g, w, b,
                                                 static_cast<int>(a.norm), static_cast<acc_t>(eps), stream);
      else
        launch_fwd_vec<scalar_t, W, acc_t, 1>(e.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), g, w, b,
                                              static_cast<int>(a.norm), static_cast<acc_t>(eps), stream);
    });
  });
  if (!e.is_same(embeds)) embeds.copy_(e);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_feedback_backward_cuda(
    const at::Tensor& grad_embeds, const at::Tensor& hidden, const std::optional<at::Tensor>& batch_idx,
    const at::Tensor& dst_pos, const at::Tensor& src_pos, c10::string_view norm,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  const FeedbackArgs a = check_feedback_args(grad_embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias,
                                             eps, "grad_embeds");
  if (debug_checks()) check_feedback_indices(a, batch_idx, dst_pos, src_pos);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopt = hidden.options().dtype(acc);
  at::Tensor gh = at::zeros(hidden.sizes(), aopt);
  // (n, d) partials of the weight/bias gradients (rows with bad indices keep zeros), summed at the end.
  at::Tensor gw = at::zeros({weight.has_value() ? a.n : 0, weight.has_value() ? a.d : 0}, aopt);
  at::Tensor gb = at::zeros({bias.has_value() ? a.n : 0, bias.has_value() ? a.d : 0}, aopt);
  if (a.n > 0) {
    const at::Tensor gr = rows_view(grad_embeds), h = rows_view(hidden);
    const at::Tensor dst = dst_pos.contiguous(), src = src_pos.contiguous();
    const std::optional<at::Tensor> bat =
        a.batched ? std::optional<at::Tensor>(batch_idx->contiguous()) : std::nullopt;
    const Geometry g = make_geometry(a, gr, h, bat, dst, src);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "latent_feedback_backward", [&] {
      using acc_t = typename acc_type<scalar_t>::type;
      constexpr int kVec = 16 / sizeof(scalar_t);
      const int vec = pack_width<scalar_t>(g, gr, h);
      acc_t* gwp = weight.has_value() ? gw.data_ptr<acc_t>() : nullptr;
      acc_t* gbp = bias.has_value() ? gb.data_ptr<acc_t>() : nullptr;
      with_params<scalar_t>(weight, std::nullopt, [&](auto* w, auto*) {
        using W = std::remove_const_t<std::remove_pointer_t<decltype(w)>>;
        if (vec == kVec)
          launch_bwd_vec<scalar_t, W, acc_t, kVec>(gr.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), g, w,
                                                   static_cast<int>(a.norm), static_cast<acc_t>(eps),
                                                   gh.data_ptr<acc_t>(), gwp, gbp, stream);
        else
          launch_bwd_vec<scalar_t, W, acc_t, 1>(gr.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), g, w,
                                                static_cast<int>(a.norm), static_cast<acc_t>(eps),
                                                gh.data_ptr<acc_t>(), gwp, gbp, stream);
      });
    });
  }
  return {gh.scalar_type() == hidden.scalar_type() ? gh : gh.to(hidden.scalar_type()), gw.sum(0), gb.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(coconut, CUDA, m) {
  m.impl("latent_feedback_", &latent_feedback_cuda);
  m.impl("latent_feedback_backward", &latent_feedback_backward_cuda);
}

}  // namespace coconut
