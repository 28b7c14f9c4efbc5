"""Drop-in subclasses of torch.nn.BatchNorm1d/2d/3d that run on the bnext operators."""
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import _batch_norm


class _BnextForward:
    """nn.BatchNorm's forward on the bnext operators.

    The only difference from nn.BatchNorm: num_batches_tracked is incremented by the running-stats
    operator after the call is validated (a rejected call changes no state), and momentum=None reads
    it on its device (no host read, so torch.compile(fullgraph=True) can trace it).
    """

    def forward(self, input):
        self._check_input_dim(input)
        track = self.training and self.track_running_stats
        num_batches_tracked = self.num_batches_tracked if track else None
        momentum = self.momentum
        if momentum is None and num_batches_tracked is None:
            momentum = 0.0  # nn.BatchNorm's factor when there is no counter to average with
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            num_batches_tracked,
        )


class BatchNorm1d(_BnextForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bnext's kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_BnextForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bnext's kernels: input (N, C, H, W)."""


class BatchNorm3d(_BnextForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bnext's kernels: input (N, C, D, H, W)."""


_TWINS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _twin(module, cls):
    """A `cls` module sharing the original's parameters, buffers, hooks and mode."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    twin._modules = dict(module._modules)
    return twin


def _replacement(module, sync):
    """The class to turn `module` into, or None to leave it (and look into its children)."""
    from .distributed import SyncBatchNorm

    if sync:  # like nn.SyncBatchNorm.convert_sync_batchnorm: every batch norm, synchronized ones included
        return SyncBatchNorm if isinstance(module, _BatchNorm) else None
    if type(module) is nn.SyncBatchNorm:
        return SyncBatchNorm
    return _TWINS.get(type(module))


def convert(module: nn.Module, sync: bool = False, process_group=None) -> nn.Module:
    """Replace every batch norm in `module` (recursively, in place) by its bnext twin.

    nn.BatchNorm1d/2d/3d become bnext.BatchNorm1d/2d/3d, and nn.SyncBatchNorm becomes
    bnext.SyncBatchNorm. With sync=True every nn.BatchNorm*, nn.SyncBatchNorm and bnext batch norm
    becomes a bnext.SyncBatchNorm over `process_group` (default: the whole world), like
    nn.SyncBatchNorm.convert_sync_batchnorm. The twins share the originals' parameters and buffers
    (so optimizers built before the call keep working), device, dtype and train/eval mode. Returns
    the converted module, which is a new object only when `module` itself is a batch norm.
    """
    cls = _replacement(module, sync)
    if cls is not None:
        twin = _twin(module, cls)
        if sync:
            twin.process_group = process_group
        return twin
    for name, child in module.named_children():
        converted = convert(child, sync, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
