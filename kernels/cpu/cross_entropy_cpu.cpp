// softmax_cross_entropy on the CPU: logits (N, C, S) read in place with their strides (no permute copies).
//
// Fast path, pixels contiguous (NCHW, the segmentation layout): a task is a block of kBlock pixels of one image; it
// sweeps the C rows of the block (each row is kBlock consecutive pixels of one class, stride S apart), so every inner
// loop runs over consecutive pixels and vectorizes. The first sweep copies the block (C x kBlock values) into a
// contiguous buffer that stays in L1/L2 and takes the max, the second the exp-sum: one exp per logit, where an online
// softmax would pay two.
// Other layouts (channels-last, (N, C) class scores) take the per-pixel path: one online softmax (softmax_ce.h) per
// pixel over its C strided logits.
// Forward writes per pixel the loss, its weight in the "mean" denominator and the softmax statistics backward keeps
// (max logit m and L = log sum exp(z - m), softmax_ce.h); backward recomputes p = exp(z - m) e^-L and writes the
// gradient, again one exp per logit.
// A reduced loss (_softmax_cross_entropy_fwd_sums) comes back as one partial sum per task, and, in a training step
// (the incoming gradient known up front), with the gradient: the exp-sum sweep keeps exp(z - max) in the block
// buffer and a third sweep writes the gradient from it, so each logit costs one exp and one read in all.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
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

// Where forward_blocks writes the gradient g * dloss/dz (for one incoming gradient g for every pixel) when it has one.
template <typename scalar_t, typename acc_t>
struct FusedGrad {
  scalar_t* data;  // nullptr: loss only
  int64_t dn, dc;  // element strides of the (N, C, S) gradient; pixels contiguous
  acc_t g;
};

// Where the forward kernels write the softmax statistics (softmax_ce.h): max[i] and log_sum[i] for pixel i = n * S + p,
// the two planes of a (2, N, S) tensor; max == nullptr: not saved.
template <typename acc_t>
struct StatsOut {
  acc_t* max;
  acc_t* log_sum;
};

