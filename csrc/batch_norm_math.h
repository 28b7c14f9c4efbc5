// Per-channel batch-norm math shared by every backend.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace bnext {

// Count, mean and sum of squared deviations from the mean (M2) of a set of values.
template <typename acc_t>
struct Moments {
  acc_t count = 0;
  acc_t mean = 0;
  acc_t m2 = 0;
};

// Chan, Golub and LeVeque's merge of the moments of two disjoint sets: exact in
// exact arithmetic and free of the cancellation that E[x^2] - E[x]^2 suffers.
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  // An empty side changes nothing (and must not: with a huge mean, delta^2 * 0 would be inf * 0).
  if (b.count == acc_t(0)) {
    return a;
  }
  if (a.count == acc_t(0)) {
    return b;
  }
  const acc_t count = a.count + b.count;
  const acc_t b_share = b.count / count;
  const acc_t delta = b.mean - a.mean;
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

// The merge of `n` disjoint sets of equal count (n >= 1): the mean of their means, and their M2s
// plus their means' spread around it. Equal to merging them one by one, without a division per set.
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> merge_equal_counts(const Moments<acc_t>* parts, int64_t n) {
  acc_t mean = 0;
  for (int64_t k = 0; k < n; ++k) {
    mean += parts[k].mean;
  }
  mean /= static_cast<acc_t>(n);
  acc_t m2 = 0;
  acc_t spread = 0;
  for (int64_t k = 0; k < n; ++k) {
    const acc_t offset = parts[k].mean - mean;
    m2 += parts[k].m2;
    spread += offset * offset;
  }
  return {parts[0].count * static_cast<acc_t>(n), mean, m2 + parts[0].count * spread};
}

// Adds one value to moments (Welford's update).
template <typename acc_t>
C10_HOST_DEVICE inline void add_value(Moments<acc_t>& m, acc_t x) {
  m.count += acc_t(1);
  const acc_t delta = x - m.mean;
  m.mean += delta / m.count;
  m.m2 += delta * (x - m.mean);
}

// Moments of `count` values from the sums of d = x - shift and of d^2 (the shifted-data algorithm:
// with the shift one of the values, its sums carry no catastrophic cancellation).
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> moments_from_shifted_sums(acc_t count, acc_t shift, acc_t sum, acc_t sum_sq) {
  const acc_t mean_offset = sum / count;
  const acc_t m2 = sum_sq - sum * mean_offset;
  return {count, shift + mean_offset, m2 > acc_t(0) ? m2 : acc_t(0)};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t inverse_std(acc_t biased_var, acc_t eps) {
  return acc_t(1) / std::sqrt(biased_var + eps);
}

// The normalize pass is y = (x - center) * scale + shift: one multiply-add per element around the
// channel's mean, so that values equal to the mean map exactly to the bias.
template <typename opmath_t>
struct Affine {
  opmath_t center;
  opmath_t scale;
  opmath_t shift;
};

// Coefficients in the kernel's compute type from statistics in the accumulation type: the center is
// the mean rounded to opmath_t, and the shift carries that rounding back, so no precision is lost.
template <typename opmath_t, typename acc_t>
C10_HOST_DEVICE inline Affine<opmath_t> normalize_affine(acc_t mean, acc_t invstd, acc_t weight, acc_t bias) {
  const opmath_t center = static_cast<opmath_t>(mean);
  const acc_t scale = weight * invstd;
  const acc_t shift = bias - (mean - static_cast<acc_t>(center)) * scale;
  return {center, static_cast<opmath_t>(scale), static_cast<opmath_t>(shift)};
}

// Backward of y = (x - mean) * invstd * weight + bias for one channel of `count` values,
// given sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (x - mean)):
// dx = dy * dy_scale + (x - mean) * xmu_scale + shift.
template <typename acc_t>
struct InputGradient {
  acc_t dy_scale;
  acc_t xmu_scale;
  acc_t shift;
};

template <typename acc_t>
C10_HOST_DEVICE inline InputGradient<acc_t> input_gradient(
    acc_t invstd, acc_t weight, acc_t sum_dy, acc_t sum_dy_xmu, acc_t count, bool training) {
  const acc_t dy_scale = weight * invstd;
  if (!training) {
    // Running statistics are constants: dx is dy scaled.
    return {dy_scale, acc_t(0), acc_t(0)};
  }
  // Batch statistics depend on x: remove the gradient's projection on the mean and on x - mean.
  return {dy_scale, -dy_scale * invstd * invstd * sum_dy_xmu / count, -dy_scale * sum_dy / count};
}

// Exponential (or cumulative, with factor 1/num_batches_tracked) running average of one channel.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t running_average(acc_t running, acc_t batch, acc_t factor) {
  return (acc_t(1) - factor) * running + factor * batch;
}

}  // namespace bnext
