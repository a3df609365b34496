// softmax_cross_entropy on the CPU: logits (N, C, S) read in place with their strides (no permute copies).
//
// Fast path, pixels contiguous (NCHW, the segmentation layout): a task is a block of kBlock pixels of one image; it
// sweeps the C rows of the block (each row is kBlock consecutive pixels of one class, stride S apart), so every inner
// loop runs over consecutive pixels and vectorizes. The first sweep copies the block (C x kBlock values) into a
// contiguous buffer that stays in L1/L2 and takes the max, the second the exp-sum: one exp per logit, where an online
// softmax would pay two.
// Other layouts (channels-last, (N, C) class scores) take the per-pixel path: one online softmax (softmax_ce.h) per
// pixel over its C strided logits.
// Forward writes per pixel the loss, its weight in the "mean" denominator and the log-sum-exp (the one float backward
// keeps); backward recomputes p = exp(z - lse) and writes the gradient, again one exp per logit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// GCC keeps the NaN-preserving selects of vector_exp as branches (a compare may raise an FP exception flag nobody here
// reads) unless told that FP traps do not matter (set before our headers, whose
// helpers inline into those loops); only then do the exp loops vectorize (about 3x faster).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "fcn_fast/common.h"
#include "fcn_fast/cross_entropy_host.h"
#include "fcn_fast/softmax_ce.h"
#include "fcn_fast/vector_math.h"

namespace fcn_fast {
namespace {

constexpr int64_t kBlock = 512;  // pixels per task on the contiguous path

// Asks for the same class row of the next block while this one is being read: C rows H*W apart are C concurrent
// streams, more than the hardware prefetcher follows (perf: the first read of each row was the forward's hot spot).
template <typename scalar_t>
inline void prefetch_next_block(const scalar_t* row, int64_t p0, int64_t s) {
  if (p0 + 2 * kBlock > s) return;  // the next block is partial or belongs to the next image: leave it to hardware
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t k = kBlock; k < 2 * kBlock; k += kLine) __builtin_prefetch(row + k, 0, 3);
}

template <typename acc_t>
CeConfig<acc_t> make_config(const c10::optional<at::Tensor>& weight, int64_t num_classes, int64_t ignore_index,
                            double smoothing) {
  return make_ce_config<acc_t>(weight.has_value() ? weight->data_ptr<acc_t>() : nullptr, num_classes, ignore_index,
                               static_cast<acc_t>(smoothing));
}

template <typename scalar_t, typename target_t, typename acc_t>
void forward_blocks(const CeLayout& L, const scalar_t* logits, const target_t* target, const CeConfig<acc_t>& cfg,
                    acc_t* loss, acc_t* denom, acc_t* lse_out) {
  const int64_t blocks = (L.s + kBlock - 1) / kBlock;
  const bool smoothing = cfg.smoothing != acc_t(0);
  at::parallel_for(0, L.n * blocks, 1, [&](int64_t begin, int64_t end) {
    // The block's logits, copied once in acc_t: rows H*W apart in memory all map to the same cache sets (the
    // stride is a large power of two at 512x512), so re-reading them in place for the second sweep would miss.
    std::vector<acc_t> block(static_cast<size_t>(L.c * kBlock));
    acc_t row_max[kBlock], row_sum[kBlock], weighted_sum[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * kBlock;
      const int64_t len = std::min(kBlock, L.s - p0);
      const scalar_t* base = logits + n * L.logit_n + p0;
      for (int64_t p = 0; p < len; ++p) {
        row_max[p] = -std::numeric_limits<acc_t>::infinity();
        row_sum[p] = 0;
        weighted_sum[p] = 0;
      }
      for (int64_t c = 0; c < L.c; ++c) {
        const scalar_t* row = base + c * L.logit_c;
        acc_t* z = block.data() + c * kBlock;
        prefetch_next_block(row, p0, L.s);
        if constexpr (!std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) z[p] = widen(row[p]);
        }
#pragma omp simd
        for (int64_t p = 0; p < len; ++p) {
          if constexpr (std::is_same_v<scalar_t, acc_t>) z[p] = row[p];
          row_max[p] = z[p] > row_max[p] ? z[p] : row_max[p];  // a NaN logit is skipped here, poisons the sum below
        }
      }
      for (int64_t c = 0; c < L.c; ++c) {
        const acc_t* z = block.data() + c * kBlock;
#pragma omp simd
        for (int64_t p = 0; p < len; ++p) row_sum[p] += vector_exp(z[p] - row_max[p]);
        if (smoothing) {
          const acc_t w = ce_class_weight(cfg, c);
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) weighted_sum[p] += w * z[p];
        }
      }
      const int64_t out = n * L.s + p0;
      acc_t* lse = lse_out + out;
#pragma omp simd
      for (int64_t p = 0; p < len; ++p) lse[p] = row_max[p] + vector_log(row_sum[p]);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t t = static_cast<int64_t>(target[n * L.target_n + (p0 + p) * L.target_s]);
        const acc_t z_t = ce_is_ignored(cfg, t) ? acc_t(0) : block[t * kBlock + p];
        ce_pixel_loss(cfg, t, lse[p], z_t, weighted_sum[p], &loss[out + p], &denom[out + p]);
      }
    }
  });
}

