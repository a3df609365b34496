// Block-level building blocks of the CUDA kernels (cuda_launch.h has the launch policy, 2-D/3-D grids and their
// block-stride loops included; docs/cuda-kernels.md the designs and their byte counts): fixed-order block sums for
// per-block partial sums, and the coalesced, atomic-free adjoint of the separable bilinear map (bilinear.h).
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
// tap_adjoint(ox, ix, row[padded(ox - chunk_begin)]), in increasing ox, added to total. Weight-0 taps are multiplied
// too, as PyTorch's adjoints do: an infinite or NaN value there reaches the total as NaN (bilinear.h).
template <typename acc_t>
FCN_HD acc_t fold_chunk(acc_t total, const acc_t* row, Range mine, int64_t chunk_begin, const int32_t* col_index,
                        const acc_t* col_weight, int64_t ix) {
  const int64_t begin = mine.begin > chunk_begin ? mine.begin : chunk_begin;
  const int64_t chunk_end = chunk_begin + kChunk;
  const int64_t end = mine.end < chunk_end ? mine.end : chunk_end;
  for (int64_t ox = begin; ox < end; ++ox) {
    total += tap_adjoint(col_index, col_weight, ox, ix, row[padded(static_cast<int>(ox - chunk_begin))]);
  }
  return total;
}

// The sum of `value` over the block's threads, in thread 0: a fixed tree, so the same on every run. `shared` holds
// kThreadsPerBlock values; call __syncthreads() before reusing it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* shared) {
  const int t = static_cast<int>(threadIdx.x);
  shared[t] = value;
  __syncthreads();
  for (int stride = kThreadsPerBlock / 2; stride > 0; stride /= 2) {
    if (t < stride) shared[t] += shared[t + stride];
    __syncthreads();
  }
  return shared[0];
}

// This block's index in its (up to 3-D) grid, x fastest: where it writes its partial sum.
__device__ __forceinline__ int64_t linear_block() {
  return (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
}

// A reduced loss's partial sums: the block's loss and "mean" denominator, written by thread 0 at linear_block().
// Every thread of the block must call it (it meets barriers); `shared` holds kThreadsPerBlock values.
template <typename acc_t>
__device__ __forceinline__ void write_block_loss_sums(acc_t thread_loss, acc_t thread_denom, acc_t* shared,
                                                      acc_t* loss, acc_t* denom) {
  const acc_t block_loss = block_sum(thread_loss, shared);
  __syncthreads();  // thread 0 has read shared[0] before it is overwritten
  const acc_t block_denom = block_sum(thread_denom, shared);
  if (threadIdx.x == 0) {
    loss[linear_block()] = block_loss;
    denom[linear_block()] = block_denom;
  }
}

}  // namespace cuda
}  // namespace fcn_fast
