// What the CPU and CUDA kernels of upsample_cross_entropy / upsample_argmax share: the geometry as the kernels read
// it, the CeConfig built from the kernel arguments, and the host-side argument checks (the Python front end raises
// the user-facing errors first; these keep direct torch.ops calls from reading out of bounds).
#pragma once

#include <optional>
#include <vector>

#include "fcn_fast/bilinear.h"
#include "fcn_fast/common.h"
#include "fcn_fast/cross_entropy_host.h"
#include "fcn_fast/softmax_ce.h"

namespace fcn_fast {

// The four tap tables (bilinear.h) plus the sizes they map between.
template <typename acc_t>
struct UpsampleTaps {
  const int32_t* row_index;
  const acc_t* row_weight;
  const int32_t* col_index;
  const acc_t* col_weight;
  int64_t in_h, in_w, out_h, out_w;
};

template <typename acc_t>
UpsampleTaps<acc_t> make_upsample_taps(const at::Tensor& coarse, const at::Tensor& row_index,
                                       const at::Tensor& row_weight, const at::Tensor& col_index,
                                       const at::Tensor& col_weight) {
  return UpsampleTaps<acc_t>{row_index.data_ptr<int32_t>(), row_weight.data_ptr<acc_t>(),
                             col_index.data_ptr<int32_t>(), col_weight.data_ptr<acc_t>(),
                             coarse.size(2),              coarse.size(3),
                             row_index.size(0),           col_index.size(0)};
}

// Shapes and dtypes of coarse and the tap tables, then, for CPU tensors, every table entry against the sizes it
// indexes.
inline void check_upsample_geometry(const at::Tensor& coarse, const at::Tensor& row_index,
                                    const at::Tensor& row_weight, const at::Tensor& col_index,
                                    const at::Tensor& col_weight, const at::Tensor* row_readers = nullptr,
                                    const at::Tensor* col_readers = nullptr) {
  TORCH_CHECK(coarse.dim() == 4 && coarse.is_contiguous(), "coarse must be a contiguous (N, C, h, w) tensor");
  TORCH_CHECK(coarse.size(1) >= 1 && coarse.size(2) >= 1 && coarse.size(3) >= 1, "coarse must not be empty");
  check_taps(row_index, row_weight, "row");
  check_taps(col_index, col_weight, "col");
  const auto acc_type = acc_scalar_type(coarse.scalar_type());
  TORCH_CHECK(row_weight.scalar_type() == acc_type && col_weight.scalar_type() == acc_type, "tap weights must be ",
              acc_type, " for ", coarse.scalar_type(), " coarse");
  for (const at::Tensor* t : {&row_index, &row_weight, &col_index, &col_weight}) {
    TORCH_CHECK(t->device() == coarse.device(), "tap tables must be on coarse's device");
  }
  TORCH_CHECK(row_index.size(0) >= 1 && col_index.size(0) >= 1, "the output must not be empty");
  if (row_readers != nullptr) {
    check_readers(*row_readers, coarse.size(2), "row");
    check_readers(*col_readers, coarse.size(3), "col");
    TORCH_CHECK(row_readers->device() == coarse.device() && col_readers->device() == coarse.device(),
                "reader tables must be on coarse's device");
  }
  // Table entries are checked here for CPU tensors only; the CUDA kernels clamp what they read instead (bilinear.h):
  // checking device tables here would cost a device sync on every call.
  if (!host_checks_table_entries(coarse)) return;
  std::vector<at::Tensor> bounds = {row_index.min(), row_index.max(), col_index.min(), col_index.max()};
  if (row_readers != nullptr) {
    bounds.insert(bounds.end(), {row_readers->min().to(at::kInt), row_readers->max().to(at::kInt),
                                 col_readers->min().to(at::kInt), col_readers->max().to(at::kInt)});
  }
  const at::Tensor host = at::stack(bounds).cpu();
  const int32_t* b = host.data_ptr<int32_t>();
  TORCH_CHECK(b[0] >= 0 && b[1] < coarse.size(2), "row_index out of range [0, ", coarse.size(2), ")");
  TORCH_CHECK(b[2] >= 0 && b[3] < coarse.size(3), "col_index out of range [0, ", coarse.size(3), ")");
  if (row_readers != nullptr) {
    TORCH_CHECK(b[4] >= 0 && b[5] <= row_index.size(0), "row_readers out of range");
    TORCH_CHECK(b[6] >= 0 && b[7] <= col_index.size(0), "col_readers out of range");
  }
}

inline void check_ce_arguments(const at::Tensor& coarse, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, const at::Tensor& row_index,
                               const at::Tensor& col_index) {
  TORCH_CHECK(target.dim() == 3 && target.is_contiguous() && target.size(0) == coarse.size(0) &&
                  target.size(1) == row_index.size(0) && target.size(2) == col_index.size(0),
              "target must be a contiguous (N, H, W) tensor with H, W the lengths of the tap tables");
  TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), "target must be integral");
  TORCH_CHECK(target.device() == coarse.device(), "target must be on coarse's device");
  if (weight.has_value()) {
    const auto acc_type = acc_scalar_type(coarse.scalar_type());
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == coarse.size(1) && weight->is_contiguous() &&
                    weight->scalar_type() == acc_type && weight->device() == coarse.device(),
                "weight must be a contiguous (C,) ", acc_type, " tensor on coarse's device");
  }
}

// lse (the forward's softmax statistics, (2, N, H, W): ce_stats_shape) and the per-pixel gradient of the backward.
inline void check_ce_backward_arguments(const at::Tensor& grad_pixel, const at::Tensor& target,
                                        const at::Tensor& lse, at::ScalarType acc_type) {
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(ce_stats_shape(target.sizes())) && lse.is_contiguous() &&
                  lse.scalar_type() == acc_type && lse.device() == target.device(),
              "lse must be the contiguous (2, N, H, W) ", acc_type, " softmax statistics of the forward, on target's "
              "device");
  TORCH_CHECK(grad_pixel.scalar_type() == acc_type && grad_pixel.is_contiguous() &&
                  grad_pixel.device() == target.device() &&
                  (grad_pixel.numel() == 1 || grad_pixel.sizes() == target.sizes()),
              "grad_pixel must be a contiguous ", acc_type, " scalar or a tensor of target's shape");
}

inline void check_label_dtype(const at::Tensor& coarse, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kLong || (dtype == at::kByte && coarse.size(1) <= 256),
              "dtype must be int64, or uint8 for at most 256 classes");
}

// torch.argmax's order: the first NaN wins, else the first maximum.
template <typename acc_t>
FCN_HD bool argmax_takes(acc_t candidate, acc_t best) {
  if (best != best) return false;
  return candidate != candidate || candidate > best;
}

}  // namespace fcn_fast