// per_pixel: loss and denom per pixel; otherwise loss[task] is the summed loss of the task's pixels (in pixel order)
// and denom is not written. With grad.data, also the gradient.
template <typename scalar_t, typename target_t, typename acc_t>
void forward_blocks(const CeLayout& L, const scalar_t* logits, const target_t* target, const CeConfig<acc_t>& cfg,
                    bool per_pixel, acc_t* loss, acc_t* denom, StatsOut<acc_t> stats, FusedGrad<scalar_t, acc_t> grad) {
  const int64_t blocks = (L.s + kBlock - 1) / kBlock;
  const bool smoothing = cfg.smoothing != acc_t(0);
  const bool with_grad = grad.data != nullptr;
  at::parallel_for(0, L.n * blocks, 1, [&](int64_t begin, int64_t end) {
    // The block's logits, copied once in acc_t: rows H*W apart in memory all map to the same cache sets (the
    // stride is a large power of two at 512x512), so re-reading them in place for the second sweep would miss.
    // With the gradient, the second sweep overwrites them with exp(z - max) for the third.
    std::vector<acc_t> block(static_cast<size_t>(L.c * kBlock));
    // Per pixel, relative to its max logit (softmax_ce.h): the max, the exp-sum and then its log, z_t - max and
    // sum_c w_c (z_c - max).
    acc_t row_max[kBlock], row_sum[kBlock], log_sum[kBlock], weighted_shifted[kBlock], target_shifted[kBlock];
    acc_t prob_scale[kBlock], target_scale[kBlock], smooth_scale[kBlock];
    int32_t label[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * kBlock;
      const int64_t len = std::min(kBlock, L.s - p0);
      const scalar_t* base = logits + n * L.logit_n + p0;
      for (int64_t p = 0; p < len; ++p) {
        row_max[p] = -std::numeric_limits<acc_t>::infinity();
        row_sum[p] = 0;
        weighted_shifted[p] = 0;
      }
      for (int64_t c = 0; c < L.c; ++c) {
        const scalar_t* row = base + c * L.logit_c;
        acc_t* z = block.data() + c * kBlock;
        prefetch_next_block(row, p0, L.s);
#pragma omp simd
        for (int64_t p = 0; p < len; ++p) {
          z[p] = widen(row[p]);
          row_max[p] = z[p] > row_max[p] ? z[p] : row_max[p];  // a NaN logit is skipped here, poisons the sum below
        }
      }
      for (int64_t p = 0; p < len; ++p) {
        const int64_t t = static_cast<int64_t>(target[n * L.target_n + (p0 + p) * L.target_s]);
        const bool ignored = ce_is_ignored(cfg, t);
        label[p] = ignored ? -1 : static_cast<int32_t>(t);
        target_shifted[p] = ignored ? acc_t(0) : block[t * kBlock + p] - row_max[p];
      }
      for (int64_t c = 0; c < L.c; ++c) {
        acc_t* z = block.data() + c * kBlock;
        if (smoothing) {
          const acc_t w = ce_class_weight(cfg, c);
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) weighted_shifted[p] += w * (z[p] - row_max[p]);
        }
        if (with_grad) {
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) {
            z[p] = vector_exp(z[p] - row_max[p]);
            row_sum[p] += z[p];
          }
        } else {
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) row_sum[p] += vector_exp(z[p] - row_max[p]);
        }
      }
#pragma omp simd
      for (int64_t p = 0; p < len; ++p) log_sum[p] = vector_log(row_sum[p]);
      const int64_t out = n * L.s + p0;
      if (stats.max != nullptr) {
        std::copy(row_max, row_max + len, stats.max + out);
        std::copy(log_sum, log_sum + len, stats.log_sum + out);
      }
      if (per_pixel) {
        for (int64_t p = 0; p < len; ++p) {
          const CePixelStats<acc_t> pixel{row_max[p], log_sum[p], target_shifted[p], weighted_shifted[p]};
          ce_pixel_loss(cfg, label[p], pixel, &loss[out + p], &denom[out + p]);
        }
      } else {
        // One loop of selects for the loss sum (a vector reduction: a fixed order all the same) and the gradient's
        // per-pixel coefficients; as scalar loops these were a tenth of the fused bf16 forward.
        acc_t loss_sum = 0;
#pragma omp simd reduction(+ : loss_sum)
        for (int64_t p = 0; p < len; ++p) {
          const bool ignored = label[p] < 0;
          const acc_t wt = ce_class_weight(cfg, ignored ? 0 : label[p]);
          loss_sum += ignored ? acc_t(0) : ce_counted_loss(cfg, wt, log_sum[p], target_shifted[p], weighted_shifted[p]);
          if (with_grad) {
            const CeGradCoef<acc_t> k = ce_grad_coef(cfg, label[p], grad.g);
            prob_scale[p] = k.prob_scale / row_sum[p];  // p_c = exp(z_c - max) / sum
            target_scale[p] = k.target_scale;
            smooth_scale[p] = k.smooth_scale;
          }
        }
        loss[task] = loss_sum;
      }
      if (!with_grad) continue;
      scalar_t* grad_block = grad.data + n * grad.dn + p0;
      for (int64_t c = 0; c < L.c; ++c) {
        acc_t* e = block.data() + c * kBlock;
        scalar_t* out_row = grad_block + c * grad.dc;
        const acc_t w = ce_class_weight(cfg, c);
        const int32_t cls = static_cast<int32_t>(c);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) {
            const CeGradCoef<acc_t> k{prob_scale[p], target_scale[p], smooth_scale[p]};
            out_row[p] = k.grad(e[p], label[p] == cls, w);
          }
        } else {  // computed in place, then narrowed: each loop vectorizes (see backward_blocks)
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) {
            const CeGradCoef<acc_t> k{prob_scale[p], target_scale[p], smooth_scale[p]};
            e[p] = k.grad(e[p], label[p] == cls, w);
          }
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) out_row[p] = narrow<scalar_t>(e[p]);
        }
      }
    }
  });
}

