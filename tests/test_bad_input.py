"""Every misuse raises the exception torch raises (or a clear one), naming the problem, and changes no state."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnext
from helpers import assert_same_state, module_pair, state_of


def _assert_rejected_like_nn(rank, x, match, training=True, **kwargs):
    reference, candidate = module_pair(rank, 3, torch.float32, **kwargs)
    reference.train(training)
    candidate.train(training)
    with pytest.raises(Exception) as torch_error:
        reference(x)
    before = state_of(candidate)
    with pytest.raises(torch_error.type, match=match):
        candidate(x)
    assert_same_state(before, state_of(candidate))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_wrong_channel_count_for_module(affine, training):
    _assert_rejected_like_nn(4, torch.randn(2, 4, 3, 3), "should contain", training=training, affine=affine)


@pytest.mark.parametrize("rank,shape", [(4, (2, 3, 3)), (4, (2, 3, 3, 3, 3)), (2, (2, 3, 3, 3)), (5, (2, 3, 3, 3))])
def test_wrong_rank_for_module(rank, shape):
    _assert_rejected_like_nn(rank, torch.randn(shape), "expected .*D input")


def test_non_floating_input():
    _assert_rejected_like_nn(4, torch.ones(2, 3, 3, 3, dtype=torch.long), "floating-point")


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training(shape):
    _assert_rejected_like_nn(len(shape), torch.randn(shape), "more than 1 value per channel")


@pytest.mark.parametrize("eps", [-1e-3, 0.0])
def test_non_positive_eps_in_training(eps):
    _assert_rejected_like_nn(4, torch.randn(2, 3, 3, 3), "eps must be positive", eps=eps)


def test_negative_eps_in_eval():
    _assert_rejected_like_nn(4, torch.randn(2, 3, 3, 3), "eps must be non-negative", training=False, eps=-1.0)


def test_mismatched_devices():
    reference, candidate = module_pair(4, 3, torch.float32)
    before = state_of(candidate)
    for training in (True, False):
        candidate.train(training)
        with pytest.raises(RuntimeError, match="is on cpu but input is on meta"):
            candidate(torch.randn(2, 3, 3, 3, device="meta"))
    assert_same_state(before, state_of(candidate))
    with pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
        bnext.batch_norm(torch.randn(2, 3), None, None, torch.ones(3, device="meta"), training=True)
    with pytest.raises(RuntimeError, match="running_mean is on meta but input is on cpu"):
        bnext.batch_norm(torch.randn(2, 3), torch.zeros(3, device="meta"), torch.ones(3), training=True)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("weight", dict(weight=torch.ones(4))),
        ("bias", dict(bias=torch.ones(2))),
        ("running_mean", dict(running_mean=torch.zeros(4))),
        ("running_var", dict(running_var=torch.ones(2))),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_functional_wrong_channel_count(name, kwargs, training):
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=None, bias=None)
    args.update(kwargs)
    x = torch.randn(4, 3, 2)
    with pytest.raises(RuntimeError) as torch_error:
        F.batch_norm(x, training=training, **{k: v.clone() if v is not None else None for k, v in args.items()})
    running = (args["running_mean"].clone(), args["running_var"].clone())
    with pytest.raises(torch_error.type, match=f"{name} should contain"):
        bnext.batch_norm(x, training=training, **args)
    assert torch.equal(args["running_mean"], running[0]) and torch.equal(args["running_var"], running[1])


def test_functional_eval_without_running_stats():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        bnext.batch_norm(x, None, None, training=False)


def test_functional_only_one_running_stat():
    x = torch.randn(4, 3)
    running_mean = torch.zeros(3)
    with pytest.raises(ValueError, match="both be None or neither"):
        F.batch_norm(x, running_mean, None, training=True)
    with pytest.raises(ValueError, match="both be None or neither"):
        bnext.batch_norm(x, running_mean, None, training=True)
    assert torch.equal(running_mean, torch.zeros(3))


def test_functional_momentum_none_is_a_type_error_like_torch():
    x, running_mean, running_var = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError):
        F.batch_norm(x, running_mean, running_var, training=True, momentum=None)
    with pytest.raises(TypeError, match="momentum"):
        bnext.batch_norm(x, running_mean, running_var, training=True, momentum=None)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


def test_ops_reject_bad_arguments_directly():
    ops = torch.ops.bnext
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match=r"shape \(N, C, \*\)"):
        ops.batch_norm_train(torch.randn(3), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        ops.batch_norm_train(x, torch.ones(3, dtype=torch.float16), None, 1e-5)
    _, mean, invstd = ops.batch_norm_train(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        ops.batch_norm_backward(torch.randn(4, 3, 4), x, None, mean, invstd, True, [True, True, True])
    running_mean, running_var, counter = torch.zeros(3), torch.ones(3), torch.tensor(5)
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        ops.update_running_stats(running_mean, running_var, None, mean, invstd, 1e-5, 20, None)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be a one-element int64"):
        ops.update_running_stats(running_mean, running_var, counter.float(), mean, invstd, 1e-5, 20, None)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 4"):
        ops.update_running_stats(running_mean, torch.ones(4), counter, mean, invstd, 1e-5, 20, None)
    assert torch.equal(running_mean, torch.zeros(3)) and int(counter) == 5


def test_nn_increments_num_batches_tracked_on_a_rejected_call_but_bnext_does_not():
    reference, candidate = module_pair(2, 3, torch.float32)
    x = torch.randn(2, 4)
    for module in (reference, candidate):
        with pytest.raises(RuntimeError):
            module(x)
    assert int(reference.num_batches_tracked) == 1
    assert int(candidate.num_batches_tracked) == 0
