// upsample_cross_entropy and upsample_argmax on the CPU (ATen's OpenMP thread pool).
//
// Forward works one output row at a time: the C logit rows of that output row are blended from two coarse rows
// resampled along W (resample_cpu.h: each coarse row is resampled once for the ~factor output rows that read it),
// into a per-thread buffer, then each pixel runs the shared per-pixel cross-entropy (softmax_ce.h). Nothing of size
// N*C*H*W exists: the scratch is C rows of the output width per thread.
//
// Backward: each task owns a band of coarse rows of one image and walks the output rows that read them, recomputing
// each logit row exactly as forward did (same arithmetic, so exp(z - max) e^-L is the softmax forward saw), turning it
// into dloss/dz and adding it, weighted, into a full-width row buffer per owned coarse row (the rows half of the
// adjoint); when the band is done each buffer row is folded over the column readers into grad_coarse. A task adds
// only into rows it owns and walks them in a fixed order: no atomics, bitwise deterministic (and independent of the
// thread count). Output rows on a band border are recomputed by both neighbouring bands; bands are sized so that
// costs a few percent.

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

#include "fcn_fast/common.h"
#include "fcn_fast/cross_entropy_host.h"
#include "fcn_fast/resample_cpu.h"
#include "fcn_fast/softmax_ce.h"
#include "fcn_fast/upsample_ce.h"
#include "fcn_fast/vector_math.h"

