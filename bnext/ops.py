"""The torch.ops.bnext operators: fake (meta) implementations and autograd.

The kernels are registered in C++ (csrc/); this module gives each operator what torch.compile,
torch.library.opcheck and autograd need.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.bnext; torch must be imported first)

ops = torch.ops.bnext


def _stats_dtype(dtype):
    """dtype of the saved per-channel statistics: float32 for reduced-precision inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_rows_layout(input):
    return input.movedim(1, -1).is_contiguous()


def _empty_output(input):
    """What the kernels allocate: input's own layout when a kernel reads it as is, else contiguous."""
    if _is_rows_layout(input) or input.is_contiguous():
        return torch.empty_like(input)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _check_devices(reference, reference_name="input", **tensors):
    """The kernels' device check, for the fakes: a fake also runs for a real call when one
    argument is a meta tensor, and must not turn a device mismatch into meta outputs."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != reference.device:
            raise RuntimeError(
                f"bnext batch_norm: {name} is on {tensor.device} but {reference_name} is on {reference.device}"
            )


@torch.library.register_fake("bnext::batch_norm_train")
@torch.library.register_fake("bnext::batch_norm_train_eager")
def _(input, weight, bias, eps):
    _check_devices(input, weight=weight, bias=bias)
    channels = input.shape[1]
    stats = input.new_empty(channels, dtype=_stats_dtype(input.dtype))
    return _empty_output(input), stats, torch.empty_like(stats)


@torch.library.register_fake("bnext::batch_norm_eval")
@torch.library.register_fake("bnext::batch_norm_eval_eager")
def _(input, running_mean, running_var, weight, bias, eps):
    _check_devices(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    return _empty_output(input)


@torch.library.register_fake("bnext::batch_norm_backward")
def _(grad_output, input, weight, mean, invstd, training, output_mask):
    _check_devices(input, grad_output=grad_output, weight=weight, mean=mean, invstd=invstd)
    param = weight if weight is not None else input
    channels = input.shape[1]
    grad_input = _empty_output(input) if output_mask[0] else input.new_empty(0)
    grad_weight = param.new_empty(channels if output_mask[1] else 0)
    grad_bias = param.new_empty(channels if output_mask[2] else 0)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("bnext::update_running_stats")
def _(running_mean, running_var, num_batches_tracked, save_mean, save_invstd, eps, count, momentum):
    _check_devices(save_mean, "save_mean", running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked, save_invstd=save_invstd)
    return None


@torch.library.register_fake("bnext::batch_norm_stats")
def _(input):
    stats = input.new_empty(input.shape[1], dtype=_stats_dtype(input.dtype))
    return stats, torch.empty_like(stats)


@torch.library.register_fake("bnext::batch_norm_backward_elemt")
def _(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    _check_devices(input, grad_output=grad_output, weight=weight, mean=mean, invstd=invstd, sum_dy=sum_dy,
                   sum_dy_xmu=sum_dy_xmu, count=count)
    return _empty_output(input)


def _masked(grads, mask):
    return tuple(grad if wanted else None for grad, wanted in zip(grads, mask))


def call(op, *args):
    """op(*args), straight to the kernel when no gradient can flow.

    register_autograd's layer runs in Python at every call (tens of microseconds), even where it
    only forwards the call, as in backward without create_graph. Those calls skip it; traced calls
    (torch.compile) keep the normal path.
    """
    needs_autograd = torch.is_grad_enabled() and any(
        isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args
    )
    if needs_autograd or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _tracing():
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def batch_norm_train(input, weight, bias, eps):
    """bnext::batch_norm_train, through its eager twin (autograd in C++) outside compile and export."""
    op = ops.batch_norm_train if _tracing() else ops.batch_norm_train_eager
    return op.default(input, weight, bias, eps)


def batch_norm_eval(input, running_mean, running_var, weight, bias, eps):
    """bnext::batch_norm_eval, through its eager twin (autograd in C++) outside compile and export."""
    op = ops.batch_norm_eval if _tracing() else ops.batch_norm_eval_eager
    return op.default(input, running_mean, running_var, weight, bias, eps)


def _train_setup_context(ctx, inputs, output):
    input, weight, _, _ = inputs
    _, save_mean, save_invstd = output
    ctx.save_for_backward(input, weight, save_mean, save_invstd)
    ctx.mark_non_differentiable(save_mean, save_invstd)


def _train_backward(ctx, grad_output, _grad_mean, _grad_invstd):
    input, weight, save_mean, save_invstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    grads = call(ops.batch_norm_backward.default, grad_output, input, weight, save_mean, save_invstd, True, mask)
    return (*_masked(grads, mask), None)


def _eval_setup_context(ctx, inputs, output):
    input, running_mean, running_var, weight, _, eps = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight)
    ctx.eps = eps


def _eval_backward(ctx, grad_output):
    input, running_mean, running_var, weight = ctx.saved_tensors
    invstd = torch.rsqrt(running_var.to(_stats_dtype(input.dtype)) + ctx.eps)
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[3], needs[4]]
    grad_input, grad_weight, grad_bias = _masked(
        call(ops.batch_norm_backward.default, grad_output, input, weight, running_mean, invstd, False, mask), mask
    )
    return grad_input, None, None, grad_weight, grad_bias, None


def reference_gradients(grad_output, input, weight, mean, invstd, training):
    """Batch-norm gradients (grad_input, grad_weight, grad_bias) in differentiable torch ops.

    Differentiating these gives double backward. In training, `mean` and `invstd` are the batch's
    statistics and so functions of `input`: they are recomputed from it, keeping the saved values.
    """
    compute_dtype = _stats_dtype(input.dtype) if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(compute_dtype)
    dy = grad_output.to(compute_dtype)
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    mean = mean.to(compute_dtype)
    invstd = invstd.to(compute_dtype)
    if training:
        batch_mean = x.mean(dims)
        batch_var = x.var(dims, unbiased=False)
        mean = mean + (batch_mean - batch_mean.detach())
        # rsqrt(var + eps) with eps recovered from the saved invstd: same value, same derivatives.
        invstd = torch.rsqrt(batch_var + (invstd.pow(-2) - batch_var).detach())
    x_hat = (x - mean.view(shape)) * invstd.view(shape)
    grad_bias = dy.sum(dims)
    grad_weight = (dy * x_hat).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(compute_dtype)
    if training:
        count = input.numel() // input.shape[1]
        dy = dy - (grad_bias.view(shape) + x_hat * grad_weight.view(shape)) / count
    grad_input = dy * scale.view(shape)
    return grad_input.to(input.dtype), grad_weight, grad_bias


def _backward_setup_context(ctx, inputs, output):
    grad_output, input, weight, mean, invstd, training, output_mask = inputs
    ctx.save_for_backward(grad_output, input, weight, mean, invstd)
    ctx.training = training
    ctx.output_mask = output_mask


def _backward_backward(ctx, *grad_grads):
    saved = ctx.saved_tensors
    wanted = [t is not None and needed for t, needed in zip(saved, ctx.needs_input_grad[:5])]
    if ctx.training:
        wanted[3] = wanted[4] = False  # the saved batch statistics are functions of input, not inputs
    with torch.enable_grad():
        leaves = [t if t is None else t.detach().requires_grad_(w) for t, w in zip(saved, wanted)]
        grads = reference_gradients(*leaves, ctx.training)
    pairs = [
        (grad, grad_grad)
        for grad, grad_grad, computed in zip(grads, grad_grads, ctx.output_mask)
        if computed and grad.requires_grad
    ]
    targets = [leaf for leaf, w in zip(leaves, wanted) if w]
    results = iter(())
    if pairs and targets:
        outputs, grad_outputs = zip(*pairs)
        results = iter(torch.autograd.grad(outputs, targets, grad_outputs, allow_unused=True))
    return (*[next(results, None) if w else None for w in wanted], None, None)


torch.library.register_autograd(
    "bnext::batch_norm_train", _train_backward, setup_context=_train_setup_context
)
torch.library.register_autograd("bnext::batch_norm_eval", _eval_backward, setup_context=_eval_setup_context)
torch.library.register_autograd(
    "bnext::batch_norm_backward", _backward_backward, setup_context=_backward_setup_context
)
