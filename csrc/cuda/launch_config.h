// Launch configurations of the CUDA kernels as pure host functions (no CUDA or torch types), so that a plain
// C++ test (tests/test_gpu_static.py) can compute them for extreme shapes on a machine without a GPU and check
// them against the hardware limits: grid x < 2^31, grid y and z <= 65,535, block <= the kernel's
// maxThreadsPerBlock (which the registers it uses bound).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace coconut {
namespace launch {

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kWarp = 32;

struct Shape {
  int64_t grid_x = 1, grid_y = 1, grid_z = 1;
  int block_x = 1, block_y = 1;
  bool in_regs = false;  // latent_feedback: the row lives in registers (else re-read from memory in a loop)
  int key_split = 1;      // latent_attention dQ: key lanes per block (bwd_dq_key_split)
};

inline void check_grid(const Shape& s, const char* what) {
  if (s.grid_x < 0 || s.grid_x > kMaxGridX || s.grid_y < 0 || s.grid_y > kMaxGridYZ || s.grid_z < 0 ||
      s.grid_z > kMaxGridYZ)
    throw std::invalid_argument(std::string(what) + ": the shape needs a grid of " + std::to_string(s.grid_x) +
                                " x " + std::to_string(s.grid_y) + " x " + std::to_string(s.grid_z) +
                                " blocks, beyond the CUDA limits (2^31 - 1 x 65535 x 65535)");
}

// ---- latent_feedback -------------------------------------------------------------------------------------

constexpr int kFeedbackRowsPerWarpBlock = 8;
constexpr int kFeedbackElemsPerThread = 32;  // register budget of one thread for the row (and dy in backward)

// One warp per row (8 rows a block) while a row of d / vec chunks fits 32 lanes' registers; else one block per
// row of at most `max_threads` threads: the kernel's cudaFuncAttributes::maxThreadsPerBlock, which its
// register count bounds (a 1024-thread block of a 217-register kernel cannot launch). Rows that the block's
// registers cannot hold are re-read from memory in a loop (in_regs false), so every d launches.
inline Shape feedback_shape(int64_t n, int64_t d, int vec, int max_threads) {
  Shape s;
  const int64_t nchunks = d / vec;
  const int64_t per_thread = kFeedbackElemsPerThread / vec;
  const int cap = std::max(kWarp, std::min(1024, max_threads) / kWarp * kWarp);
  if (nchunks <= kWarp * per_thread && kWarp * kFeedbackRowsPerWarpBlock <= cap) {
    s.grid_x = (n + kFeedbackRowsPerWarpBlock - 1) / kFeedbackRowsPerWarpBlock;
    s.block_x = kWarp;
    s.block_y = kFeedbackRowsPerWarpBlock;
    s.in_regs = true;
  } else {
    const int64_t want = (nchunks + per_thread - 1) / per_thread;
    s.grid_x = n;
    s.block_x = static_cast<int>(std::min<int64_t>(cap, (want + kWarp - 1) / kWarp * kWarp));
    s.in_regs = nchunks <= s.block_x * per_thread;
  }
  check_grid(s, "latent_feedback");
  return s;
}

// ---- latent_attention --------------------------------------------------------------------------------------

constexpr int kAttnThreads = 128;
constexpr int kGroupTile = 4;  // query heads of one GQA group per forward block

// Split-KV forward splits, from shapes only (the lengths live on the device): enough blocks for ~4 per SM,
// each split keeping at least 128 keys of the longest possible range, at most 64.
inline int num_splits(int64_t row_blocks, int64_t Tmax, int sms) {
  const int64_t want = (4 * static_cast<int64_t>(sms) + row_blocks - 1) / std::max<int64_t>(row_blocks, 1);
  const int64_t most = std::max<int64_t>(1, Tmax / 128);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, most, 64})));
}

inline Shape append_shape(int64_t B, int64_t Sq) {
  Shape s;
  s.grid_x = B * Sq;
  s.block_x = kAttnThreads;
  check_grid(s, "kv_cache_append_");
  return s;
}

// Block (row = (b, t, kv head), split, group tile).
inline Shape fwd_split_shape(int64_t B, int64_t Sq, int64_t Hq, int64_t Hkv, int64_t Tmax, int sms) {
  Shape s;
  const int64_t gtiles = (Hq / Hkv + kGroupTile - 1) / kGroupTile;
  s.grid_x = B * Sq * Hkv;
  s.grid_y = num_splits(s.grid_x * gtiles, Tmax, sms);
  s.grid_z = gtiles;
  s.block_x = kAttnThreads;
  check_grid(s, "latent_attention forward");
  return s;
}

