// Kernels that test the emulated CUDA execution model itself (tests/test_emulator.py): the order its threads run
// in, a race it must expose, barriers in divergent code it must refuse. Written as CUDA kernels and launched through
// cuda_launch.h like kernels/cuda/*.cu; compiled into fcn_fast._C_emu only.
#include <torch/library.h>

#include <string>

#include "fcn_fast/cuda_launch.h"

namespace fcn_fast {
namespace {

// Each thread appends its global index to `log` when it runs, and again after a barrier: a race by design, whose
// outcome is the schedule.
__global__ void order_kernel(int32_t* log, int32_t* next, bool barrier) {
  const int32_t id = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  log[(*next)++] = id;
  if (barrier) {
    __syncthreads();
    log[(*next)++] = id;
  }
}

// Thread 0 of each block publishes a value in shared memory that every thread then reads: without the barrier
// between, a read-after-write race.
__global__ void publish_kernel(float* out, bool synchronized) {
  __shared__ float value;
  if (threadIdx.x == 0) value = static_cast<float>(blockIdx.x + 1);
  if (synchronized) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

// "divergent": half the threads wait at a barrier the other half never reaches. "mismatched": odd and even threads
// wait at different barriers.
__global__ void barrier_kernel(bool mismatched) {
  if (mismatched) {
    if (threadIdx.x % 2 == 0) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (threadIdx.x < blockDim.x / 2) {
    __syncthreads();
  }
}

at::Tensor test_order(int64_t blocks, bool barrier) {
  const int64_t threads = blocks * cuda::kThreadsPerBlock;
  at::Tensor log = at::full({barrier ? 2 * threads : threads}, -1, at::kInt);
  int32_t next = 0;
  cuda::launch(order_kernel, blocks, cuda::current_stream(), log.data_ptr<int32_t>(), &next, barrier);
  return log;
}

at::Tensor test_publish(int64_t blocks, bool synchronized) {
  at::Tensor out = at::empty({blocks * cuda::kThreadsPerBlock}, at::kFloat);
  cuda::launch(publish_kernel, blocks, cuda::current_stream(), out.data_ptr<float>(), synchronized);
  return out;
}

void test_barrier(const std::string& kind) {
  TORCH_CHECK(kind == "divergent" || kind == "mismatched", "kind must be divergent or mismatched");
  cuda::launch(barrier_kernel, 1, cuda::current_stream(), kind == "mismatched");
}

}  // namespace

FCN_FAST_LIBRARY_FRAGMENT(m) {
  m.def("_emulator_test_order(int blocks, bool barrier) -> Tensor", &test_order);
  m.def("_emulator_test_publish(int blocks, bool synchronized) -> Tensor", &test_publish);
  m.def("_emulator_test_barrier(str kind) -> ()", &test_barrier);
}

}  // namespace fcn_fast
