"""Shared test helpers: the torch reference twins and tolerances."""
import contextlib
import inspect

import pytest
import torch
import torch.nn as nn

import bnext

# Every behaviour test runs on each device; CUDA cases skip where there is no GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

# nn.BatchNorm's bias=False keyword is recent: torch 2.11 (the GPU machine's) has none.
NN_HAS_BIAS_KEYWORD = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
requires_bias_keyword = pytest.mark.skipif(
    not NN_HAS_BIAS_KEYWORD, reason=f"torch {torch.__version__}'s nn.BatchNorm has no bias keyword"
)

NN_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
BNEXT_CLASSES = {2: bnext.BatchNorm1d, 3: bnext.BatchNorm1d, 4: bnext.BatchNorm2d, 5: bnext.BatchNorm3d}

# (rtol, atol) for comparing bnext with torch computing in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


@contextlib.contextmanager
def torch_threads(count):
    """torch's CPU thread count is `count` inside the block.

    CPU eval streams an output of 1.5 MB or more only where it and its input exceed the threads'
    L2 caches (2 MB each): on one thread, the tests' 2 MB outputs stream on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_close(actual, expected, dtype, scale=1.0, msg=""):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, msg=lambda m: f"{msg}: {m}")


def make_input(shape, dtype, layout, seed=0, device="cpu"):
    """Random input of `shape` in memory layout 'contiguous', 'channels_last' or 'strided' (a non-contiguous view)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(device, dtype)
    if layout == "channels_last":
        # channel fastest in memory: channels_last(_3d) for 4-5 dims, an (N, L, C) transpose for 3
        order = [0, *range(2, len(shape)), 1]
        permuted = torch.randn([shape[i] for i in order], generator=gen).to(device, dtype)
        return permuted.permute(*[order.index(dim) for dim in range(len(shape))])
    if layout == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(device, dtype)
        return wide[..., ::2]
    raise ValueError(layout)


def module_pair(rank, channels, param_dtype, seed=0, device="cpu", **kwargs):
    """An nn.BatchNorm and its bnext twin with the same random parameters and running stats."""
    torch.manual_seed(seed)
    reference = NN_CLASSES[rank](channels, dtype=param_dtype, **kwargs).to(device)
    with torch.no_grad():
        if reference.weight is not None:
            reference.weight.uniform_(0.5, 1.5)
        if reference.bias is not None:
            reference.bias.uniform_(-0.5, 0.5)
        if reference.running_mean is not None:
            reference.running_mean.uniform_(-0.5, 0.5)
            reference.running_var.uniform_(0.5, 1.5)
    candidate = BNEXT_CLASSES[rank](channels, dtype=param_dtype, **kwargs).to(device)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


def state_of(module):
    """Every parameter, gradient and buffer of a module, cloned."""
    state = {name: t.detach().clone() for name, t in module.state_dict().items()}
    for name, p in module.named_parameters():
        state[name] = p.detach().clone()
        state[name + ".grad"] = None if p.grad is None else p.grad.clone()
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        if before[name] is None:
            assert after[name] is None, name
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed"
