// upsample_cross_entropy and upsample_argmax on the CPU (ATen's OpenMP thread pool).
//
// Forward works one output row at a time: the C logit rows of that output row are interpolated into a small
// per-thread buffer (rows of the coarse plane first, then columns; separable, so 2 + 2 multiply-adds per logit),
// then each pixel runs the shared per-pixel cross-entropy (softmax_ce.h). Nothing of size N*C*H*W exists.
//
// Backward: each task owns a band of coarse rows of one image and walks the output rows that read them, recomputing
// each logit row exactly as forward did (same arithmetic, so exp(z - lse) is the softmax forward saw), turning it
// into dloss/dz and folding it into the band's coarse rows through the transposed taps. A task adds only into rows
// it owns and walks them in a fixed order: no atomics, bitwise deterministic. Output rows on a band border are
// recomputed by both neighbouring bands; bands are sized so that costs a few percent.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "fcn_fast/bilinear.h"
#include "fcn_fast/common.h"
#include "fcn_fast/softmax_ce.h"

namespace fcn_fast {
namespace {

#define FCN_DISPATCH_LABELS(TYPE, ...) AT_DISPATCH_INTEGRAL_TYPES(TYPE, "labels", __VA_ARGS__)

// The four tap tables plus sizes: the geometry as the row kernels read it.
template <typename acc>
struct Taps {
  const int32_t* row_index;
  const acc* row_weight;
  const int32_t* col_index;
  const acc* col_weight;
  int64_t in_h, in_w, out_h, out_w;
};

// The logits of output row oy for one class plane, as upsample_add produces them (rounded to scalar_t):
// coarse_row is per-thread scratch of in_w, z receives out_w values.
template <typename scalar_t, typename acc>
inline void interpolate_row(const scalar_t* plane, const Taps<acc>& taps, int64_t oy, acc* coarse_row, acc* z) {
  const int64_t y0 = taps.row_index[2 * oy], y1 = taps.row_index[2 * oy + 1];
  const acc wy0 = taps.row_weight[2 * oy], wy1 = taps.row_weight[2 * oy + 1];
  const scalar_t* r0 = plane + y0 * taps.in_w;
  const scalar_t* r1 = plane + y1 * taps.in_w;
  for (int64_t x = 0; x < taps.in_w; ++x) {
    coarse_row[x] = wy0 * static_cast<acc>(r0[x]) + wy1 * static_cast<acc>(r1[x]);
  }
  const int32_t* ci = taps.col_index;
  const acc* cw = taps.col_weight;
  for (int64_t ox = 0; ox < taps.out_w; ++ox) {
    const acc v = cw[2 * ox] * coarse_row[ci[2 * ox]] + cw[2 * ox + 1] * coarse_row[ci[2 * ox + 1]];
    z[ox] = static_cast<acc>(static_cast<scalar_t>(v));
  }
}

template <typename acc>
CeConfig<acc> make_config(const std::optional<at::Tensor>& weight, int64_t num_classes, int64_t ignore_index,
                          double smoothing) {
  CeConfig<acc> cfg{nullptr, acc(num_classes), acc(smoothing), num_classes, ignore_index};
  if (weight.has_value()) {
    cfg.class_weight = weight->data_ptr<acc>();
    acc sum = 0;
    for (int64_t c = 0; c < num_classes; ++c) sum += cfg.class_weight[c];
    cfg.weight_sum = sum;
  }
  return cfg;
}

template <typename acc>
Taps<acc> make_taps(const at::Tensor& coarse, int64_t out_h, int64_t out_w, const at::Tensor& row_index,
                    const at::Tensor& row_weight, const at::Tensor& col_index, const at::Tensor& col_weight) {
  return Taps<acc>{row_index.data_ptr<int32_t>(), row_weight.data_ptr<acc>(), col_index.data_ptr<int32_t>(),
                   col_weight.data_ptr<acc>(), coarse.size(2), coarse.size(3), out_h, out_w};
}

// exp for the row loops: branch-free so the compiler vectorizes the loops that call it (std::exp is a library call
// it will not vectorize without -ffast-math). float: Cephes' expf (range reduction by ln 2, degree-6 polynomial,
// within 2 ulp); exp(-inf) = 0 and NaN stays NaN, as the cross-entropy needs. double keeps std::exp.
inline float vector_exp(float x) {
  const float clamped = std::min(std::max(x, -87.33654f), 88.37626f);
  // Round to nearest with the 1.5 * 2^23 trick (exact without -ffast-math, which this file is not built with).
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = p * scale;
  result = x < -87.33654f ? 0.0f : result;
  result = x > 88.37626f ? std::numeric_limits<float>::infinity() : result;
  return x != x ? x : result;
}
inline double vector_exp(double x) { return std::exp(x); }

// Taps index coarse rows/columns: every entry must lie inside the coarse map (the tables come from _resample.py;
// this guards direct torch.ops calls).
void check_geometry(const at::Tensor& coarse, const at::Tensor& row_index, const at::Tensor& row_weight,
                    const at::Tensor& col_index, const at::Tensor& col_weight) {
  TORCH_CHECK(coarse.dim() == 4 && coarse.is_contiguous(), "coarse must be a contiguous (N, C, h, w) tensor");
  TORCH_CHECK(coarse.size(1) >= 1 && coarse.size(2) >= 1 && coarse.size(3) >= 1, "coarse must not be empty");
  check_taps(row_index, row_weight, "row");
  check_taps(col_index, col_weight, "col");
  const auto acc_type = coarse.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(row_weight.scalar_type() == acc_type && col_weight.scalar_type() == acc_type,
              "tap weights must be ", acc_type, " for ", coarse.scalar_type(), " coarse");
  TORCH_CHECK(row_index.numel() == 0 || (row_index.min().item<int32_t>() >= 0 &&
                                         row_index.max().item<int32_t>() < coarse.size(2)),
              "row_index out of range");
  TORCH_CHECK(col_index.numel() == 0 || (col_index.min().item<int32_t>() >= 0 &&
                                         col_index.max().item<int32_t>() < coarse.size(3)),
              "col_index out of range");
}

void check_ce_inputs(const at::Tensor& coarse, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                     const at::Tensor& row_index, const at::Tensor& col_index) {
  TORCH_CHECK(target.dim() == 3 && target.is_contiguous() && target.size(0) == coarse.size(0) &&
                  target.size(1) == row_index.size(0) && target.size(2) == col_index.size(0),
              "target must be a contiguous (N, H, W) tensor with H, W the lengths of the tap tables");
  TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), "target must be integral");
  if (weight.has_value()) {
    const auto acc_type = coarse.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == coarse.size(1) && weight->is_contiguous() &&
                    weight->scalar_type() == acc_type && weight->device() == coarse.device(),
                "weight must be a contiguous (C,) ", acc_type, " tensor on coarse's device");
  }
}

