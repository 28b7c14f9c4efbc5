// Autograd in C++ for the eager twins of batch_norm_train and batch_norm_eval.
//
// A C++ autograd Function costs a few microseconds per call; register_autograd's Python layer on
// the functional ops costs tens, which is more than the whole kernel on small layers. The twins
// run the same kernels and the same backward op, so they give the same results; bnext's Python
// API takes them outside torch.compile and torch.export, which keep the register_autograd ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "../batch_norm_checks.h"

namespace bnext::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<Tensor>;
using TrainResult = std::tuple<Tensor, Tensor, Tensor>;

// The functional ops carry register_autograd's Python kernel. Calls that record no graph (the
// forwards here run with grad mode off, and backward without create_graph) go below it.
template <typename Op, typename... Args>
auto call_unless_recording(const Op& op, const Args&... args) {
  if (at::GradMode::is_enabled()) {
    return op.call(args...);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(args...);
}

auto find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

TrainResult call_train(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  static const auto op = find_op("bnext::batch_norm_train")
                             .typed<TrainResult(const Tensor&, const OptionalTensor&, const OptionalTensor&, double)>();
  return call_unless_recording(op, input, weight, bias, eps);
}

Tensor call_eval(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                 const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  static const auto op = find_op("bnext::batch_norm_eval")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
                                           const OptionalTensor&, double)>();
  return call_unless_recording(op, input, running_mean, running_var, weight, bias, eps);
}

TrainResult call_backward(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                          const Tensor& mean, const Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  static const auto op = find_op("bnext::batch_norm_backward")
                             .typed<TrainResult(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                                const Tensor&, bool, std::array<bool, 3>)>();
  return call_unless_recording(op, grad_output, input, weight, mean, invstd, training, output_mask);
}

OptionalTensor optional_of(const Tensor& tensor) {
  return tensor.defined() ? OptionalTensor(tensor) : std::nullopt;
}

// The backward op's gradients, with the ones not asked for (shape [0]) left undefined.
variable_list masked_gradients(const TrainResult& gradients, std::array<bool, 3> mask) {
  const auto& [grad_input, grad_weight, grad_bias] = gradients;
  return {mask[0] ? grad_input : Tensor(), mask[1] ? grad_weight : Tensor(), mask[2] ? grad_bias : Tensor()};
}

// Whether autograd wants the gradients of (input, weight, bias); input is the first argument and
// weight the `weight_edge`th tensor. needs_input_grad counts edges: an absent optional has none.
std::array<bool, 3> gradient_mask(AutogradContext* ctx, size_t weight_edge) {
  const bool has_weight = ctx->saved_data["has_weight"].toBool();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const size_t bias_edge = weight_edge + (has_weight ? 1 : 0);
  return {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(weight_edge),
          has_bias && ctx->needs_input_grad(bias_edge)};
}

void save_affine_arguments(AutogradContext* ctx, const OptionalTensor& weight, const OptionalTensor& bias) {
  ctx->saved_data["has_weight"] = is_given(weight);
  ctx->saved_data["has_bias"] = is_given(bias);
}

struct TrainFunction : torch::autograd::Function<TrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, double eps) {
    auto [output, save_mean, save_invstd] = call_train(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), save_mean, save_invstd});
    save_affine_arguments(ctx, weight, bias);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    ctx->set_materialize_grads(false);  // no zero tensors for the statistics' unused gradients
    return {output, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) {
      return variable_list(4);
    }
    const auto saved = ctx->get_saved_variables();
    const auto mask = gradient_mask(ctx, 1);
    auto gradients = masked_gradients(
        call_backward(grad_outputs[0], saved[0], optional_of(saved[1]), saved[2], saved[3], true, mask), mask);
    gradients.emplace_back();  // eps
    return gradients;
  }
};

struct EvalFunction : torch::autograd::Function<EvalFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& running_mean,
                        const Tensor& running_var, const OptionalTensor& weight, const OptionalTensor& bias,
                        double eps) {
    ctx->save_for_backward({input, running_mean, running_var, weight.value_or(Tensor())});
    save_affine_arguments(ctx, weight, bias);
    ctx->saved_data["eps"] = eps;
    return call_eval(input, running_mean, running_var, weight, bias, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const auto stats_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const Tensor invstd = saved[2].to(stats_dtype).add(ctx->saved_data["eps"].toDouble()).rsqrt();
    const auto mask = gradient_mask(ctx, 3);  // after input, running_mean and running_var
    const auto gradients = masked_gradients(
        call_backward(grad_outputs[0], input, optional_of(saved[3]), saved[1], invstd, false, mask), mask);
    return {gradients[0], Tensor(), Tensor(), gradients[1], gradients[2], Tensor()};
  }
};

// Whether a twin's call goes through its autograd Function, or straight to the functional op below
// autograd. With no gradient to record, Function::apply would still build a node, save the
// arguments and wrap the outputs: 2-5 us per call on 2 threads of an AMD EPYC (Zen 3), as much as
// the kernel of a (2, 16, 2, 2) eval, 5-10% of a bfloat16 8x512x7x7 one. Forward-mode gradients
// keep the Function, which rejects them.
template <typename... Tensors>
bool needs_function(const Tensors&... tensors) {
  return torch::autograd::compute_requires_grad(tensors...) || (torch::autograd::isFwGradDefined(tensors) || ...);
}

TrainResult batch_norm_train_eager(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                   double eps) {
  if (!needs_function(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_train(input, weight, bias, eps);
  }
  const auto outputs = TrainFunction::apply(input, weight, bias, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

Tensor batch_norm_eval_eager(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                             const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  if (!needs_function(input, running_mean, running_var, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_eval(input, running_mean, running_var, weight, bias, eps);
  }
  return EvalFunction::apply(input, running_mean, running_var, weight, bias, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("batch_norm_train_eager", &batch_norm_train_eager);
  m.impl("batch_norm_eval_eager", &batch_norm_eval_eager);
}

// Below autograd (inference tensors, or a caller already past it) a twin is its functional op.
TORCH_LIBRARY_IMPL(bnext, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_train_eager", &call_train);
  m.impl("batch_norm_eval_eager", &call_eval);
}

}  // namespace bnext::autograd
