// An emulated CUDA execution model: what kernels/cuda/*.cu need in order to compile as host C++ and run on CPU
// tensors (the fcn_fast._C_emu extension, backend "cuda_emulated"; docs/emulator.md). Included by cuda_launch.h
// only when FCN_FAST_EMULATE_CUDA is defined; nvcc never sees it.
//
// A launch runs its blocks one after another. The threads of a block are fibers on the calling thread's stack pool
// (kernels/emulated/cuda_emulation.cpp): each runs until it reaches __syncthreads() or returns, then the next one
// runs, in the order the schedule gives; when every thread has arrived, the next phase starts. A race between two
// threads of a block (or two blocks) therefore gives different results under the "forward" and "reverse" schedules,
// which the Python backend compares bitwise on every call.
#pragma once

#ifndef FCN_FAST_EMULATE_CUDA
#error "cuda_emulation.h is for the emulated build only (FCN_FAST_EMULATE_CUDA)"
#endif

#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <functional>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace fcn_fast {
namespace emu {

// The built-in variables of the thread that is running now.
struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

extern thread_local const ThreadContext* current_thread;

// Runs `thread_body` once for every thread of a grid x block launch, blocks one after another (see above). Checks
// the launch configuration as the CUDA runtime does, and that every live thread of a block waits at the same
// __syncthreads (a barrier in divergent code is undefined behaviour on a GPU): a violation is a c10::Error.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body);

// __syncthreads() of the running thread; `site` names the call for the divergence check.
void syncthreads(const char* file, int line);

// Knobs (private op fcn_fast_emu::_emulator_options; FCN_FAST_EMU_* environment variables give the defaults).
int64_t max_blocks();        // grid cap: small values make every grid-stride loop wrap
bool force_int64_indices();  // take the int64 index path whatever the sizes
void record_index_width(int bytes);

// Stream and device guard stand-ins: there is one "device", the CPU, and launches complete before they return.
using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

}  // namespace emu
}  // namespace fcn_fast

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One array per kernel instantiation and OS thread, shared by the fibers of a block: blocks run one after another,
// so it is the block's shared memory. Like a GPU's, it starts with whatever the previous block left.
#define __shared__ static thread_local

#define threadIdx (::fcn_fast::emu::current_thread->thread_idx)
#define blockIdx (::fcn_fast::emu::current_thread->block_idx)
#define blockDim (::fcn_fast::emu::current_thread->block_dim)
#define gridDim (::fcn_fast::emu::current_thread->grid_dim)
#define __syncthreads() ::fcn_fast::emu::syncthreads(__FILE__, __LINE__)
