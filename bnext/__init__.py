"""bnext: batch normalization for PyTorch in native kernels, a drop-in for torch.nn.BatchNorm."""
import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

from . import ops  # noqa: F401  (registers torch.ops.bnext)
from .functional import batch_norm
from .distributed import SyncBatchNorm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert

__all__ = ["batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert"]
