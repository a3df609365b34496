// The launch policy of every CUDA kernel in kernels/cuda/, in one place: threads per block, the grid for n work
// items (capped: larger problems loop, grid-stride) or for 2-D/3-D planes of rows (block-stride loops, no division
// per element), the int32/int64 index choice, the launch itself with its error check, the stream and the device
// guard.
//
// The same .cu sources also compile as host C++ with FCN_FAST_EMULATE_CUDA defined, against cuda_emulation.h, into
// fcn_fast._C_emu (backend "cuda_emulated", docs/emulator.md). This header is where the two builds part: a .cu file
// includes it instead of any c10/cuda header and registers its kernels with FCN_FAST_CUDA_LIBRARY_IMPL.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>

#include "fcn_fast/common.h"

#ifdef FCN_FAST_EMULATE_CUDA
#include "fcn_fast/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fcn_fast {
namespace cuda {

#ifdef FCN_FAST_EMULATE_CUDA
// The emulated kernels run on CPU tensors and register for the CPU dispatch key of their own op namespace.
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
#define FCN_FAST_CUDA_DISPATCH_KEY CPU
using Stream = emu::Stream;
using DeviceGuard = emu::DeviceGuard;
inline Stream current_stream() { return emu::current_stream(); }
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
#define FCN_FAST_CUDA_DISPATCH_KEY CUDA
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

// TORCH_LIBRARY_IMPL(fcn_fast, CUDA, m), or (fcn_fast_emu, CPU, m) in the emulated build.
#define FCN_FAST_CUDA_LIBRARY_IMPL(m) FCN_FAST_LIBRARY_IMPL(FCN_FAST_CUDA_DISPATCH_KEY, m)

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU many times over (an H200's 132 SMs hold about a thousand such blocks at
// once); larger problems loop, grid-stride. Kernels that write one partial sum per block get at most this many.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline int64_t max_blocks() {
#ifdef FCN_FAST_EMULATE_CUDA
  return std::min(kMaxBlocks, emu::max_blocks());
#else
  return kMaxBlocks;
#endif
}

// Blocks of kThreadsPerBlock threads for `items` work items, one per thread: at least one (a launch of no blocks
// is an error), at most max_blocks().
inline int64_t blocks_for(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>((items + kThreadsPerBlock - 1) / kThreadsPerBlock, max_blocks()));
}

// int32 index math is safe when every index a kernel forms, and one grid stride past it, stays below 2^31: callers
// list the element counts of every tensor they index.
inline bool fits_int32(std::initializer_list<int64_t> sizes) {
  const int64_t limit = std::numeric_limits<int32_t>::max() - kMaxBlocks * kThreadsPerBlock;
  for (int64_t s : sizes) {
    if (s >= limit) return false;
  }
  return true;
}

// Runs launch(index_t{}) with index_t = int32_t when fits_int32(sizes), int64_t otherwise: integer division, which
// the kernels' index math is full of, costs about twice as much in int64 on a GPU.
template <typename Launch>
void with_index_type(std::initializer_list<int64_t> sizes, Launch&& launch) {
#ifdef FCN_FAST_EMULATE_CUDA
  const bool int32 = !emu::force_int64_indices() && fits_int32(sizes);
  emu::record_index_width(int32 ? 4 : 8);
#else
  const bool int32 = fits_int32(sizes);
#endif
  if (int32) {
    launch(int32_t(0));
  } else {
    launch(int64_t(0));
  }
}

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

// kernel<<<grid, kThreadsPerBlock, 0, stream>>>(args...), then the launch check; in the emulated build, the same
// call for every thread of the grid.
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

inline int64_t block_count(dim3 grid) { return int64_t(grid.x) * grid.y * grid.z; }

// A 1-D launch of `blocks` blocks (blocks_for), for kernels walked by FCN_GRID_STRIDE_LOOP.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, Stream stream, Args&&... args) {
  launch_grid(kernel, dim3(static_cast<unsigned int>(blocks)), stream, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace fcn_fast

// for (index_t i = this thread's first item; i < n; i += the number of threads in the grid): every kernel's loop
// over its work items, correct for any grid (blocks_for caps it).
#define FCN_GRID_STRIDE_LOOP(index_t, i, n)                                                                        \
  for (index_t i = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +                          \
                   static_cast<index_t>(threadIdx.x),                                                             \
               i##_grid_stride = static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x);             \
       i < (n); i += i##_grid_stride)

// for (index_t b = this block's first item along grid axis `axis`; b < n; b += the grid's blocks along it): loops over
// rows, planes or tiles owned by whole blocks, correct for any grid.
#define FCN_BLOCK_STRIDE_LOOP(index_t, b, n, axis) \
  for (index_t b = static_cast<index_t>(blockIdx.axis); b < (n); b += static_cast<index_t>(gridDim.axis))
