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

// The selects in vector_exp and the masked gradient are compares of floats, which GCC will not turn into vector blends
// while it must preserve floating-point exception flags (-ftrapping-math, its default). Nothing here reads those
// flags, so drop that for this file; set before the includes, since GCC does not inline a function compiled with
// other options into ours.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

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
#include "fcn_fast/upsample_ce.h"
#include "fcn_fast/vector_exp.h"

namespace fcn_fast {
namespace {

#define FCN_DISPATCH_LABELS(TYPE, ...) AT_DISPATCH_INTEGRAL_TYPES(TYPE, "labels", __VA_ARGS__)

// The logits of output row oy for one class plane, as upsample_add produces them (rounded to scalar_t):
// coarse_row is per-thread scratch of in_w, z receives out_w values.
template <typename scalar_t, typename acc>
inline void interpolate_row(const scalar_t* plane, const UpsampleTaps<acc>& taps, int64_t oy, acc* coarse_row, acc* z) {
  const int64_t y0 = taps.row_index[2 * oy], y1 = taps.row_index[2 * oy + 1];
  const acc wy0 = taps.row_weight[2 * oy], wy1 = taps.row_weight[2 * oy + 1];
  const scalar_t* r0 = plane + y0 * taps.in_w;
  const scalar_t* r1 = plane + y1 * taps.in_w;
#pragma omp simd
  for (int64_t x = 0; x < taps.in_w; ++x) {
    coarse_row[x] = wy0 * static_cast<acc>(r0[x]) + wy1 * static_cast<acc>(r1[x]);
  }
  const int32_t* ci = taps.col_index;
  const acc* cw = taps.col_weight;
#pragma omp simd
  for (int64_t ox = 0; ox < taps.out_w; ++ox) {
    const acc v = cw[2 * ox] * coarse_row[ci[2 * ox]] + cw[2 * ox + 1] * coarse_row[ci[2 * ox + 1]];
    z[ox] = static_cast<acc>(static_cast<scalar_t>(v));
  }
}

template <typename scalar_t, typename label_t>
void forward_impl(const at::Tensor& coarse, const at::Tensor& target, const CeConfig<acc_t<scalar_t>>& cfg,
                  const UpsampleTaps<acc_t<scalar_t>>& taps, at::Tensor& loss, at::Tensor& denom, at::Tensor& lse) {
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
#pragma omp simd
        for (int64_t ox = 0; ox < out_w; ++ox) max[ox] = zc[ox] > max[ox] ? zc[ox] : max[ox];
      }
      for (int64_t c = 0; c < classes; ++c) {
        const acc* zc = z.data() + c * out_w;
        const acc* row_max = max.data();
        acc* row_sum = sum.data();
        // z - max is NaN for a NaN logit (and for an all -inf pixel): NaN propagates as in PyTorch.
#pragma omp simd
        for (int64_t ox = 0; ox < out_w; ++ox) row_sum[ox] += vector_exp(zc[ox] - row_max[ox]);
      }
      if (cfg.smoothing != acc(0)) {
        for (int64_t c = 0; c < classes; ++c) {
          const acc* zc = z.data() + c * out_w;
          const acc wc = ce_class_weight(cfg, c);
#pragma omp simd
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
  check_upsample_geometry(coarse, row_index, row_weight, col_index, col_weight);
  check_ce_arguments(coarse, target, weight, row_index, col_index);
  const auto acc_type = row_weight.scalar_type();
  const auto shape = target.sizes();
  at::Tensor loss = at::empty(shape, coarse.options().dtype(acc_type));
  at::Tensor denom = at::empty(shape, coarse.options().dtype(acc_type));
  at::Tensor lse = at::empty(shape, coarse.options().dtype(acc_type));
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_cross_entropy_fwd", [&] {
    using scalar = scalar_t;
    using acc = acc_t<scalar>;
    const auto cfg = make_ce_config<acc>(weight ? weight->data_ptr<acc>() : nullptr, coarse.size(1), ignore_index,
                                         acc(smoothing));
    const auto taps = make_upsample_taps<acc>(coarse, row_index, row_weight, col_index, col_weight);
    FCN_DISPATCH_LABELS(target.scalar_type(), [&] {
      forward_impl<scalar, scalar_t>(coarse, target, cfg, taps, loss, denom, lse);
    });
  });
  return std::make_tuple(loss, denom, lse);
}

// grad_pixel is one value for every pixel (numel 1) or one per pixel (N, H, W).
template <typename scalar_t, typename label_t>
void backward_impl(const at::Tensor& grad_pixel, const at::Tensor& coarse, const at::Tensor& target,
                   const at::Tensor& lse, const CeConfig<acc_t<scalar_t>>& cfg, const UpsampleTaps<acc_t<scalar_t>>& taps,
                   const int32_t* row_readers, const int32_t* col_readers, at::Tensor& grad_coarse) {
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

  // Column readers windows as dense rows of weights: coarse column ix reads dz[fold_start[ix] + k] with weight
  // fold_weight[ix * span + k], k < span (the widest window; shorter ones are padded with 0).
  int64_t span = 1;
  for (int64_t ix = 0; ix < in_w; ++ix) span = std::max<int64_t>(span, col_readers[2 * ix + 1] - col_readers[2 * ix]);
  std::vector<int64_t> fold_start(in_w);
  std::vector<acc> fold_weight(in_w * span, acc(0));
  for (int64_t ix = 0; ix < in_w; ++ix) {
    fold_start[ix] = std::min<int64_t>(col_readers[2 * ix], out_w);
    for (int64_t ox = col_readers[2 * ix]; ox < col_readers[2 * ix + 1]; ++ox) {
      fold_weight[ix * span + (ox - fold_start[ix])] = tap_weight(taps.col_index, taps.col_weight, ox, ix);
    }
  }

  at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
    // dz is padded by one window so every column's window reads in bounds (the padding weighs 0).
    std::vector<acc> coarse_row(in_w), z(out_w), dz(out_w + span, acc(0)), folded(in_w), band;
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
#pragma omp simd
          for (int64_t ox = 0; ox < out_w; ++ox) {
            const acc p = vector_exp(z[ox] - pixel_lse[ox]);
            const acc d = p * scale[ox] - smooth[ox] * wc - (label_row[ox] == c ? target_term[ox] : acc(0));
            dz[ox] = label_row[ox] < 0 ? acc(0) : d;
          }
          // Transposed column taps as a gather: each coarse column sums its readers window (fixed order).
          for (int64_t ix = 0; ix < in_w; ++ix) {
            const acc* w = fold_weight.data() + ix * span;
            const acc* d = dz.data() + fold_start[ix];
            acc total = 0;
#pragma omp simd reduction(+ : total)
            for (int64_t k = 0; k < span; ++k) total += w[k] * d[k];
            folded[ix] = total;
          }
          acc* plane = band.data() + c * (last - first) * in_w;
          for (int k = 0; k < 2; ++k) {
            const int64_t iy = taps.row_index[2 * oy + k];
            const acc wy = taps.row_weight[2 * oy + k];
            if (wy == acc(0) || iy < first || iy >= last) continue;
            acc* dst = plane + (iy - first) * in_w;
#pragma omp simd
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
  check_upsample_geometry(coarse, row_index, row_weight, col_index, col_weight, &row_readers, &col_readers);
  check_ce_arguments(coarse, target, weight, row_index, col_index);
  check_ce_backward_arguments(grad_pixel, target, lse, row_weight.scalar_type());
  at::Tensor grad_coarse = at::empty_like(coarse);
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_cross_entropy_bwd", [&] {
    using scalar = scalar_t;
    using acc = acc_t<scalar>;
    const auto cfg = make_ce_config<acc>(weight ? weight->data_ptr<acc>() : nullptr, coarse.size(1), ignore_index,
                                         acc(smoothing));
    const auto taps = make_upsample_taps<acc>(coarse, row_index, row_weight, col_index, col_weight);
    FCN_DISPATCH_LABELS(target.scalar_type(), [&] {
      backward_impl<scalar, scalar_t>(grad_pixel, coarse, target, lse, cfg, taps, row_readers.data_ptr<int32_t>(),
                                      col_readers.data_ptr<int32_t>(), grad_coarse);
    });
  });
  return grad_coarse;
}

template <typename scalar_t, typename label_t>
void argmax_impl(const at::Tensor& coarse, const UpsampleTaps<acc_t<scalar_t>>& taps, at::Tensor& labels) {
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
  check_upsample_geometry(coarse, row_index, row_weight, col_index, col_weight);
  check_label_dtype(coarse, dtype);
  at::Tensor labels = at::empty({coarse.size(0), row_index.size(0), col_index.size(0)}, coarse.options().dtype(dtype));
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_argmax", [&] {
    using scalar = scalar_t;
    const auto taps = make_upsample_taps<acc_t<scalar>>(coarse, row_index, row_weight, col_index, col_weight);
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
