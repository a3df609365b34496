// Shared by every C++ and CUDA source of fcn_fast._C: host/device qualifiers, the accumulate type, dtype dispatch
// and the argument checks the kernels repeat after the Python front end (which raises the user-facing errors first:
// these only guard against direct torch.ops calls with bad arguments, so a kernel never reads out of bounds).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FCN_HD __host__ __device__ __forceinline__
#else
#define FCN_HD inline
#endif

// The torch.ops namespace the kernels register in: fcn_fast, or fcn_fast_emu in the emulated CUDA build (setup.py,
// docs/emulator.md), whose ops then live beside the real ones.
#ifndef FCN_FAST_OP_NAMESPACE
#define FCN_FAST_OP_NAMESPACE fcn_fast
#endif
// TORCH_LIBRARY, TORCH_LIBRARY_FRAGMENT and TORCH_LIBRARY_IMPL in that namespace (the inner macros expand it before
// torch's paste it into names).
#define FCN_FAST_LIBRARY(m) FCN_FAST_TORCH_LIBRARY_(FCN_FAST_OP_NAMESPACE, m)
#define FCN_FAST_LIBRARY_FRAGMENT(m) FCN_FAST_TORCH_LIBRARY_FRAGMENT_(FCN_FAST_OP_NAMESPACE, m)
#define FCN_FAST_LIBRARY_IMPL(key, m) FCN_FAST_TORCH_LIBRARY_IMPL_(FCN_FAST_OP_NAMESPACE, key, m)
#define FCN_FAST_TORCH_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define FCN_FAST_TORCH_LIBRARY_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define FCN_FAST_TORCH_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace fcn_fast {

// Half and bfloat16 kernels accumulate in float; float64 in double.
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename Acc<scalar_t>::type;

// acc_t as a dtype: what tap weights, class weights and per-pixel outputs are stored in.
inline at::ScalarType acc_scalar_type(at::ScalarType data) { return data == at::kDouble ? at::kDouble : at::kFloat; }

// The floating dtypes every kernel supports.
#define FCN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

inline void check_taps(const at::Tensor& index, const at::Tensor& weight, const char* axis) {
  TORCH_CHECK(index.dim() == 2 && index.size(1) == 2 && index.scalar_type() == at::kInt && index.is_contiguous(),
              axis, "_index must be a contiguous int32 (out, 2) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == 2 && weight.size(0) == index.size(0) && weight.is_contiguous(),
              axis, "_weight must be a contiguous (out, 2) tensor matching ", axis, "_index");
}

inline void check_readers(const at::Tensor& readers, int64_t in_size, const char* axis) {
  TORCH_CHECK(readers.dim() == 2 && readers.size(0) == in_size && readers.size(1) == 2 &&
                  readers.scalar_type() == at::kInt && readers.is_contiguous(),
              axis, "_readers must be a contiguous int32 (in, 2) tensor with in = ", in_size);
}

}  // namespace fcn_fast
