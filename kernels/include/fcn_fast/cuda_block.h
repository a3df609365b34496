// Block-level building blocks of the CUDA kernels (cuda_launch.h has the launch policy; docs/cuda-kernels.md the
// designs and their byte counts): launches on 2-D/3-D grids walked by block-stride loops, fixed-order block sums
// for per-block partial sums, and the coalesced, atomic-free adjoint of the separable bilinear map (bilinear.h).
//
// The adjoint: a backward block owns kThreadsPerBlock consecutive input columns [ix0, ix0 + kThreadsPerBlock) of one
// input row. The output columns they read form a window [lo, hi) (the union of their readers ranges). The window is
// walked in chunks of kChunk output columns: the block's threads, lanes along W, write one value per output column of
// the chunk into shared memory (adjacent lanes, adjacent addresses: every global load coalesces), then each thread
// folds the chunk's columns of its own readers range into its input column's total. Every total is a sum over
// increasing output columns in a fixed order, whatever the schedule: bitwise reproducible, and no atomics.
#pragma once

#include <cstdint>
#include <limits>
#include <utility>

#include "fcn_fast/bilinear.h"
#include "fcn_fast/cuda_launch.h"

namespace fcn_fast {
namespace cuda {

// Output columns per shared-memory chunk: 4 per thread. 4 KiB of float (8 KiB of double) plus the padding below.
constexpr int kChunk = 4 * kThreadsPerBlock;

// A thread folding its readers range reads shared[ix * factor + k] while its neighbours read factor words further:
// for a power-of-two factor that is a factor-way bank conflict (of 32 banks). One padding word per 32 spreads every
// such stride over distinct banks (lane ix lands on bank (factor * ix + ix / (32 / factor)) mod 32).
FCN_HD int padded(int column) { return column + (column >> 5); }
constexpr int kPaddedChunk = kChunk + kChunk / 32;

// Blocks along one grid axis for `items`: at least 1, at most `limit` (the hardware's 65535 for y and z).
inline unsigned int grid_axis(int64_t items, int64_t limit) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(items, limit)));
}

// The grid of a kernel over (tiles of kThreadsPerBlock columns of `width`, rows, planes), one axis each, every one
// walked by FCN_BLOCK_STRIDE_LOOP: no division per element. At most max_blocks() blocks in all, as for 1-D grids
// (the emulator's tiny-grid knob then makes every block-stride loop wrap).
inline dim3 plane_grid(int64_t width, int64_t rows, int64_t planes) {
  const int64_t cap = max_blocks();
  const unsigned int x = grid_axis((width + kThreadsPerBlock - 1) / kThreadsPerBlock, cap);
  const unsigned int y = grid_axis(rows, std::min<int64_t>(65535, cap / x));
  const unsigned int z = grid_axis(planes, std::min<int64_t>(65535, cap / (int64_t(x) * y)));
  return dim3(x, y, z);
}

// kernel<<<grid, kThreadsPerBlock, 0, stream>>>(args...) for a 2-D or 3-D grid, then the launch check.
template <typename... Params, typename... Args>
void launch_grid(void (*kernel)(Params...), dim3 grid, Stream stream, Args&&... args) {
#ifdef FCN_FAST_EMULATE_CUDA
  (void)stream;
  const std::tuple<Params...> params(std::forward<Args>(args)...);
  emu::run_grid(grid, dim3(kThreadsPerBlock), [&] { std::apply(kernel, params); });
#else
  kernel<<<grid, dim3(kThreadsPerBlock), 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// [begin, end) of the output columns read by input column ix, clamped into [0, out_size) (bilinear.h); empty for a
// column past in_size.
struct Range {
  int64_t begin, end;
};

FCN_HD Range readers_range(const int32_t* readers, int64_t ix, int64_t in_size, int64_t out_size) {
  if (ix >= in_size) return {0, 0};
  const int64_t begin = clamp_range_end(readers[2 * ix], out_size);
  const int64_t end = clamp_range_end(readers[2 * ix + 1], out_size);
  return {begin, end > begin ? end : begin};
}

// The union [lo, hi) of the non-empty ranges of the block's threads (lo >= hi when all are empty), in every thread.
// A tree over shared memory, not the first and last column's ends: inputs that nobody reads have empty ranges that
// sit anywhere (_resample.py puts them at the end of the output).
__device__ __forceinline__ Range block_window(Range mine) {
  __shared__ int64_t lo[kThreadsPerBlock], hi[kThreadsPerBlock];
  const int t = static_cast<int>(threadIdx.x);
  const bool empty = mine.end <= mine.begin;
  lo[t] = empty ? std::numeric_limits<int64_t>::max() : mine.begin;
  hi[t] = empty ? std::numeric_limits<int64_t>::min() : mine.end;
  __syncthreads();
  for (int stride = kThreadsPerBlock / 2; stride > 0; stride /= 2) {
    if (t < stride) {
      lo[t] = lo[t + stride] < lo[t] ? lo[t + stride] : lo[t];
      hi[t] = hi[t + stride] > hi[t] ? hi[t + stride] : hi[t];
    }
    __syncthreads();
  }
  const Range window{lo[0], hi[0]};
  __syncthreads();  // every thread has read lo[0], hi[0] before the next call overwrites them
  return window;
}

// The fold of one chunk: sum over the output columns ox of [begin, end) within [chunk_begin, chunk_begin + kChunk) of
// tap_weight(ox, ix) * row[padded(ox - chunk_begin)], in increasing ox, added to total. skip_zero: leave out the
// columns of weight 0 (a NaN or inf there then does not reach the total, the loss gradients' convention).
template <bool skip_zero, typename acc_t>
FCN_HD acc_t fold_chunk(acc_t total, const acc_t* row, Range mine, int64_t chunk_begin, const int32_t* col_index,
                        const acc_t* col_weight, int64_t ix) {
  const int64_t begin = mine.begin > chunk_begin ? mine.begin : chunk_begin;
  const int64_t chunk_end = chunk_begin + kChunk;
  const int64_t end = mine.end < chunk_end ? mine.end : chunk_end;
  for (int64_t ox = begin; ox < end; ++ox) {
    const acc_t w = tap_weight(col_index, col_weight, ox, ix);
    if (skip_zero && w == acc_t(0)) continue;
    total += w * row[padded(static_cast<int>(ox - chunk_begin))];
  }
  return total;
}

// The sum of `value` over the block's threads, in thread 0: a fixed tree, so the same on every run. `shared` holds
// kThreadsPerBlock values; call __syncthreads() before reusing it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreadsPerBlock / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

// This block's index in its (up to 3-D) grid, x fastest: where it writes its partial sum.
__device__ __forceinline__ int64_t linear_block() {
  return (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
}

inline int64_t block_count(dim3 grid) { return int64_t(grid.x) * grid.y * grid.z; }

}  // namespace cuda
}  // namespace fcn_fast

// for (index_t b = this block's first item along grid axis `axis`; b < n; b += the grid's blocks along it): loops over
// rows, planes or tiles owned by whole blocks, correct for any grid.
#define FCN_BLOCK_STRIDE_LOOP(index_t, b, n, axis) \
  for (index_t b = static_cast<index_t>(blockIdx.axis); b < (n); b += static_cast<index_t>(gridDim.axis))
