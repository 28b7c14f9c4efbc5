"""bnext.batch_norm: torch.nn.functional.batch_norm on the bnext operators."""
import torch

from .ops import _check_devices, batch_norm_eval, batch_norm_train, ops


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
    """Batch norm with an in-place running-stats update; `num_batches_tracked` (optional) is
    incremented by the update, and momentum=None then averages cumulatively."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if not training:
        return batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise TypeError("bnext batch_norm: momentum=None (cumulative average) needs num_batches_tracked")
    _check_devices(input, running_mean=running_mean, running_var=running_var)  # before any kernel: no state changes
    output, save_mean, save_invstd = batch_norm_train(input, weight, bias, eps)
    if running_mean is not None:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        ops.update_running_stats.default(
            running_mean, running_var, num_batches_tracked, save_mean, save_invstd, eps, count, momentum
        )
    return output


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Same signature and semantics as torch.nn.functional.batch_norm, on the bnext operators.

    In training, running_mean and running_var (when given) are updated in place with the
    batch's mean and unbiased variance: running = (1 - momentum) * running + momentum * batch.
    """
    if momentum is None:
        raise TypeError("bnext.batch_norm: momentum must be a float, not None")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, None)