template <typename scalar_t, typename target_t, typename acc_t>
void forward_pixels(const CeLayout& L, const scalar_t* logits, const target_t* target, const CeConfig<acc_t>& cfg,
                    acc_t* loss, acc_t* denom, acc_t* lse_out) {
  at::parallel_for(0, L.n * L.s, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / L.s, p = i % L.s;
      const int64_t t = static_cast<int64_t>(target[n * L.target_n + p * L.target_s]);
      const scalar_t* z = logits + n * L.logit_n + p * L.logit_s;
      CeAccumulator<acc_t> acc;
      for (int64_t c = 0; c < L.c; ++c) acc.add(cfg, c, static_cast<acc_t>(z[c * L.logit_c]), t);
      ce_pixel_loss(cfg, t, acc.lse(), acc.target_logit, acc.weighted_logit_sum, &loss[i], &denom[i]);
      lse_out[i] = acc.lse();
    }
  });
}

template <typename scalar_t, typename target_t, typename acc_t>
void backward_blocks(const CeLayout& L, const scalar_t* logits, const target_t* target, const acc_t* lse,
                     const acc_t* grad_loss, int64_t gn, int64_t gs, const CeConfig<acc_t>& cfg, scalar_t* grad,
                     int64_t dn, int64_t dc) {
  const int64_t blocks = (L.s + kBlock - 1) / kBlock;
  at::parallel_for(0, L.n * blocks, 1, [&](int64_t begin, int64_t end) {
    acc_t prob_scale[kBlock], target_scale[kBlock], smooth_scale[kBlock], pixel_lse[kBlock], widened[kBlock];
    int32_t label[kBlock];  // int32: half the vector compares of int64 in the class loop
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * kBlock;
      const int64_t len = std::min(kBlock, L.s - p0);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t t = static_cast<int64_t>(target[n * L.target_n + (p0 + p) * L.target_s]);
        const CeGradCoef<acc_t> k = ce_grad_coef(cfg, t, grad_loss[n * gn + (p0 + p) * gs]);
        prob_scale[p] = k.prob_scale;
        target_scale[p] = k.target_scale;
        smooth_scale[p] = k.smooth_scale;
        pixel_lse[p] = lse[n * L.s + p0 + p];
        label[p] = ce_is_ignored(cfg, t) ? -1 : static_cast<int32_t>(t);
      }
      const scalar_t* base = logits + n * L.logit_n + p0;
      scalar_t* out = grad + n * dn + p0;
      for (int64_t c = 0; c < L.c; ++c) {
        const scalar_t* row = base + c * L.logit_c;
        scalar_t* out_row = out + c * dc;
        prefetch_next_block(row, p0, L.s);
        const acc_t w = ce_class_weight(cfg, c);
        const int32_t cls = static_cast<int32_t>(c);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) {
            const acc_t prob = vector_exp(row[p] - pixel_lse[p]);
            const CeGradCoef<acc_t> k{prob_scale[p], target_scale[p], smooth_scale[p]};
            out_row[p] = k.grad(prob, label[p] == cls, w);
          }
        } else {
          // Half/bfloat16: widen, compute and narrow in three loops, each of which vectorizes (one loop with the
          // conversions in it stayed scalar, exp included: 7x slower than fp32, measured).
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) widened[p] = widen(row[p]);
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) {
            const acc_t prob = vector_exp(widened[p] - pixel_lse[p]);
            const CeGradCoef<acc_t> k{prob_scale[p], target_scale[p], smooth_scale[p]};
            widened[p] = k.grad(prob, label[p] == cls, w);
          }
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) out_row[p] = narrow<scalar_t>(widened[p]);
        }
      }
    }
  });
}