template <typename scalar_t, typename target_t, typename acc_t>
void forward_pixels(const CeLayout& L, const scalar_t* logits, const target_t* target, const CeConfig<acc_t>& cfg,
                    acc_t* loss, acc_t* denom, StatsOut<acc_t> stats) {
  at::parallel_for(0, L.n * L.s, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / L.s, p = i % L.s;
      const int64_t t = static_cast<int64_t>(target[n * L.target_n + p * L.target_s]);
      const scalar_t* z = logits + n * L.logit_n + p * L.logit_s;
      const CePixelStats<acc_t> pixel =
          ce_pixel_stats(cfg, t, [&](int64_t c) { return static_cast<acc_t>(z[c * L.logit_c]); });
      ce_pixel_loss(cfg, t, pixel, &loss[i], &denom[i]);
      if (stats.max != nullptr) {
        stats.max[i] = pixel.max;
        stats.log_sum[i] = pixel.log_sum;
      }
    }
  });
}

// The forward's statistics (m, L) of pixel i, read as the two planes of the (2, N, S) tensor `stats` points to.
template <typename acc_t>
struct StatsIn {
  const acc_t* max;
  const acc_t* log_sum;
};

template <typename acc_t>
StatsIn<acc_t> stats_in(const at::Tensor& stats) {
  const acc_t* data = stats.data_ptr<acc_t>();
  return {data, data + stats.numel() / 2};
}

template <typename acc_t>
StatsOut<acc_t> stats_out(at::Tensor& stats) {
  if (stats.numel() == 0) return {nullptr, nullptr};
  acc_t* data = stats.data_ptr<acc_t>();
  return {data, data + stats.numel() / 2};
}

template <typename scalar_t, typename target_t, typename acc_t>
void backward_blocks(const CeLayout& L, const scalar_t* logits, const target_t* target, StatsIn<acc_t> stats,
                     const acc_t* grad_loss, int64_t gn, int64_t gs, const CeConfig<acc_t>& cfg, scalar_t* grad,
                     int64_t dn, int64_t dc) {
  const int64_t blocks = (L.s + kBlock - 1) / kBlock;
  at::parallel_for(0, L.n * blocks, 1, [&](int64_t begin, int64_t end) {
    acc_t prob_scale[kBlock], target_scale[kBlock], smooth_scale[kBlock], pixel_max[kBlock], widened[kBlock];
    int32_t label[kBlock];  // int32: half the vector compares of int64 in the class loop
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * kBlock;
      const int64_t len = std::min(kBlock, L.s - p0);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t t = static_cast<int64_t>(target[n * L.target_n + (p0 + p) * L.target_s]);
        const int64_t i = n * L.s + p0 + p;
        // p_c = exp(z_c - max) * e^-L: the e^-L goes into prob_scale here, once per pixel.
        const CeGradCoef<acc_t> k = ce_grad_coef(cfg, t, grad_loss[n * gn + (p0 + p) * gs], stats.log_sum[i]);
        prob_scale[p] = k.prob_scale;
        target_scale[p] = k.target_scale;
        smooth_scale[p] = k.smooth_scale;
        pixel_max[p] = stats.max[i];
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
            const acc_t e = vector_exp(row[p] - pixel_max[p]);
            const CeGradCoef<acc_t> k{prob_scale[p], target_scale[p], smooth_scale[p]};
            out_row[p] = k.grad(e, label[p] == cls, w);
          }
        } else {
          // Half/bfloat16: widen, compute and narrow in three loops, each of which vectorizes (one loop with the
          // conversions in it stayed scalar, exp included: 7x slower than fp32, measured).
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) widened[p] = widen(row[p]);
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) {
            const acc_t e = vector_exp(widened[p] - pixel_max[p]);
            const CeGradCoef<acc_t> k{prob_scale[p], target_scale[p], smooth_scale[p]};
            widened[p] = k.grad(e, label[p] == cls, w);
          }
#pragma omp simd
          for (int64_t p = 0; p < len; ++p) out_row[p] = narrow<scalar_t>(widened[p]);
        }
      }
    }
  });
}

