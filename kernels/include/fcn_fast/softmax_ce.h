// Per-pixel softmax cross-entropy, the math shared by the plain and the upsampling CE kernels on CPU and CUDA.
//
// With class weights w (all 1 when none), smoothing eps over C classes, target t and logits z:
//   lse  = log sum_c exp(z_c)
//   loss = (1 - eps) w_t (lse - z_t) + (eps / C) sum_c w_c (lse - z_c)        (torch.nn.functional.cross_entropy)
//   dloss/dz_c = p_c ((1 - eps) w_t + (eps / C) sum_c w_c) - (1 - eps) w_t [c == t] - (eps / C) w_c,  p = softmax(z)
// An ignored pixel (t == ignore_index, or any t outside [0, C) when the caller skipped the label check) has loss 0,
// weight 0 and gradient 0 * p_c (0, or NaN where its logits hold NaN/+inf, exactly as PyTorch's log_softmax backward
// gives). "mean" divides by the summed w_t of the pixels that are not ignored.
// NaN/inf logits follow PyTorch: any NaN or +inf logit (or all logits -inf) makes the pixel's lse NaN.
#pragma once

#include <cmath>

#include "fcn_fast/common.h"

namespace fcn_fast {

template <typename acc_t>
struct CeConfig {
  const acc_t* class_weight;   // nullptr: all 1
  acc_t weight_sum;            // sum of class_weight (C when none, or without smoothing, the one term that needs it)
  acc_t smoothing;
  acc_t smoothing_per_class;   // smoothing / C, once: a division per pixel showed in 6% of a CPU profile's samples
  int64_t num_classes;
  int64_t ignore_index;
};

template <typename acc_t>
FCN_HD bool ce_is_ignored(const CeConfig<acc_t>& cfg, int64_t t) {
  return t == cfg.ignore_index || t < 0 || t >= cfg.num_classes;
}

template <typename acc_t>
FCN_HD acc_t ce_class_weight(const CeConfig<acc_t>& cfg, int64_t c) {
  return cfg.class_weight ? cfg.class_weight[c] : acc_t(1);
}

// One streaming pass over the C logits of a pixel: running max and rescaled sum (online softmax), the target logit
// and, for smoothing, the weighted logit sum. logit(c) returns z_c in acc_t.
template <typename acc_t>
struct CeAccumulator {
  acc_t max = -INFINITY;
  acc_t sum = 0;
  acc_t target_logit = 0;
  acc_t weighted_logit_sum = 0;

  FCN_HD void add(const CeConfig<acc_t>& cfg, int64_t c, acc_t z, int64_t t) {
    if (z > max) {
      // The new maximum contributes exp(z - z): 1, but NaN for z = +inf, as a two-pass log-sum-exp (PyTorch) gives.
      sum = sum * exp_(max - z) + (z - z + acc_t(1));
      max = z;
    } else {
      sum += exp_(z - max);  // z - max is NaN when z is NaN: NaN propagates as in PyTorch
    }
    if (c == t) target_logit = z;
    weighted_logit_sum += ce_class_weight(cfg, c) * z;
  }
  FCN_HD acc_t lse() const { return max + log_(sum); }

  static FCN_HD acc_t exp_(acc_t v) { return ::exp(v); }
  static FCN_HD acc_t log_(acc_t v) { return ::log(v); }
};

// Loss of a pixel that counts (not ignored), of target weight wt. A select, not a branch, on the smoothing: loops
// over pixels vectorize.
template <typename acc_t>
FCN_HD acc_t ce_counted_loss(const CeConfig<acc_t>& cfg, acc_t wt, acc_t lse, acc_t target_logit,
                             acc_t weighted_logit_sum) {
  const acc_t value = (acc_t(1) - cfg.smoothing) * wt * (lse - target_logit);
  const acc_t smoothed = value + cfg.smoothing_per_class * (lse * cfg.weight_sum - weighted_logit_sum);
  return cfg.smoothing != acc_t(0) ? smoothed : value;  // not 0 * term: that is NaN for a -inf logit
}

// Loss of one pixel and its weight in the "mean" denominator (both 0 when ignored).
template <typename acc_t>
FCN_HD void ce_pixel_loss(const CeConfig<acc_t>& cfg, int64_t t, acc_t lse, acc_t target_logit,
                          acc_t weighted_logit_sum, acc_t* loss, acc_t* denom_weight) {
  if (ce_is_ignored(cfg, t)) {
    *loss = 0;
    *denom_weight = 0;
    return;
  }
  const acc_t wt = ce_class_weight(cfg, t);
  *loss = ce_counted_loss(cfg, wt, lse, target_logit, weighted_logit_sum);
  *denom_weight = wt;
}

// Sum of the class weights (C when there are none), needed with label smoothing.
template <typename acc_t>
FCN_HD acc_t ce_weight_sum(const acc_t* class_weight, int64_t num_classes) {
  if (!class_weight) return acc_t(num_classes);
  acc_t total = 0;
  for (int64_t c = 0; c < num_classes; ++c) total += class_weight[c];
  return total;
}

// On CUDA every thread builds its own: the C weights are summed only when smoothing needs them.
template <typename acc_t>
FCN_HD CeConfig<acc_t> make_ce_config(const acc_t* class_weight, int64_t num_classes, int64_t ignore_index,
                                      acc_t smoothing) {
  const acc_t weight_sum = smoothing != acc_t(0) ? ce_weight_sum(class_weight, num_classes) : acc_t(num_classes);
  return CeConfig<acc_t>{class_weight, weight_sum, smoothing, smoothing / acc_t(num_classes), num_classes,
                         ignore_index};
}

// The gradient of one pixel, factored so that a kernel computes the per-pixel part once and then spends one exp and
// a multiply-add per class:  g * dloss/dz_c = p_c * prob_scale - [c == t] * target_scale - w_c * smooth_scale.
template <typename acc_t>
struct CeGradCoef {
  acc_t prob_scale;
  acc_t target_scale;
  acc_t smooth_scale;

  FCN_HD acc_t grad(acc_t p, bool is_target, acc_t class_weight) const {
    return p * prob_scale - (is_target ? target_scale : acc_t(0)) - class_weight * smooth_scale;
  }
};

// g is the incoming gradient of this pixel's loss. Ignored pixels get all-zero coefficients (p_c * 0), also when g
// is inf (an all-ignored "mean" divides by 0). Selects, not an early return, so that loops over pixels vectorize.
template <typename acc_t>
FCN_HD CeGradCoef<acc_t> ce_grad_coef(const CeConfig<acc_t>& cfg, int64_t t, acc_t g) {
  const bool ignored = ce_is_ignored(cfg, t);
  const acc_t gk = ignored ? acc_t(0) : g;
  const acc_t wt = ce_class_weight(cfg, ignored ? 0 : t);
  const acc_t eps = cfg.smoothing, eps_c = cfg.smoothing_per_class;
  return {gk * ((acc_t(1) - eps) * wt + eps_c * cfg.weight_sum), gk * (acc_t(1) - eps) * wt, gk * eps_c};
}

// dloss/dz_c of one pixel scaled by the incoming gradient g of that pixel's loss.
template <typename acc_t>
FCN_HD acc_t ce_logit_grad(const CeConfig<acc_t>& cfg, int64_t t, int64_t c, acc_t z, acc_t lse, acc_t g) {
  return ce_grad_coef(cfg, t, g).grad(::exp(z - lse), c == t, ce_class_weight(cfg, c));
}

}  // namespace fcn_fast