template <typename scalar_t, typename target_t, typename acc_t>
void backward_pixels(const CeLayout& L, const scalar_t* logits, const target_t* target, const acc_t* lse,
                     const acc_t* grad_loss, int64_t gn, int64_t gs, const CeConfig<acc_t>& cfg, scalar_t* grad,
                     int64_t dn, int64_t dc, int64_t ds) {
  at::parallel_for(0, L.n * L.s, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / L.s, p = i % L.s;
      const int64_t t = static_cast<int64_t>(target[n * L.target_n + p * L.target_s]);
      const CeGradCoef<acc_t> k = ce_grad_coef(cfg, t, grad_loss[n * gn + p * gs]);
      const scalar_t* z = logits + n * L.logit_n + p * L.logit_s;
      scalar_t* out = grad + n * dn + p * ds;
      for (int64_t c = 0; c < L.c; ++c) {
        const acc_t prob = std::exp(static_cast<acc_t>(z[c * L.logit_c]) - lse[i]);
        out[c * dc] = static_cast<scalar_t>(k.grad(prob, c == t, ce_class_weight(cfg, c)));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_fwd_cpu(const at::Tensor& logits,
                                                                            const at::Tensor& target,
                                                                            const c10::optional<at::Tensor>& weight,
                                                                            int64_t ignore_index, double smoothing) {
  check_ce_kernel_args(logits, target, weight, c10::DeviceType::CPU);
  at::Tensor loss, denom, lse;  // not a structured binding: the dispatch lambdas capture them
  const int64_t pixel_shape[] = {logits.size(0), logits.size(2)};
  std::tie(loss, denom, lse) = ce_pixel_outputs(pixel_shape, pixel_shape, logits);
  if (loss.numel() == 0) return {loss, denom, lse};
  const CeLayout L = ce_layout(logits, target);
  FCN_DISPATCH_FLOATING(logits.scalar_type(), "softmax_cross_entropy_fwd_cpu", [&] {
    using logit_t = scalar_t;  // the nested dispatch below rebinds scalar_t to the label type
    using acc = acc_t<logit_t>;
    const auto cfg = make_config<acc>(weight, L.c, ignore_index, smoothing);
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "softmax_cross_entropy_fwd_cpu_target", [&] {
      using label_t = scalar_t;
      const logit_t* z = logits.data_ptr<logit_t>();
      const label_t* t = target.data_ptr<label_t>();
      if (L.logit_s == 1 && L.s > 1) {  // (N, C) scores (S = 1) go per sample, over contiguous classes
        forward_blocks(L, z, t, cfg, loss.data_ptr<acc>(), denom.data_ptr<acc>(), lse.data_ptr<acc>());
      } else {
        forward_pixels(L, z, t, cfg, loss.data_ptr<acc>(), denom.data_ptr<acc>(), lse.data_ptr<acc>());
      }
    });
  });
  return {loss, denom, lse};
}

at::Tensor softmax_cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                         const at::Tensor& target, const at::Tensor& lse,
                                         const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                         double smoothing) {
  check_ce_kernel_args(logits, target, weight, c10::DeviceType::CPU);
  check_ce_backward_args(grad_loss, logits, target, lse);
  at::Tensor grad = at::empty_like(logits);  // keeps the logits' strides when they are dense
  if (grad.numel() == 0) return grad;
  const CeLayout L = ce_layout(logits, target);
  FCN_DISPATCH_FLOATING(logits.scalar_type(), "softmax_cross_entropy_bwd_cpu", [&] {
    using logit_t = scalar_t;
    using acc = acc_t<logit_t>;
    const auto cfg = make_config<acc>(weight, L.c, ignore_index, smoothing);
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "softmax_cross_entropy_bwd_cpu_target", [&] {
      using label_t = scalar_t;
      const logit_t* z = logits.data_ptr<logit_t>();
      const label_t* t = target.data_ptr<label_t>();
      const acc* g = grad_loss.data_ptr<acc>();
      if (L.logit_s == 1 && grad.stride(2) == 1 && L.s > 1) {
        backward_blocks(L, z, t, lse.data_ptr<acc>(), g, grad_loss.stride(0), grad_loss.stride(1), cfg,
                        grad.data_ptr<logit_t>(), grad.stride(0), grad.stride(1));
      } else {
        backward_pixels(L, z, t, lse.data_ptr<acc>(), g, grad_loss.stride(0), grad_loss.stride(1), cfg,
                        grad.data_ptr<logit_t>(), grad.stride(0), grad.stride(1), grad.stride(2));
      }
    });
  });
  return grad;
}

