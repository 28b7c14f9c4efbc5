// Argument checks shared by every backend. Each failure names the problem and raises the
// Python exception type torch raises for the same misuse.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <optional>

namespace bnext {

// An optional tensor argument that was passed (Python None arrives as nullopt or undefined).
inline bool is_given(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined();
}

inline int64_t num_channels(const at::Tensor& input) {
  return input.size(1);
}

// Values per channel: every dim but 1.
inline int64_t values_per_channel(const at::Tensor& input) {
  const int64_t channels = num_channels(input);
  return channels == 0 ? 0 : input.numel() / channels;
}

inline void check_input(const at::Tensor& input) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      at::isFloatingType(input.scalar_type()),
      "bnext batch_norm: input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 2, "bnext batch_norm: input must have shape (N, C, *), got ", input.dim(),
              " dimension(s) ", input.sizes());
}

inline void check_same_device(const at::Tensor& input, const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device() == input.device(), "bnext batch_norm: ", name, " is on ", tensor.device(),
              " but input is on ", input.device());
}

// Per-channel tensors (weight, bias, running stats, saved stats): C values, on input's device, and
// either in input's dtype or in float32 (torch's mixed mode for reduced-precision inputs).
inline void check_channel_tensor(const at::Tensor& input, const at::Tensor& tensor, const char* name) {
  const int64_t channels = num_channels(input);
  TORCH_CHECK(tensor.numel() == channels, name, " should contain ", channels, " elements not ", tensor.numel());
  check_same_device(input, tensor, name);
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK(dtype == input.scalar_type() || dtype == at::kFloat || dtype == at::kDouble,
              "bnext batch_norm: ", name, " has dtype ", dtype, "; expected ", input.scalar_type(),
              " (input's dtype) or float32");
}

inline void check_optional_channel_tensor(const at::Tensor& input, const std::optional<at::Tensor>& tensor,
                                          const char* name) {
  if (is_given(tensor)) {
    check_channel_tensor(input, *tensor, name);
  }
}

inline void check_eps(double eps, bool training) {
  if (training) {
    TORCH_CHECK_VALUE(eps > 0.0, "batch_norm eps must be positive during training, but got ", eps);
  } else {
    TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", eps);
  }
}

inline void check_batch_size(const at::Tensor& input) {
  TORCH_CHECK_VALUE(values_per_channel(input) != 1,
                    "Expected more than 1 value per channel when training, got input size ", input.sizes());
}

inline void check_train_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps) {
  check_input(input);
  check_optional_channel_tensor(input, weight, "weight");
  check_optional_channel_tensor(input, bias, "bias");
  check_eps(eps, /*training=*/true);
  check_batch_size(input);
}

inline void check_eval_args(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            double eps) {
  check_input(input);
  check_channel_tensor(input, running_mean, "running_mean");
  check_channel_tensor(input, running_var, "running_var");
  check_optional_channel_tensor(input, weight, "weight");
  check_optional_channel_tensor(input, bias, "bias");
  check_eps(eps, /*training=*/false);
}

inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& invstd) {
  check_input(input);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "bnext batch_norm_backward: grad_output has shape ",
              grad_output.sizes(), " but input has shape ", input.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "bnext batch_norm_backward: grad_output has dtype ",
              grad_output.scalar_type(), " but input has dtype ", input.scalar_type());
  check_same_device(input, grad_output, "grad_output");
  check_optional_channel_tensor(input, weight, "weight");
  check_channel_tensor(input, mean, "mean");
  check_channel_tensor(input, invstd, "invstd");
}

// The input-gradient pass of a SyncBatchNorm: gradient sums over every process, and their count
// (a one-element tensor, so a device never waits for the host).
inline void check_backward_elemt_args(const at::Tensor& grad_output, const at::Tensor& input,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& sum_dy,
                                      const at::Tensor& sum_dy_xmu, const at::Tensor& count) {
  check_backward_args(grad_output, input, weight, mean, invstd);
  check_channel_tensor(input, sum_dy, "sum_dy");
  check_channel_tensor(input, sum_dy_xmu, "sum_dy_xmu");
  TORCH_CHECK(count.numel() == 1, "bnext batch_norm_backward_elemt: count should contain 1 element not ",
              count.numel());
  check_same_device(input, count, "count");
}

inline void check_running_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                     const std::optional<at::Tensor>& num_batches_tracked,
                                     const at::Tensor& save_mean, const at::Tensor& save_invstd, int64_t count,
                                     std::optional<double> momentum) {
  const int64_t channels = save_mean.numel();
  for (const auto& [tensor, name] : {std::pair<const at::Tensor&, const char*>{running_mean, "running_mean"},
                                     {running_var, "running_var"},
                                     {save_invstd, "save_invstd"}}) {
    TORCH_CHECK(tensor.numel() == channels, name, " should contain ", channels, " elements not ", tensor.numel());
    TORCH_CHECK(at::isFloatingType(tensor.scalar_type()), "bnext update_running_stats: ", name,
                " must be floating point, got ", tensor.scalar_type());
    TORCH_CHECK(tensor.device() == save_mean.device(), "bnext update_running_stats: ", name, " is on ",
                tensor.device(), " but save_mean is on ", save_mean.device());
  }
  TORCH_CHECK_VALUE(count >= 0, "bnext update_running_stats: count must be non-negative, got ", count);
  const bool has_counter = is_given(num_batches_tracked);
  if (has_counter) {
    TORCH_CHECK(num_batches_tracked->numel() == 1 && num_batches_tracked->scalar_type() == at::kLong,
                "bnext update_running_stats: num_batches_tracked must be a one-element int64 tensor, got ",
                num_batches_tracked->scalar_type(), " with ", num_batches_tracked->numel(), " elements");
    TORCH_CHECK(num_batches_tracked->device() == save_mean.device(),
                "bnext update_running_stats: num_batches_tracked is on ", num_batches_tracked->device(),
                " but save_mean is on ", save_mean.device());
  }
  TORCH_CHECK_VALUE(momentum.has_value() || has_counter,
                    "bnext update_running_stats: momentum=None (cumulative average) needs num_batches_tracked");
}

}  // namespace bnext