template <typename scalar_t, typename label_t>
void forward_impl(const at::Tensor& coarse, const at::Tensor& target, const CeConfig<acc_t<scalar_t>>& cfg,
                  const Taps<acc_t<scalar_t>>& taps, at::Tensor& loss, at::Tensor& denom, at::Tensor& lse) {
  using acc = acc_t<scalar_t>;
  const int64_t batch = coarse.size(0), classes = coarse.size(1);
  const int64_t plane_size = taps.in_h * taps.in_w, out_w = taps.out_w, out_h = taps.out_h;
  const scalar_t* x = coarse.data_ptr<scalar_t>();
  const label_t* labels = target.data_ptr<label_t>();
  acc* loss_p = loss.data_ptr<acc>();
  acc* denom_p = denom.data_ptr<acc>();
  acc* lse_p = lse.data_ptr<acc>();
  at::parallel_for(0, batch * out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> coarse_row(taps.in_w), z(classes * out_w), max(out_w), sum(out_w), weighted(out_w);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h, oy = row % out_h;
      for (int64_t c = 0; c < classes; ++c) {
        interpolate_row(x + (n * classes + c) * plane_size, taps, oy, coarse_row.data(), z.data() + c * out_w);
      }
      // Softmax statistics for the whole row, class by class, so the loops over ox vectorize.
      std::fill(max.begin(), max.end(), -std::numeric_limits<acc>::infinity());
      std::fill(sum.begin(), sum.end(), acc(0));
      std::fill(weighted.begin(), weighted.end(), acc(0));
      for (int64_t c = 0; c < classes; ++c) {
        const acc* zc = z.data() + c * out_w;
        for (int64_t ox = 0; ox < out_w; ++ox) max[ox] = zc[ox] > max[ox] ? zc[ox] : max[ox];
      }
      for (int64_t c = 0; c < classes; ++c) {
        const acc* zc = z.data() + c * out_w;
        const acc wc = ce_class_weight(cfg, c);
        // z - max is NaN for a NaN logit (and for an all -inf pixel): NaN propagates as in PyTorch.
        for (int64_t ox = 0; ox < out_w; ++ox) sum[ox] += vector_exp(zc[ox] - max[ox]);
        if (cfg.smoothing != acc(0)) {
          for (int64_t ox = 0; ox < out_w; ++ox) weighted[ox] += wc * zc[ox];
        }
      }
      const int64_t base = row * out_w;
      for (int64_t ox = 0; ox < out_w; ++ox) {
        const int64_t t = static_cast<int64_t>(labels[base + ox]);
        const acc pixel_lse = max[ox] + std::log(sum[ox]);
        const acc target_logit = ce_is_ignored(cfg, t) ? acc(0) : z[t * out_w + ox];
        ce_pixel_loss(cfg, t, pixel_lse, target_logit, weighted[ox], loss_p + base + ox, denom_p + base + ox);
        lse_p[base + ox] = pixel_lse;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_cross_entropy_fwd(const at::Tensor& coarse, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight,
                                                   const at::Tensor& row_index, const at::Tensor& row_weight,
                                                   const at::Tensor& col_index, const at::Tensor& col_weight,
                                                   int64_t ignore_index, double smoothing) {
  check_geometry(coarse, row_index, row_weight, col_index, col_weight);
  check_ce_inputs(coarse, target, weight, row_index, col_index);
  const auto acc_type = row_weight.scalar_type();
  const auto shape = target.sizes();
  at::Tensor loss = at::empty(shape, coarse.options().dtype(acc_type));
  at::Tensor denom = at::empty(shape, coarse.options().dtype(acc_type));
  at::Tensor lse = at::empty(shape, coarse.options().dtype(acc_type));
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_cross_entropy_fwd", [&] {
    using scalar = scalar_t;
    const auto cfg = make_config<acc_t<scalar>>(weight, coarse.size(1), ignore_index, smoothing);
    const auto taps = make_taps<acc_t<scalar>>(coarse, shape[1], shape[2], row_index, row_weight, col_index,
                                               col_weight);
    FCN_DISPATCH_LABELS(target.scalar_type(), [&] {
      forward_impl<scalar, scalar_t>(coarse, target, cfg, taps, loss, denom, lse);
    });
  });
  return std::make_tuple(loss, denom, lse);
}

// grad_pixel is one value for every pixel (numel 1) or one per pixel (N, H, W).
template <typename scalar_t, typename label_t>
void backward_impl(const at::Tensor& grad_pixel, const at::Tensor& coarse, const at::Tensor& target,
                   const at::Tensor& lse, const CeConfig<acc_t<scalar_t>>& cfg, const Taps<acc_t<scalar_t>>& taps,
                   const int32_t* row_readers, at::Tensor& grad_coarse) {
  using acc = acc_t<scalar_t>;
  const int64_t batch = coarse.size(0), classes = coarse.size(1);
  const int64_t in_h = taps.in_h, in_w = taps.in_w, out_w = taps.out_w, plane_size = in_h * in_w;
  const scalar_t* x = coarse.data_ptr<scalar_t>();
  const label_t* labels = target.data_ptr<label_t>();
  const acc* lse_p = lse.data_ptr<acc>();
  const acc* grad_p = grad_pixel.data_ptr<acc>();
  const bool per_pixel = grad_pixel.numel() != 1;
  scalar_t* out = grad_coarse.data_ptr<scalar_t>();

  // Enough bands to keep every thread busy, as few as possible to keep border recomputation low.
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t bands_per_image = std::min<int64_t>(in_h, std::max<int64_t>(1, (wanted_tasks + batch - 1) / batch));
  const int64_t band_rows = (in_h + bands_per_image - 1) / bands_per_image;
  const int64_t bands = (in_h + band_rows - 1) / band_rows;

  at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> coarse_row(in_w), z(out_w), dz(out_w), folded(in_w), band;
    std::vector<acc> scale(out_w), target_term(out_w), smooth(out_w), pixel_lse(out_w);
    std::vector<int32_t> label_row(out_w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, first = (task % bands) * band_rows;
      const int64_t last = std::min(first + band_rows, in_h);  // rows [first, last) of every class plane
      band.assign(classes * (last - first) * in_w, acc(0));
      int64_t oy_begin = taps.out_h, oy_end = 0;
      for (int64_t iy = first; iy < last; ++iy) {
        if (row_readers[2 * iy] < row_readers[2 * iy + 1]) {
          oy_begin = std::min<int64_t>(oy_begin, row_readers[2 * iy]);
          oy_end = std::max<int64_t>(oy_end, row_readers[2 * iy + 1]);
        }
      }
      for (int64_t oy = oy_begin; oy < oy_end; ++oy) {
        const int64_t base = (n * taps.out_h + oy) * out_w;
        // dloss/dz_c = p_c * scale - target_term [c == t] - smooth * w_c (softmax_ce.h), each scaled by the pixel's
        // incoming gradient; the per-pixel factors are hoisted out of the class loop. Ignored pixels: all 0.
        for (int64_t ox = 0; ox < out_w; ++ox) {
          const int64_t t = static_cast<int64_t>(labels[base + ox]);
          const acc g = per_pixel ? grad_p[base + ox] : grad_p[0];
          const bool ignored = ce_is_ignored(cfg, t);
          const acc wt = ignored ? acc(0) : ce_class_weight(cfg, t);
          const acc eps_c = cfg.smoothing / acc(classes);
          label_row[ox] = ignored ? -1 : static_cast<int32_t>(t);
          scale[ox] = ignored ? acc(0) : g * ((acc(1) - cfg.smoothing) * wt + eps_c * cfg.weight_sum);
          target_term[ox] = g * (acc(1) - cfg.smoothing) * wt;
          smooth[ox] = ignored ? acc(0) : g * eps_c;
          pixel_lse[ox] = lse_p[base + ox];
        }
        for (int64_t c = 0; c < classes; ++c) {
          interpolate_row(x + (n * classes + c) * plane_size, taps, oy, coarse_row.data(), z.data());
          const acc wc = ce_class_weight(cfg, c);
          for (int64_t ox = 0; ox < out_w; ++ox) {
            const acc p = vector_exp(z[ox] - pixel_lse[ox]);
            const acc d = p * scale[ox] - smooth[ox] * wc - (label_row[ox] == c ? target_term[ox] : acc(0));
            dz[ox] = label_row[ox] < 0 ? acc(0) : d;
          }
          // Transposed column taps, in output order (fixed, so deterministic).
          std::fill(folded.begin(), folded.end(), acc(0));
          for (int64_t ox = 0; ox < out_w; ++ox) {
            for (int k = 0; k < 2; ++k) {
              const acc wx = taps.col_weight[2 * ox + k];
              if (wx != acc(0)) folded[taps.col_index[2 * ox + k]] += wx * dz[ox];
            }
          }
          acc* plane = band.data() + c * (last - first) * in_w;
          for (int k = 0; k < 2; ++k) {
            const int64_t iy = taps.row_index[2 * oy + k];
            const acc wy = taps.row_weight[2 * oy + k];
            if (wy == acc(0) || iy < first || iy >= last) continue;
            acc* dst = plane + (iy - first) * in_w;
            for (int64_t ix = 0; ix < in_w; ++ix) dst[ix] += wy * folded[ix];
          }
        }
      }
      for (int64_t c = 0; c < classes; ++c) {
        const acc* src = band.data() + c * (last - first) * in_w;
        scalar_t* dst = out + (n * classes + c) * plane_size + first * in_w;
        for (int64_t i = 0; i < (last - first) * in_w; ++i) dst[i] = static_cast<scalar_t>(src[i]);
      }
    }
  });
}