template <typename scalar_t, typename target_t, typename acc_t>
void backward_pixels(const CeLayout& L, const scalar_t* logits, const target_t* target, StatsIn<acc_t> stats,
                     const acc_t* grad_loss, int64_t gn, int64_t gs, const CeConfig<acc_t>& cfg, scalar_t* grad,
                     int64_t dn, int64_t dc, int64_t ds) {
  at::parallel_for(0, L.n * L.s, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / L.s, p = i % L.s;
      const int64_t t = static_cast<int64_t>(target[n * L.target_n + p * L.target_s]);
      const CeGradCoef<acc_t> k = ce_grad_coef(cfg, t, grad_loss[n * gn + p * gs], stats.log_sum[i]);
      const acc_t max = stats.max[i];
      const scalar_t* z = logits + n * L.logit_n + p * L.logit_s;
      scalar_t* out = grad + n * dn + p * ds;
      for (int64_t c = 0; c < L.c; ++c) {
        const acc_t e = std::exp(static_cast<acc_t>(z[c * L.logit_c]) - max);
        out[c * dc] = static_cast<scalar_t>(k.grad(e, c == t, ce_class_weight(cfg, c)));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_fwd_cpu(const at::Tensor& logits,
                                                                            const at::Tensor& target,
                                                                            const c10::optional<at::Tensor>& weight,
                                                                            int64_t ignore_index, double smoothing,
                                                                            bool per_pixel) {
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
        forward_blocks(L, z, t, cfg, /*per_pixel=*/true, loss.data_ptr<acc>(), denom.data_ptr<acc>(),
                       stats_out<acc>(lse), FusedGrad<logit_t, acc>{nullptr, 0, 0, acc(0)});
      } else {
        forward_pixels(L, z, t, cfg, loss.data_ptr<acc>(), denom.data_ptr<acc>(), stats_out<acc>(lse));
      }
    });
  });
  // Reduced losses take softmax_cross_entropy_fwd_sums on the CPU; here a pixel's value is its own partial sum.
  if (!per_pixel) return {loss.reshape(-1), denom.reshape(-1), lse};
  return {loss, denom, lse};
}