using LabelBounds = std::pair<int64_t, int64_t>;
constexpr LabelBounds kNoLabels{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()};

// Outside the dispatch macro: an OpenMP pragma cannot sit inside a macro argument.
template <typename label_t>
LabelBounds label_bounds_range(const label_t* labels, int64_t begin, int64_t end, int64_t ignore_index,
                               LabelBounds bounds) {
  int64_t low = bounds.first, high = bounds.second;
#pragma omp simd reduction(min : low) reduction(max : high)
  for (int64_t i = begin; i < end; ++i) {
    const int64_t v = static_cast<int64_t>(labels[i]);
    const bool ignored = v == ignore_index;
    low = std::min(low, ignored ? kNoLabels.first : v);
    high = std::max(high, ignored ? kNoLabels.second : v);
  }
  return {low, high};
}

at::Tensor label_bounds_cpu(const at::Tensor& target_in, int64_t ignore_index) {
  TORCH_CHECK(at::isIntegralType(target_in.scalar_type(), /*includeBool=*/false), "target must be integral");
  const at::Tensor target = target_in.contiguous();
  LabelBounds bounds = kNoLabels;
  AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "label_bounds_cpu", [&] {
    const scalar_t* labels = target.data_ptr<scalar_t>();
    bounds = at::parallel_reduce(
        0, target.numel(), int64_t(1) << 16, kNoLabels,
        [&](int64_t begin, int64_t end, LabelBounds partial) {
          return label_bounds_range(labels, begin, end, ignore_index, partial);
        },
        [](LabelBounds a, LabelBounds b) { return LabelBounds{std::min(a.first, b.first), std::max(a.second, b.second)}; });
  });
  if (bounds.first > bounds.second) bounds = {0, 0};
  return at::tensor({bounds.first, bounds.second}, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(fcn_fast, CPU, m) {
  m.impl("_label_bounds", &label_bounds_cpu);
  m.impl("_softmax_cross_entropy_fwd", &softmax_cross_entropy_fwd_cpu);
  m.impl("_softmax_cross_entropy_bwd", &softmax_cross_entropy_bwd_cpu);
}

}  // namespace fcn_fast