namespace fcn_fast {
namespace {

#define FCN_DISPATCH_LABELS(TYPE, ...) AT_DISPATCH_INTEGRAL_TYPES(TYPE, "labels", __VA_ARGS__)

// Rows that share resampled coarse rows should stay on one thread: about this many per parallel chunk.
constexpr int64_t kRowsPerChunk = 8;
// The backward's per-thread row-adjoint buffer of a band of coarse rows (C x rows x out_w) stays under this.
constexpr int64_t kBandBufferBytes = int64_t(1) << 20;

// The logits of one output row for every class, rounded to scalar_t as upsample_add returns them: z[c * out_w + ox].
template <typename scalar_t, typename acc>
inline void blend_logit_rows(const acc* h0, const acc* h1, acc wy0, acc wy1, int64_t classes, int64_t out_w, acc* z) {
  for (int64_t c = 0; c < classes; ++c) {
    const acc* a = h0 + c * out_w;
    const acc* b = h1 + c * out_w;
    acc* zc = z + c * out_w;
#pragma omp simd
    for (int64_t ox = 0; ox < out_w; ++ox) zc[ox] = widen(narrow<scalar_t>(blend_rows(wy0, a[ox], wy1, b[ox])));
  }
}

// The tap tables of both axes in the CPU layout, and the sizes they map between.
template <typename acc>
struct CpuGeometry {
  Taps<acc> rows, cols;
  int64_t in_h, in_w, out_h, out_w;
};

template <typename acc>
CpuGeometry<acc> cpu_geometry(const at::Tensor& coarse, const at::Tensor& row_index, const at::Tensor& row_weight,
                              const at::Tensor& col_index, const at::Tensor& col_weight) {
  return {split_taps<acc>(row_index, row_weight, coarse.size(2), "row"),
          split_taps<acc>(col_index, col_weight, coarse.size(3), "col"), coarse.size(2), coarse.size(3),
          row_index.size(0), col_index.size(0)};
}

template <typename scalar_t, typename label_t>
void forward_impl(const at::Tensor& coarse, const at::Tensor& target, const CeConfig<acc_t<scalar_t>>& cfg,
                  const CpuGeometry<acc_t<scalar_t>>& geo, bool per_pixel, at::Tensor& loss, at::Tensor& denom,
                  at::Tensor& lse) {
  using acc = acc_t<scalar_t>;
  const int64_t batch = coarse.size(0), classes = coarse.size(1);
  const int64_t plane_size = geo.in_h * geo.in_w, out_w = geo.out_w, out_h = geo.out_h;
  const scalar_t* x = coarse.data_ptr<scalar_t>();
  const label_t* labels = target.data_ptr<label_t>();
  acc* loss_p = loss.data_ptr<acc>();
  acc* denom_p = denom.data_ptr<acc>();
  // The softmax statistics (softmax_ce.h): planes of each pixel's max logit and log sum exp(z - max).
  acc* max_p = lse.data_ptr<acc>();
  acc* log_sum_p = max_p + lse.numel() / 2;
  // Per thread: two resampled coarse rows and the logits of one output row (C rows of out_w each), then the max,
  // sum and weighted-sum rows.
  at::Tensor scratch = allocate_thread_scratch(3 * classes * out_w + 3 * out_w, lse.scalar_type());
  at::parallel_for(0, batch * out_h, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    acc* slots = thread_scratch<acc>(scratch);
    acc* z = slots + 2 * classes * out_w;
    acc* max = z + classes * out_w;
    acc* sum = max + out_w;
    acc* weighted = sum + out_w;
    ResampledRows<scalar_t, acc> resampled(geo.cols, geo.in_w, plane_size, classes, slots);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h, oy = row % out_h;
      const scalar_t* image = x + n * classes * plane_size;
      const int64_t y0 = geo.rows.i0[oy], y1 = geo.rows.i1[oy];
      const acc* h0 = resampled.row(image, n, y0, y1);
      const acc* h1 = resampled.row(image, n, y1, y0);
      blend_logit_rows<scalar_t>(h0, h1, geo.rows.w0[oy], geo.rows.w1[oy], classes, out_w, z);
      // Softmax statistics for the whole row, class by class, so the loops over ox vectorize; all relative to each
      // pixel's max (softmax_ce.h).
      std::fill(max, max + out_w, -std::numeric_limits<acc>::infinity());
      std::fill(sum, sum + out_w, acc(0));
      std::fill(weighted, weighted + out_w, acc(0));
      for (int64_t c = 0; c < classes; ++c) {
        const acc* zc = z + c * out_w;
#pragma omp simd
        for (int64_t ox = 0; ox < out_w; ++ox) max[ox] = zc[ox] > max[ox] ? zc[ox] : max[ox];
      }
      for (int64_t c = 0; c < classes; ++c) {
        const acc* zc = z + c * out_w;
        // z - max is NaN for a NaN logit (and for an all -inf pixel): NaN propagates as in PyTorch.
#pragma omp simd
        for (int64_t ox = 0; ox < out_w; ++ox) sum[ox] += vector_exp(zc[ox] - max[ox]);
      }
      if (cfg.smoothing != acc(0)) {
        for (int64_t c = 0; c < classes; ++c) {
          const acc* zc = z + c * out_w;
          const acc wc = ce_class_weight(cfg, c);
#pragma omp simd
          for (int64_t ox = 0; ox < out_w; ++ox) weighted[ox] += wc * (zc[ox] - max[ox]);
        }
      }
      const int64_t base = row * out_w;
      acc* row_log_sum = log_sum_p + base;
#pragma omp simd
      for (int64_t ox = 0; ox < out_w; ++ox) row_log_sum[ox] = vector_log(sum[ox]);
      std::copy(max, max + out_w, max_p + base);
      // Per pixel, or summed over the row in ox order (a fixed order: the total is the same on every run).
      acc row_loss = 0, row_denom = 0;
      for (int64_t ox = 0; ox < out_w; ++ox) {
        const int64_t t = static_cast<int64_t>(labels[base + ox]);
        const acc target_shifted = ce_is_ignored(cfg, t) ? acc(0) : z[t * out_w + ox] - max[ox];
        acc pixel_loss, pixel_denom;
        ce_pixel_loss(cfg, t, CePixelStats<acc>{max[ox], row_log_sum[ox], target_shifted, weighted[ox]}, &pixel_loss,
                      &pixel_denom);
        if (per_pixel) {
          loss_p[base + ox] = pixel_loss;
          denom_p[base + ox] = pixel_denom;
        } else {
          row_loss += pixel_loss;
          row_denom += pixel_denom;
        }
      }
      if (!per_pixel) {
        loss_p[row] = row_loss;
        denom_p[row] = row_denom;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_cross_entropy_fwd(const at::Tensor& coarse, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight,
                                                   const at::Tensor& row_index, const at::Tensor& row_weight,
                                                   const at::Tensor& col_index, const at::Tensor& col_weight,
                                                   int64_t ignore_index, double smoothing, bool per_pixel) {
  check_upsample_geometry(coarse, row_index, row_weight, col_index, col_weight);
  check_ce_arguments(coarse, target, weight, row_index, col_index);
  at::Tensor loss, denom, lse;  // not a structured binding: the dispatch lambdas capture them
  // Per pixel, or one (loss, denom) sum per output row.
  const int64_t rows = target.size(0) * target.size(1);
  std::tie(loss, denom, lse) =
      ce_pixel_outputs(target.sizes(), per_pixel ? target.sizes() : at::IntArrayRef(&rows, 1), coarse);
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_cross_entropy_fwd", [&] {
    using scalar = scalar_t;
    using acc = acc_t<scalar>;
    const auto cfg = make_ce_config<acc>(weight ? weight->data_ptr<acc>() : nullptr, coarse.size(1), ignore_index,
                                         acc(smoothing));
    const auto geo = cpu_geometry<acc>(coarse, row_index, row_weight, col_index, col_weight);
    FCN_DISPATCH_LABELS(target.scalar_type(), [&] {
      forward_impl<scalar, scalar_t>(coarse, target, cfg, geo, per_pixel, loss, denom, lse);
    });
  });
  return std::make_tuple(loss, denom, lse);
}

// grad_pixel is one value for every pixel (numel 1) or one per pixel (N, H, W).
template <typename scalar_t, typename label_t>
void backward_impl(const at::Tensor& grad_pixel, const at::Tensor& coarse, const at::Tensor& target,
                   const at::Tensor& lse, const CeConfig<acc_t<scalar_t>>& cfg, const CpuGeometry<acc_t<scalar_t>>& geo,
                   const int32_t* row_readers, const Readers<acc_t<scalar_t>>& col_readers, at::Tensor& grad_coarse) {
  using acc = acc_t<scalar_t>;
  const int64_t batch = coarse.size(0), classes = coarse.size(1);
  const int64_t in_h = geo.in_h, in_w = geo.in_w, out_w = geo.out_w, plane_size = in_h * in_w;
  const scalar_t* x = coarse.data_ptr<scalar_t>();
  const label_t* labels = target.data_ptr<label_t>();
  const acc* max_p = lse.data_ptr<acc>();  // the forward's softmax statistics, two planes (softmax_ce.h)
  const acc* log_sum_p = max_p + lse.numel() / 2;
  const acc* grad_p = grad_pixel.data_ptr<acc>();
  const bool per_pixel = grad_pixel.numel() != 1;
  scalar_t* out = grad_coarse.data_ptr<scalar_t>();

  // Bands as tall as the row-adjoint buffer allows (each band border recomputes about one coarse row's worth of
  // output rows, so the overhead is ~1 / band_rows), then split further until every thread gets the same number of
  // tasks.
  const int64_t threads = static_cast<int64_t>(at::get_num_threads());
  const int64_t row_bytes = classes * out_w * static_cast<int64_t>(sizeof(acc));
  const int64_t max_band_rows = std::max<int64_t>(1, kBandBufferBytes / row_bytes);
  int64_t bands_per_image = std::min<int64_t>(in_h, (in_h + max_band_rows - 1) / max_band_rows);
  while (bands_per_image < in_h && (batch * bands_per_image) % threads != 0) ++bands_per_image;
  const int64_t band_rows = (in_h + bands_per_image - 1) / bands_per_image;
  const int64_t bands = (in_h + band_rows - 1) / band_rows;

  // Per thread: two resampled coarse rows (C x out_w each), the band's row-adjoint buffer (C x band_rows x out_w),
  // then six per-pixel rows of out_w (dz, scale, target_term, smooth, max, labels as acc-sized ints).
  const int64_t band_size = classes * band_rows * out_w;
  at::Tensor scratch = allocate_thread_scratch(2 * classes * out_w + band_size + 6 * out_w, lse.scalar_type());
  at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
    acc* slots = thread_scratch<acc>(scratch);
    acc* band = slots + 2 * classes * out_w;
    acc* dz = band + band_size;
    acc* scale = dz + out_w;
    acc* target_term = scale + out_w;
    acc* smooth = target_term + out_w;
    acc* pixel_max = smooth + out_w;
    int32_t* label_row = reinterpret_cast<int32_t*>(pixel_max + out_w);  // acc is at least 4 bytes
    ResampledRows<scalar_t, acc> resampled(geo.cols, in_w, plane_size, classes, slots);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, first = (task % bands) * band_rows;
      const int64_t last = std::min(first + band_rows, in_h);  // rows [first, last) of every class plane
      const int64_t owned = last - first;
      const scalar_t* image = x + n * classes * plane_size;
      std::fill(band, band + classes * owned * out_w, acc(0));
      int64_t oy_begin = geo.out_h, oy_end = 0;
      for (int64_t iy = first; iy < last; ++iy) {
        if (row_readers[2 * iy] < row_readers[2 * iy + 1]) {
          oy_begin = std::min<int64_t>(oy_begin, row_readers[2 * iy]);
          oy_end = std::max<int64_t>(oy_end, row_readers[2 * iy + 1]);
        }
      }
      for (int64_t oy = oy_begin; oy < oy_end; ++oy) {
        const int64_t base = (n * geo.out_h + oy) * out_w;
        // dloss/dz_c = exp(z_c - max) * scale - target_term [c == t] - smooth * w_c (softmax_ce.h), each scaled by
        // the pixel's incoming gradient; the per-pixel factors are hoisted out of the class loop. Ignored pixels: 0.
        for (int64_t ox = 0; ox < out_w; ++ox) {
          const int64_t t = static_cast<int64_t>(labels[base + ox]);
          const CeGradCoef<acc> k =
              ce_grad_coef(cfg, t, per_pixel ? grad_p[base + ox] : grad_p[0], log_sum_p[base + ox]);
          label_row[ox] = ce_is_ignored(cfg, t) ? -1 : static_cast<int32_t>(t);
          scale[ox] = k.prob_scale;
          target_term[ox] = k.target_scale;
          smooth[ox] = k.smooth_scale;
          pixel_max[ox] = max_p[base + ox];
        }
        const int64_t y0 = geo.rows.i0[oy], y1 = geo.rows.i1[oy];
        const acc wy0 = geo.rows.w0[oy], wy1 = geo.rows.w1[oy];
        const acc* h0 = resampled.row(image, n, y0, y1);
        const acc* h1 = resampled.row(image, n, y1, y0);
        // The owned coarse rows this output row feeds, and with what weight: tap_weight of bilinear.h (both taps
        // on one row add up). A weight-0 tap feeds its 0 * dz too, as PyTorch's upsample_bilinear2d backward does
        // (NaN for a NaN or infinite dz).
        const acc w_first = y1 == y0 ? wy0 + wy1 : wy0;
        const bool feeds0 = y0 >= first && y0 < last;
        const bool feeds1 = y1 != y0 && y1 >= first && y1 < last;
        const bool zero_twin = feeds0 && y1 == y0 && (wy0 == acc(0) || wy1 == acc(0));  // tap_zero_twin
        for (int64_t c = 0; c < classes; ++c) {
          const acc* a = h0 + c * out_w;
          const acc* b = h1 + c * out_w;
          const acc wc = ce_class_weight(cfg, c);
          const int32_t cls = static_cast<int32_t>(c);
#pragma omp simd
          for (int64_t ox = 0; ox < out_w; ++ox) {
            const acc z = widen(narrow<scalar_t>(blend_rows(wy0, a[ox], wy1, b[ox])));
            const acc p = vector_exp(z - pixel_max[ox]);
            // An ignored pixel's coefficients are 0: p * 0, NaN where its logits hold NaN/+inf, as in PyTorch.
            dz[ox] = p * scale[ox] - smooth[ox] * wc - (label_row[ox] == cls ? target_term[ox] : acc(0));
          }
          acc* plane = band + c * owned * out_w;
          if (feeds0) {
            acc* dst = plane + (y0 - first) * out_w;
#pragma omp simd
            for (int64_t ox = 0; ox < out_w; ++ox) dst[ox] += w_first * dz[ox];
            if (zero_twin) {
              for (int64_t ox = 0; ox < out_w; ++ox) dst[ox] += acc(0) * dz[ox];
            }
          }
          if (feeds1) {
            acc* dst = plane + (y1 - first) * out_w;
#pragma omp simd
            for (int64_t ox = 0; ox < out_w; ++ox) dst[ox] += wy1 * dz[ox];
          }
        }
      }
      for (int64_t c = 0; c < classes; ++c) {
        for (int64_t iy = first; iy < last; ++iy) {
          fold_columns(col_readers, band + (c * owned + iy - first) * out_w, in_w,
                       out + (n * classes + c) * plane_size + iy * in_w);
        }
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
    const auto geo = cpu_geometry<acc>(coarse, row_index, row_weight, col_index, col_weight);
    const auto cols = transpose_taps<acc>(col_index, col_weight, col_readers, coarse.size(3), "col");
    FCN_DISPATCH_LABELS(target.scalar_type(), [&] {
      backward_impl<scalar, scalar_t>(grad_pixel, coarse, target, lse, cfg, geo, row_readers.data_ptr<int32_t>(),
                                      cols, grad_coarse);
    });
  });
  return grad_coarse;
}

template <typename scalar_t, typename label_t>
void argmax_impl(const at::Tensor& coarse, const CpuGeometry<acc_t<scalar_t>>& geo, at::Tensor& labels) {
  using acc = acc_t<scalar_t>;
  const int64_t batch = coarse.size(0), classes = coarse.size(1);
  const int64_t plane_size = geo.in_h * geo.in_w, out_w = geo.out_w, out_h = geo.out_h;
  const scalar_t* x = coarse.data_ptr<scalar_t>();
  label_t* out = labels.data_ptr<label_t>();
  // Per thread: two resampled coarse rows (C x out_w each), the best logit and its class (as acc-sized ints).
  at::Tensor scratch = allocate_thread_scratch(2 * classes * out_w + 2 * out_w, acc_scalar_type(coarse.scalar_type()));
  at::parallel_for(0, batch * out_h, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    acc* slots = thread_scratch<acc>(scratch);
    acc* best = slots + 2 * classes * out_w;
    int32_t* best_class = reinterpret_cast<int32_t*>(best + out_w);
    ResampledRows<scalar_t, acc> resampled(geo.cols, geo.in_w, plane_size, classes, slots);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h, oy = row % out_h;
      const scalar_t* image = x + n * classes * plane_size;
      const int64_t y0 = geo.rows.i0[oy], y1 = geo.rows.i1[oy];
      const acc wy0 = geo.rows.w0[oy], wy1 = geo.rows.w1[oy];
      const acc* h0 = resampled.row(image, n, y0, y1);
      const acc* h1 = resampled.row(image, n, y1, y0);
      for (int64_t ox = 0; ox < out_w; ++ox) {
        best[ox] = widen(narrow<scalar_t>(blend_rows(wy0, h0[ox], wy1, h1[ox])));
        best_class[ox] = 0;
      }
      for (int64_t c = 1; c < classes; ++c) {
        const acc* a = h0 + c * out_w;
        const acc* b = h1 + c * out_w;
        const int32_t cls = static_cast<int32_t>(c);
#pragma omp simd
        for (int64_t ox = 0; ox < out_w; ++ox) {
          const acc z = widen(narrow<scalar_t>(blend_rows(wy0, a[ox], wy1, b[ox])));
          const bool takes = argmax_takes(z, best[ox]);
          best[ox] = takes ? z : best[ox];
          best_class[ox] = takes ? cls : best_class[ox];
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
    const auto geo = cpu_geometry<acc_t<scalar>>(coarse, row_index, row_weight, col_index, col_weight);
    if (dtype == at::kLong) {
      argmax_impl<scalar, int64_t>(coarse, geo, labels);
    } else {
      argmax_impl<scalar, uint8_t>(coarse, geo, labels);
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