// One block per query row (b, t, hq): the split combine.
inline Shape per_query_row_shape(int64_t B, int64_t Sq, int64_t Hq, const char* what) {
  Shape s;
  s.grid_x = B * Sq * Hq;
  s.block_x = kAttnThreads;
  check_grid(s, what);
  return s;
}

// ---- latent_attention backward (tiled, deterministic) ------------------------------------------------------
// The rows of one kv head are its (t, g) pairs, m = t * G + g (G = Hq / Hkv query heads per kv head). A thread
// holds one key (dK/dV kernel) or one query row (dQ kernel) in bwd_tpd(DMAX) lanes, each lane every
// bwd_tpd-th 4-dim chunk of the head dims: 16 fp32 values per tile, so that K, V, dK, dV (dK/dV kernel) or
// q, dO, dQ (dQ kernel) stay in registers at ~128 registers a thread, two 256-thread blocks per SM (32 values
// took ~230 registers: one block). Tiles are sized by DMAX, the head dim rounded up to 64, 128 or 256.

constexpr int kBwdThreads = 256;
constexpr int kBwdDeltaRowsPerBlock = kBwdThreads / kWarp;  // one warp per query row
constexpr int kBwdRowTile = 16;  // query rows staged in shared memory per step of the dK/dV kernel
constexpr int kBwdKeySplit = 8;  // key lanes of a dQ block when the rows are few (decode-sized passes)

constexpr int bwd_tpd(int dmax) { return dmax / 16; }
// Keys of one dK/dV block: one per bwd_tpd lanes.
constexpr int bwd_key_block(int dmax) { return kBwdThreads / bwd_tpd(dmax); }
// Keys of one shared-memory K/V tile of the dQ kernel: 2 fp32 tiles of 16 KB each.
constexpr int bwd_dq_key_tile(int dmax) { return 4096 / dmax; }
// Key lanes of a dQ block: the key split when a block of one key lane would be more than half empty.
inline int bwd_dq_key_split(int64_t rows, int dmax) {
  return rows * 2 <= kBwdThreads / bwd_tpd(dmax) ? kBwdKeySplit : 1;
}
// Query rows of one dQ block.
constexpr int bwd_dq_rows(int dmax, int key_split) { return kBwdThreads / bwd_tpd(dmax) / key_split; }

// The head-dim tile (DMAX) the kernels are instantiated for (dispatch_head_dim).
inline int head_dim_tile(int64_t D) { return D <= 64 ? 64 : D <= 128 ? 128 : 256; }

// delta = rowsum(dO * O), one warp per query row (b, t, hq).
inline Shape bwd_delta_shape(int64_t B, int64_t Sq, int64_t Hq) {
  Shape s;
  s.grid_x = (B * Sq * Hq + kBwdDeltaRowsPerBlock - 1) / kBwdDeltaRowsPerBlock;
  s.block_x = kBwdThreads;
  check_grid(s, "latent_attention backward (delta)");
  return s;
}

// Block (b, kv head, key block), the key blocks of one (b, kv head) adjacent; 1-D so B * Hkv has no 65,535 cap.
inline Shape bwd_dkdv_shape(int64_t B, int64_t Hkv, int64_t Tmax, int64_t D) {
  Shape s;
  const int bn = bwd_key_block(head_dim_tile(D));
  s.grid_x = B * Hkv * ((Tmax + bn - 1) / bn);
  s.block_x = kBwdThreads;
  check_grid(s, "latent_attention backward (dK/dV)");
  return s;
}

// Block (b, kv head, query row block), 1-D as the dK/dV grid.
inline Shape bwd_dq_shape(int64_t B, int64_t Sq, int64_t Hq, int64_t Hkv, int64_t D) {
  Shape s;
  const int dmax = head_dim_tile(D);
  const int64_t rows = Sq * (Hq / Hkv);
  const int split = bwd_dq_key_split(rows, dmax);
  const int rb = bwd_dq_rows(dmax, split);
  s.grid_x = B * Hkv * ((rows + rb - 1) / rb);
  s.block_x = kBwdThreads;
  s.key_split = split;
  check_grid(s, "latent_attention backward (dQ)");
  return s;
}

}  // namespace launch
}  // namespace coconut
