"""The torch.ops.bnext operators: opcheck, gradcheck and gradgradcheck in float64."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck

import bnext  # noqa: F401  (registers torch.ops.bnext)
from helpers import DEVICES, make_input

ops = torch.ops.bnext
LAYOUTS = ["contiguous", "channels_last", "strided"]
# Each forward and its eager twin (same kernels, autograd in C++ rather than register_autograd).
TRAIN_OPS = {"registered": ops.batch_norm_train, "eager_twin": ops.batch_norm_train_eager}
EVAL_OPS = {"registered": ops.batch_norm_eval, "eager_twin": ops.batch_norm_eval_eager}


def _channel(values, dtype, requires_grad=False, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(values, generator=gen) + 0.5).to(device, dtype).requires_grad_(requires_grad)


def _train_args(dtype, layout, requires_grad, device="cpu"):
    x = make_input((3, 4, 5, 2), dtype, layout, device=device).requires_grad_(requires_grad)
    return (x, _channel(4, dtype, requires_grad, 1, device), _channel(4, dtype, requires_grad, 2, device), 1e-5)


def _eval_args(dtype, layout, requires_grad, device="cpu"):
    x, weight, bias, eps = _train_args(dtype, layout, requires_grad, device)
    return x, _channel(4, dtype, seed=3, device=device) - 1, _channel(4, dtype, seed=4, device=device), weight, bias, eps


@pytest.mark.parametrize("variant", TRAIN_OPS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_ops(device, dtype, layout, requires_grad, variant):
    torch.library.opcheck(TRAIN_OPS[variant].default, _train_args(dtype, layout, requires_grad, device))
    torch.library.opcheck(EVAL_OPS[variant].default, _eval_args(dtype, layout, requires_grad, device))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_eager_twin_matches_registered_op_bitwise(device, layout, training):
    """Outputs and all three gradients, for float32 input."""
    results = []
    for variant in TRAIN_OPS:
        args = _train_args(torch.float32, layout, True, device)
        if training:
            output = TRAIN_OPS[variant](*args)[0]
        else:
            x, running_mean, running_var, weight, bias, eps = _eval_args(torch.float32, layout, True, device)
            output = EVAL_OPS[variant](x, running_mean, running_var, weight, bias, eps)
            args = (x, weight, bias)
        grad_output = make_input(tuple(output.shape), torch.float32, layout, seed=7, device=device)
        results.append([output, *torch.autograd.grad(output, args[:3], grad_output)])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_eager_twin_without_gradients_matches_recorded_call(device, training):
    """Grad mode on and no argument requiring a gradient: the twin skips its autograd Function,
    records nothing, and gives bit for bit what the recorded call gives."""
    outputs = {}
    for requires_grad in (False, True):
        if training:
            args = _train_args(torch.float32, "channels_last", requires_grad, device)
            outputs[requires_grad] = ops.batch_norm_train_eager(*args)
        else:
            outputs[requires_grad] = (ops.batch_norm_eval_eager(*_eval_args(torch.float32, "channels_last",
                                                                            requires_grad, device)),)
    assert outputs[True][0].grad_fn is not None
    for got, expected in zip(outputs[False], outputs[True]):
        assert got.grad_fn is None and not got.requires_grad
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_is_rejected_not_dropped(training):
    """A dual input raises (the C++ Function has no jvp) rather than losing its tangent."""
    x, running_mean, running_var, weight, bias, eps = _eval_args(torch.float64, "contiguous", False)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            if training:
                ops.batch_norm_train_eager(dual, weight, bias, eps)
            else:
                ops.batch_norm_eval_eager(dual, running_mean, running_var, weight, bias, eps)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device, dtype, layout, requires_grad, training):
    x, weight, _, eps = _train_args(dtype, layout, requires_grad, device)
    _, mean, invstd = ops.batch_norm_train(x.detach(), weight.detach(), None, eps)
    grad_output = make_input(tuple(x.shape), dtype, layout, seed=9, device=device).requires_grad_(requires_grad)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(
            ops.batch_norm_backward.default, (grad_output, x, weight, mean, invstd, training, mask)
        )


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_update_running_stats(device, dtype, momentum):
    x, _, _, eps = _train_args(dtype, "contiguous", False, device)
    _, mean, invstd = ops.batch_norm_train(x, None, None, eps)
    counter = torch.tensor(3, device=device)
    args = (_channel(4, dtype, device=device), _channel(4, dtype, device=device), counter, mean, invstd, eps, 30, momentum)
    torch.library.opcheck(ops.update_running_stats.default, args)


@pytest.mark.parametrize("variant", TRAIN_OPS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck_train(device, layout, affine, variant):
    x, weight, bias, eps = _train_args(torch.float64, layout, True, device)
    args = (x, weight, bias) if affine else (x, None, None)

    def forward(*args):
        return TRAIN_OPS[variant](*args, eps)[0]

    assert gradcheck(forward, args)
    assert gradgradcheck(forward, args)


@pytest.mark.parametrize("variant", EVAL_OPS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck_eval(device, layout, affine, variant):
    x, running_mean, running_var, weight, bias, eps = _eval_args(torch.float64, layout, True, device)
    args = (x, weight, bias) if affine else (x, None, None)

    def forward(*args):
        return EVAL_OPS[variant](args[0], running_mean, running_var, *args[1:], eps)

    assert gradcheck(forward, args)
    assert gradgradcheck(forward, args)


@pytest.mark.parametrize("rank", [2, 3, 5])
@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck_module_matches_nn_double_backward(device, rank):
    """Second derivatives through the modules agree with nn.BatchNorm's."""
    from helpers import module_pair

    shape = (4, 3) + (3,) * (rank - 2)
    reference, candidate = module_pair(rank, 3, torch.float64, device=device)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    results = []
    for module in (reference, candidate):
        y = module(x)
        (grad_x,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        inputs = [x, module.weight, module.bias]
        grads = torch.autograd.grad(grad_x.pow(2).sum(), inputs, allow_unused=True)
        results.append([torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)
