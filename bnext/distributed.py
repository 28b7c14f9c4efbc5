"""bnext.SyncBatchNorm: batch statistics over every process of a torch.distributed group.

Training forward, per process: the bnext kernel computes the local per-channel mean and biased
variance; one all_gather shares [header | mean | var] (float64) across the group; the global
statistics are merged on the device with Chan's formula, weighted by each process's count, so
uneven and empty shards are exact; the bnext eval kernel then normalizes with them. Backward: the
bnext kernel reduces the local sum(dy) and sum(dy * (x - mean)), one all_reduce adds them over the
group, and the bnext kernel writes the input gradient with the global count.
"""
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import _BnextForward
from .ops import _stats_dtype, call, ops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HEADER = 3  # channels, dtype code, count


def _sync_group(module):
    """The process group to synchronize over, or None where nothing is to be synchronized."""
    if not (module.training and dist.is_available() and dist.is_initialized()):
        return None
    group = module.process_group if module.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _all_gather(message, group):
    """One all_gather of `message` (same size everywhere): a (world, size) tensor."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == dist.Backend.GLOO:  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(message) for _ in range(world)]
        dist.all_gather(parts, message, group=group)
        return torch.stack(parts)
    gathered = message.new_empty(world, message.numel())
    dist.all_gather_into_tensor(gathered, message, group=group)
    return gathered


def _check_agreement(gathered, num_features, group):
    """Raises the same error on every process when the processes' inputs disagree.

    Reads the gathered headers on the host, so only where that costs no device synchronization
    (CPU tensors): on CUDA a mismatch is not detected here.
    """
    if gathered.device.type != "cpu":
        return
    channels = [int(c) for c in gathered[:, 0].tolist()]
    codes = [int(code) for code in gathered[:, 1].tolist()]
    if any(c != num_features for c in channels) or len(set(codes)) > 1 or codes[0] < 0:
        ranks = dist.get_process_group_ranks(group)
        found = ", ".join(
            f"rank {rank}: {c} channels, {_DTYPES[code] if code >= 0 else 'not floating point'}"
            for rank, c, code in zip(ranks, channels, codes)
        )
        raise ValueError(
            f"bnext SyncBatchNorm: the processes' inputs disagree (expected {num_features} channels and one "
            f"dtype everywhere): {found}"
        )
    if gathered[:, 2].sum().item() == 1:
        raise ValueError("Expected more than 1 value per channel when training, got 1 value over the whole group")


def _merge(gathered, channels):
    """Global count, mean and biased variance from the per-process rows (Chan's parallel formula)."""
    counts = gathered[:, 2:3]
    means = gathered[:, _HEADER : _HEADER + channels]
    variances = gathered[:, _HEADER + channels :]
    count = counts.sum(0)
    mean = (counts * means).sum(0) / count
    m2 = (counts * (variances + (means - mean) ** 2)).sum(0)
    return count, mean, m2 / count


def _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, count, mean, var):
    """nn.BatchNorm's running-stats update with the global statistics, as device tensor ops (no sync)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None:
        return
    factor = 1.0 / num_batches_tracked.double() if momentum is None else momentum
    unbiased = var * count / (count - 1)
    for running, batch in ((running_mean, mean), (running_var, unbiased)):
        old = running.double()
        # An empty global batch has no statistics: nn.BatchNorm leaves the running stats as they were.
        running.copy_(torch.where(count > 0, torch.lerp(old, batch, factor), old))


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, num_features, momentum,
                eps, group):
        channels = input.shape[1]
        fits = channels == num_features and input.dtype in _DTYPES
        if fits:
            local_mean, local_var = call(ops.batch_norm_stats.default, input)
        else:  # still takes part in the collective, so that every process raises instead of hanging
            local_mean = local_var = input.new_zeros(num_features, dtype=torch.float64)
        message = torch.empty(_HEADER + 2 * num_features, dtype=torch.float64, device=input.device)
        message[0] = channels
        message[1] = _DTYPES.index(input.dtype) if input.dtype in _DTYPES else -1
        message[2] = input.numel() // channels  # the module has checked that channels > 0
        message[_HEADER : _HEADER + num_features] = local_mean
        message[_HEADER + num_features :] = local_var
        gathered = _all_gather(message, group)
        _check_agreement(gathered, num_features, group)

        count, mean, var = _merge(gathered, num_features)
        stats_dtype = _stats_dtype(input.dtype)
        mean_s, var_s = mean.to(stats_dtype), var.to(stats_dtype)
        output = call(ops.batch_norm_eval.default, input, mean_s, var_s, weight, bias, eps)
        invstd = torch.rsqrt(var_s + eps)
        with torch.no_grad():
            _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, count, mean, var)
        ctx.save_for_backward(input, weight, mean_s, invstd, count)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd, count = ctx.saved_tensors
        channels = mean.numel()
        # batch_norm_backward's grad_weight is sum(dy * (x - mean) * invstd): with invstd = 1 it is
        # sum(dy * (x - mean)) itself; a stats-dtype weight brings both sums back in that dtype.
        ones = torch.ones_like(mean)
        _, sum_dy_xmu, sum_dy = call(
            ops.batch_norm_backward.default, grad_output, input, ones, mean, ones, False, [False, True, True]
        )
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu]).double()
            dist.all_reduce(sums, group=ctx.group)
            grad_input = call(
                ops.batch_norm_backward_elemt.default, grad_output, input, weight, mean, invstd,
                sums[:channels], sums[channels:], count,
            )
        # Each process's own parameter gradients: DistributedDataParallel reduces them.
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(_BnextForward, _BatchNorm):
    """torch.nn.SyncBatchNorm on bnext's kernels, on CPU (gloo) as well as CUDA (NCCL).

    Same constructor, attributes, state_dict and semantics as nn.SyncBatchNorm. In training, with an
    initialized process group of more than one process, the batch statistics are those of the
    group's global batch. Otherwise (eval mode, a world of one, no process group) it is
    bnext.BatchNorm: no collective.

    It derives from nn.SyncBatchNorm's own base (_BatchNorm), not from nn.SyncBatchNorm: DistributedDataParallel
    rejects every nn.SyncBatchNorm instance on CPU ("SyncBatchNorm layers only work with GPU modules").
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True):
        # bias=True is passed on only by omission: torch 2.11's _BatchNorm has no bias keyword.
        no_bias = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **no_bias)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = _sync_group(self)
        if group is None:
            return super().forward(input)
        track = self.track_running_stats
        return _SyncBatchNorm.apply(
            input, self.weight, self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.num_batches_tracked if track else None,
            self.num_features, self.momentum, self.eps, group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """bnext.convert(module, sync=True, process_group=process_group)."""
        from .modules import convert

        return convert(module, sync=True, process_group=process_group)