// A reduced loss: (loss partial sums, lse, grad_logits). With pixel_grad (the gradient of every pixel's loss: 1 for
// "sum", 1 / denominator for "mean") the gradient comes in the same sweeps, else grad_logits is empty. Contiguous
// pixels take forward_blocks, one partial sum per task; other layouts run the per-pixel forward (and backward), a
// "partial sum" per pixel. lse comes back empty: every backward of a reduced CPU loss reruns this kernel (the
// softmax statistics are needed only inside it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_fwd_sums_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index,
    double smoothing, c10::optional<double> pixel_grad) {
  check_ce_kernel_args(logits, target, weight, c10::DeviceType::CPU);
  const CeLayout L = ce_layout(logits, target);
  at::Tensor grad = pixel_grad.has_value() ? at::empty_like(logits) : at::empty({0}, logits.options());
  const bool blocks = L.logit_s == 1 && L.s > 1 && (!pixel_grad.has_value() || grad.stride(2) == 1);
  const int64_t pixel_shape[] = {L.n, L.s};
  const int64_t sums[] = {blocks ? L.n * ((L.s + kBlock - 1) / kBlock) : L.n * L.s};
  at::Tensor loss, denom, lse;
  std::tie(loss, denom, lse) = ce_pixel_outputs(pixel_shape, sums, logits, /*save_stats=*/false);
  if (L.n * L.s == 0) return {loss, lse, grad};
  FCN_DISPATCH_FLOATING(logits.scalar_type(), "softmax_cross_entropy_fwd_sums_cpu", [&] {
    using logit_t = scalar_t;
    using acc = acc_t<logit_t>;
    const auto cfg = make_config<acc>(weight, L.c, ignore_index, smoothing);
    const acc g = static_cast<acc>(pixel_grad.value_or(0.0));
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "softmax_cross_entropy_fwd_sums_cpu_target", [&] {
      using label_t = scalar_t;
      const logit_t* z = logits.data_ptr<logit_t>();
      const label_t* t = target.data_ptr<label_t>();
      if (blocks) {
        const FusedGrad<logit_t, acc> fused_grad =
            pixel_grad.has_value() ? FusedGrad<logit_t, acc>{grad.data_ptr<logit_t>(), grad.stride(0), grad.stride(1), g}
                                   : FusedGrad<logit_t, acc>{nullptr, 0, 0, g};
        forward_blocks(L, z, t, cfg, /*per_pixel=*/false, loss.data_ptr<acc>(), static_cast<acc*>(nullptr),
                       StatsOut<acc>{nullptr, nullptr}, fused_grad);
      } else {
        at::Tensor stats = at::empty(pixel_grad.has_value() ? ce_stats_shape(pixel_shape) : std::vector<int64_t>{0},
                                     loss.options());
        forward_pixels(L, z, t, cfg, loss.data_ptr<acc>(), denom.data_ptr<acc>(), stats_out<acc>(stats));
        if (pixel_grad.has_value()) {
          backward_pixels(L, z, t, stats_in<acc>(stats), &g, 0, 0, cfg, grad.data_ptr<logit_t>(), grad.stride(0),
                          grad.stride(1), grad.stride(2));
        }
      }
    });
  });
  return {loss, lse, grad};
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
        backward_blocks(L, z, t, stats_in<acc>(lse), g, grad_loss.stride(0), grad_loss.stride(1), cfg,
                        grad.data_ptr<logit_t>(), grad.stride(0), grad.stride(1));
      } else {
        backward_pixels(L, z, t, stats_in<acc>(lse), g, grad_loss.stride(0), grad_loss.stride(1), cfg,
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

// The "mean" denominator: the summed class weights of the counted labels (their count without weights). Counted
// per class in integers, then weighted in class order: exact counts, the same sum for any thread count.
at::Tensor ce_denominator_cpu(const at::Tensor& target_in, const c10::optional<at::Tensor>& weight,
                              int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK(at::isIntegralType(target_in.scalar_type(), /*includeBool=*/false), "target must be integral");
  TORCH_CHECK(num_classes > 0, "num_classes must be positive");
  TORCH_CHECK(!weight.has_value() || (weight->dim() == 1 && weight->size(0) == num_classes && weight->is_cpu()),
              "weight must be a (num_classes,) CPU tensor");
  const at::Tensor target = target_in.contiguous();
  std::vector<int64_t> counts(static_cast<size_t>(num_classes), 0);
  std::mutex merge;
  AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "ce_denominator_cpu", [&] {
    const scalar_t* labels = target.data_ptr<scalar_t>();
    at::parallel_for(0, target.numel(), int64_t(1) << 16, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> local(static_cast<size_t>(num_classes), 0);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = static_cast<int64_t>(labels[i]);
        if (t != ignore_index && t >= 0 && t < num_classes) ++local[static_cast<size_t>(t)];
      }
      const std::lock_guard<std::mutex> lock(merge);
      for (int64_t c = 0; c < num_classes; ++c) counts[static_cast<size_t>(c)] += local[static_cast<size_t>(c)];
    });
  });
  double total = 0;
  const at::Tensor w = weight.has_value() ? weight->to(at::kDouble).contiguous() : at::Tensor();
  for (int64_t c = 0; c < num_classes; ++c) {
    const double count = static_cast<double>(counts[static_cast<size_t>(c)]);
    total += w.defined() ? count * w.data_ptr<double>()[c] : count;
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(fcn_fast, CPU, m) {
  m.impl("_label_bounds", &label_bounds_cpu);
  m.impl("_softmax_cross_entropy_fwd", &softmax_cross_entropy_fwd_cpu);
  m.impl("_softmax_cross_entropy_bwd", &softmax_cross_entropy_bwd_cpu);
  m.impl("_softmax_cross_entropy_fwd_sums", &softmax_cross_entropy_fwd_sums_cpu);
  m.impl("_ce_denominator", &ce_denominator_cpu);
}

}  // namespace fcn_fast