at::Tensor upsample_cross_entropy_bwd(const at::Tensor& grad_pixel, const at::Tensor& coarse, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                      const at::Tensor& row_index, const at::Tensor& row_weight,
                                      const at::Tensor& row_readers, const at::Tensor& col_index,
                                      const at::Tensor& col_weight, const at::Tensor& col_readers,
                                      int64_t ignore_index, double smoothing) {
  check_geometry(coarse, row_index, row_weight, col_index, col_weight);
  check_ce_inputs(coarse, target, weight, row_index, col_index);
  check_readers(row_readers, coarse.size(2), "row");
  check_readers(col_readers, coarse.size(3), "col");
  const auto acc_type = row_weight.scalar_type();
  TORCH_CHECK(lse.sizes() == target.sizes() && lse.is_contiguous() && lse.scalar_type() == acc_type,
              "lse must be a contiguous ", acc_type, " tensor of target's shape");
  TORCH_CHECK(grad_pixel.scalar_type() == acc_type && grad_pixel.is_contiguous() &&
                  (grad_pixel.numel() == 1 || grad_pixel.sizes() == target.sizes()),
              "grad_pixel must be a contiguous ", acc_type, " scalar or a tensor of target's shape");
  TORCH_CHECK(row_readers.numel() == 0 || (row_readers.min().item<int32_t>() >= 0 &&
                                           row_readers.max().item<int32_t>() <= target.size(1)),
              "row_readers out of range");
  at::Tensor grad_coarse = at::empty_like(coarse);
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_cross_entropy_bwd", [&] {
    using scalar = scalar_t;
    const auto cfg = make_config<acc_t<scalar>>(weight, coarse.size(1), ignore_index, smoothing);
    const auto taps = make_taps<acc_t<scalar>>(coarse, target.size(1), target.size(2), row_index, row_weight,
                                               col_index, col_weight);
    FCN_DISPATCH_LABELS(target.scalar_type(), [&] {
      backward_impl<scalar, scalar_t>(grad_pixel, coarse, target, lse, cfg, taps, row_readers.data_ptr<int32_t>(),
                                      grad_coarse);
    });
  });
  return grad_coarse;
}

