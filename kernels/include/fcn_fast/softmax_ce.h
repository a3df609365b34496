// Per-pixel softmax cross-entropy, the math shared by the plain and the upsampling CE kernels on CPU and CUDA.
//
// With class weights w (all 1 when none, W = sum_c w_c), smoothing eps over C classes, target t and logits z, every
// quantity is taken relative to the pixel's largest logit m, as PyTorch's log_softmax does (m + log sum exp(z - m)
// as one float drops the log sum once |m| passes ~1e7 in float32, and sum_c w_c z_c - W lse cancels for large logits):
//   L    = log sum_c exp(z_c - m)                                   (lse = m + L, kept as the pair (m, L))
//   loss = (1 - eps) w_t (L - (z_t - m)) + (eps / C) (W L - sum_c w_c (z_c - m))   (F.cross_entropy)
//   dloss/dz_c = p_c ((1 - eps) w_t + (eps / C) W) - (1 - eps) w_t [c == t] - (eps / C) w_c,  p_c = exp(z_c - m) / e^L
// An ignored pixel (t == ignore_index, or any t outside [0, C) when the caller skipped the label check) has loss 0,
// weight 0 and gradient 0 * p_c (0, or NaN where its logits hold NaN/+inf, exactly as PyTorch's log_softmax backward
// gives). "mean" divides by the summed w_t of the pixels that are not ignored.
// NaN/inf logits follow PyTorch: any NaN or +inf logit, or all logits -inf, makes the pixel's loss and gradient NaN;
// a -inf logit among finite ones has p = 0 (and, with smoothing, makes the loss inf, or NaN where its class weight
// is 0, as PyTorch's 0 * -inf).
//
// Saved for backward: the pair (m, L) per pixel (ce_stats_shape), so that backward computes p_c relative to m too.
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

template <typename acc_t>
FCN_HD acc_t ce_exp(acc_t v) {
  return ::exp(v);
}

template <typename acc_t>
FCN_HD acc_t ce_log(acc_t v) {
  return ::log(v);
}

// What the loss of a pixel needs, relative to its largest logit m.
template <typename acc_t>
struct CePixelStats {
  acc_t max;               // m
  acc_t log_sum;           // L = log sum_c exp(z_c - m)
  acc_t target_shifted;    // z_t - m (meaningless for an ignored pixel, whose loss is 0 regardless)
  acc_t weighted_shifted;  // sum_c w_c (z_c - m), with smoothing only (0 without)

  // Class c's share of weighted_shifted, once max is final: a running version would subtract large numbers.
  FCN_HD void add_smoothing_term(acc_t class_weight, acc_t z) { weighted_shifted += class_weight * (z - max); }
};

// One streaming pass over the C logits of a pixel: running max and rescaled sum (online softmax), and the target
// logit. Equal to the two-pass max-then-sum (what PyTorch computes), special values included.
template <typename acc_t>
struct CeAccumulator {
  acc_t max = -INFINITY;
  acc_t sum = 0;
  acc_t target_logit = 0;

  FCN_HD void add(int64_t c, acc_t z, int64_t t) {
    if (z > max) {
      // The new maximum contributes exp(z - z): 1, but NaN for z = +inf, as a two-pass log-sum-exp (PyTorch) gives.
      sum = sum * ce_exp(max - z) + (z - z + acc_t(1));
      max = z;
    } else if (z != -INFINITY) {
      sum += ce_exp(z - max);  // z - max is NaN when z is NaN: NaN propagates as in PyTorch
    }
    // A -inf logit adds exp(-inf) = 0; z - max would be NaN while every logit so far is -inf. If all are, sum stays
    // 0: L = -inf and z_t - m = NaN, so loss and gradient are NaN, as PyTorch gives.
    if (c == t) target_logit = z;
  }
};

// The statistics once an accumulator has seen every logit, weighted_shifted still 0 (add_smoothing_term adds it).
template <typename acc_t>
FCN_HD CePixelStats<acc_t> ce_stats_of(const CeAccumulator<acc_t>& a) {
  return CePixelStats<acc_t>{a.max, ce_log(a.sum), a.target_logit - a.max, acc_t(0)};
}

// The statistics of a pixel whose logits logit(c) are streamed once, twice with smoothing (sum_c w_c (z_c - m) needs
// the final m: a running version of it would subtract large numbers).
template <typename acc_t, typename Logit>
FCN_HD CePixelStats<acc_t> ce_pixel_stats(const CeConfig<acc_t>& cfg, int64_t t, Logit&& logit) {
  CeAccumulator<acc_t> a;
  for (int64_t c = 0; c < cfg.num_classes; ++c) a.add(c, logit(c), t);
  CePixelStats<acc_t> s = ce_stats_of(a);
  if (cfg.smoothing != acc_t(0)) {
    for (int64_t c = 0; c < cfg.num_classes; ++c) s.add_smoothing_term(ce_class_weight(cfg, c), logit(c));
  }
  return s;
}

// Loss of a pixel that counts (not ignored), of target weight wt. A select, not a branch, on the smoothing: loops
// over pixels vectorize.
template <typename acc_t>
FCN_HD acc_t ce_counted_loss(const CeConfig<acc_t>& cfg, acc_t wt, acc_t log_sum, acc_t target_shifted,
                             acc_t weighted_shifted) {
  const acc_t value = (acc_t(1) - cfg.smoothing) * wt * (log_sum - target_shifted);
  const acc_t smoothed = value + cfg.smoothing_per_class * (log_sum * cfg.weight_sum - weighted_shifted);
  return cfg.smoothing != acc_t(0) ? smoothed : value;  // not 0 * term: that is NaN for a -inf logit
}

// Loss of one pixel and its weight in the "mean" denominator (both 0 when ignored).
template <typename acc_t>
FCN_HD void ce_pixel_loss(const CeConfig<acc_t>& cfg, int64_t t, const CePixelStats<acc_t>& s, acc_t* loss,
                          acc_t* denom_weight) {
  if (ce_is_ignored(cfg, t)) {
    *loss = 0;
    *denom_weight = 0;
    return;
  }
  const acc_t wt = ce_class_weight(cfg, t);
  *loss = ce_counted_loss(cfg, wt, s.log_sum, s.target_shifted, s.weighted_shifted);
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

// The same coefficients for exp(z_c - m) in place of p_c: the pixel's 1 / sum_c exp(z_c - m) = e^-L folds into
// prob_scale, once per pixel, so a class step costs what it did when p_c was exp(z_c - lse).
template <typename acc_t>
FCN_HD CeGradCoef<acc_t> ce_grad_coef(const CeConfig<acc_t>& cfg, int64_t t, acc_t g, acc_t log_sum) {
  CeGradCoef<acc_t> k = ce_grad_coef(cfg, t, g);
  k.prob_scale *= ce_exp(-log_sum);
  return k;
}

// dloss/dz_c of one pixel scaled by the incoming gradient g of that pixel's loss, from its saved (m, L).
template <typename acc_t>
FCN_HD acc_t ce_logit_grad(const CeConfig<acc_t>& cfg, int64_t t, int64_t c, acc_t z, acc_t max, acc_t log_sum,
                           acc_t g) {
  return ce_grad_coef(cfg, t, g).grad(ce_exp((z - max) - log_sum), c == t, ce_class_weight(cfg, c));
}

}  // namespace fcn_fast