// torch.argmax's order: the first NaN wins, else the first maximum.
template <typename acc>
inline bool argmax_takes(acc candidate, acc best) {
  if (best != best) return false;
  return candidate != candidate || candidate > best;
}

template <typename scalar_t, typename label_t>
void argmax_impl(const at::Tensor& coarse, const Taps<acc_t<scalar_t>>& taps, at::Tensor& labels) {
  using acc = acc_t<scalar_t>;
  const int64_t batch = coarse.size(0), classes = coarse.size(1);
  const int64_t plane_size = taps.in_h * taps.in_w, out_w = taps.out_w, out_h = taps.out_h;
  const scalar_t* x = coarse.data_ptr<scalar_t>();
  label_t* out = labels.data_ptr<label_t>();
  at::parallel_for(0, batch * out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> coarse_row(taps.in_w), z(out_w), best(out_w);
    std::vector<int64_t> best_class(out_w);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h, oy = row % out_h;
      for (int64_t c = 0; c < classes; ++c) {
        acc* dst = c == 0 ? best.data() : z.data();
        interpolate_row(x + (n * classes + c) * plane_size, taps, oy, coarse_row.data(), dst);
        if (c == 0) {
          std::fill(best_class.begin(), best_class.end(), 0);
          continue;
        }
        for (int64_t ox = 0; ox < out_w; ++ox) {
          if (argmax_takes(z[ox], best[ox])) {
            best[ox] = z[ox];
            best_class[ox] = c;
          }
        }
      }
      for (int64_t ox = 0; ox < out_w; ++ox) out[row * out_w + ox] = static_cast<label_t>(best_class[ox]);
    }
  });
}

at::Tensor upsample_argmax(const at::Tensor& coarse, const at::Tensor& row_index, const at::Tensor& row_weight,
                           const at::Tensor& col_index, const at::Tensor& col_weight, at::ScalarType dtype) {
  check_geometry(coarse, row_index, row_weight, col_index, col_weight);
  TORCH_CHECK(dtype == at::kLong || (dtype == at::kByte && coarse.size(1) <= 256),
              "dtype must be int64, or uint8 for at most 256 classes");
  at::Tensor labels = at::empty({coarse.size(0), row_index.size(0), col_index.size(0)}, coarse.options().dtype(dtype));
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_argmax", [&] {
    using scalar = scalar_t;
    const auto taps = make_taps<acc_t<scalar>>(coarse, labels.size(1), labels.size(2), row_index, row_weight,
                                               col_index, col_weight);
    if (dtype == at::kLong) {
      argmax_impl<scalar, int64_t>(coarse, taps, labels);
    } else {
      argmax_impl<scalar, uint8_t>(coarse, taps, labels);
    }
  });
  return labels;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcn_fast, CPU, m) {
  m.impl("_upsample_cross_entropy_fwd", &upsample_cross_entropy_fwd);
  m.impl("_upsample_cross_entropy_bwd", &upsample_cross_entropy_bwd);
  m.impl("_upsample_argmax", &upsample_argmax);
}

}  // namespace fcn_fast
