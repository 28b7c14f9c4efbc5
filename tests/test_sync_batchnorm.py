"""bnext.SyncBatchNorm across 2 and 3 processes (gloo, CPU, localhost) against one process running
nn.BatchNorm on the concatenated global batch; the same cases with the shards on CUDA where a GPU
is present (gloo on one GPU, NCCL with one GPU per process)."""
import datetime
import os
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnext

STEPS = 3
CHANNELS = 5


def spawn(worker, world, *args, backend="gloo"):
    """Runs worker(rank, world, *args) in `world` processes of one group; returns rank 0's failures.

    The processes meet through a file store in a fresh directory rather than a TCP port: a port
    found free here could be taken by another process before rank 0 binds it."""
    ctx = mp.get_context("spawn")
    failures = ctx.Manager().list()
    with tempfile.TemporaryDirectory() as directory:
        store = os.path.join(directory, "store")
        mp.start_processes(_entry, args=(world, store, worker, failures, args, backend), nprocs=world,
                           start_method="spawn")
    return list(failures)


def _entry(rank, world, store, worker, failures, args, backend):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)  # NCCL wants one GPU per process; "cuda" below means this one
    # A timeout turns a collective that one process never joins into an error rather than a hang.
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        worker(rank, world, failures, *args)  # workers catch their exceptions: every rank gets here
    finally:
        # Tear down only once every rank is done: a rank destroying its gloo group while a peer
        # still works aborted that peer now and then ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's objects still referenced then (by the DDP
    # module, autograd hooks) can be destroyed with their threads running: that aborted a process
    # after all its checks had passed (once in six runs of this file in CI, with the barrier above).
    # The failures list lives in the parent's manager process and is already complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _bounds(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _tolerances(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)


def _run_case(rank, world, sizes, dtype, channels_last, momentum, use_ddp, dims, device="cpu"):
    """Several training steps of DDP(bnext.SyncBatchNorm) against nn.BatchNorm on the global batch.

    The reference runs on the CPU; with device="cuda" each process's module and shard are on CUDA.

    Returns the mismatches found. It checks every step to the end rather than raising at the first
    mismatch, so that every process runs the same collectives whatever one of them finds.
    """
    mismatches = []

    def check(got, expected, what):
        try:
            torch.testing.assert_close(got.detach().cpu(), expected, **_tolerances(dtype))
        except AssertionError as e:
            mismatches.append(f"step {step} {what}: {e}")

    generator = torch.Generator().manual_seed(1234)
    reference = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(CHANNELS, momentum=momentum).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(torch.rand(CHANNELS, generator=generator, dtype=dtype) + 0.5)
        reference.bias.copy_(torch.randn(CHANNELS, generator=generator, dtype=dtype))
    module = bnext.convert(
        (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(CHANNELS, momentum=momentum).to(dtype), sync=True
    )
    module.load_state_dict(reference.state_dict())
    module = module.to(device)
    model = nn.parallel.DistributedDataParallel(module) if use_ddp else module
    start, end = _bounds(sizes, rank)
    for step in range(STEPS):
        shape = (sum(sizes), CHANNELS, 6, 7) if dims == 4 else (sum(sizes), CHANNELS)
        x = (torch.randn(shape, generator=generator, dtype=dtype) * (step + 1) + 3.0 * step)
        grad = torch.randn(shape, generator=generator, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_ref = x.clone().requires_grad_()
        out_ref = reference(x_ref)
        (out_ref * grad).sum().backward()

        x_local = x[start:end].to(device).clone().requires_grad_()
        out = model(x_local)
        (out * grad[start:end].to(device)).sum().backward()

        check(out, out_ref[start:end], "output")
        check(x_local.grad, x_ref.grad[start:end], "input gradient")
        for name in ("weight", "bias"):
            got = getattr(module, name).grad
            if use_ddp:
                expected = getattr(reference, name).grad / world  # DDP averages over processes
            else:  # each process holds its own shard's part: their sum is the global gradient
                expected = getattr(reference, name).grad.clone()
                dist.all_reduce(got := got.clone())
            check(got, expected, f"{name} gradient")
        for name in ("running_mean", "running_var"):
            check(getattr(module, name), getattr(reference, name), name)
        check(module.num_batches_tracked, torch.tensor(step + 1), "num_batches_tracked")
        check(reference.num_batches_tracked, torch.tensor(step + 1), "nn's num_batches_tracked")
        for p in (*module.parameters(), *reference.parameters()):
            p.grad = None
    return mismatches


SPLITS = {
    2: {"even": [4, 4], "uneven": [5, 2], "empty": [0, 6]},
    3: {"even": [3, 3, 3], "uneven": [1, 4, 2], "empty": [4, 0, 3]},
}


def _matches_worker(rank, world, failures, cases):
    for case in cases:
        try:
            mismatches = _run_case(
                rank, world, SPLITS[world][case["split"]], **{k: v for k, v in case.items() if k != "split"}
            )
            failures.extend([f"rank {rank} case {case}: {m}" for m in mismatches])
        except Exception:  # noqa: BLE001  (collect every failing case, then fail the test with all of them)
            failures.append(f"rank {rank} case {case}:\n{traceback.format_exc()}")


def _cases(world):
    cases = []
    for split in SPLITS[world]:
        for dtype in (torch.float32, torch.float64):
            for channels_last in (False, True):
                cases.append(dict(split=split, dtype=dtype, channels_last=channels_last, momentum=0.1,
                                  use_ddp=True, dims=4))
        cases.append(dict(split=split, dtype=torch.float64, channels_last=False, momentum=None, use_ddp=True, dims=4))
        cases.append(dict(split=split, dtype=torch.float32, channels_last=False, momentum=0.1, use_ddp=False, dims=2))
    return cases


@pytest.mark.parametrize("world", [2, 3])
def test_sync_batchnorm_matches_global_batch_norm(world):
    """Outputs, input and parameter gradients (after DDP), running stats and num_batches_tracked over
    3 steps; even, uneven and empty-shard splits; NCHW and channels_last; float32 and float64;
    momentum None; (N, C) input without DDP."""
    failures = spawn(_matches_worker, world, _cases(world))
    assert not failures, "\n".join(failures)


def _cuda_cases():
    """The 2-process cases with each process's module and shard on CUDA."""
    return [dict(case, device="cuda") for case in _cases(2)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_batchnorm_on_one_gpu_through_gloo():
    """The same cases with both processes' shards on one GPU: bnext's CUDA kernels for the local
    passes, gloo's collectives on CUDA tensors. (NCCL cannot put two ranks on one GPU.)"""
    failures = spawn(_matches_worker, 2, _cuda_cases())
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="NCCL needs one GPU per process: 2 GPUs and an NCCL build of torch",
)
def test_sync_batchnorm_with_nccl():
    """The same cases on 2 GPUs with NCCL, one process per GPU."""
    failures = spawn(_matches_worker, 2, _cuda_cases(), backend="nccl")
    assert not failures, "\n".join(failures)


def _subgroup_worker(rank, world, failures):
    """Ranks 0 and 1 sync in one subgroup; rank 2 is a group of one and so plain bnext.BatchNorm2d."""
    try:
        groups = [dist.new_group([0, 1]), dist.new_group([2])]
        group = groups[0] if rank < 2 else groups[1]
        generator = torch.Generator().manual_seed(7)
        x = torch.randn(6, CHANNELS, 4, 4, generator=generator)
        sync = bnext.SyncBatchNorm(CHANNELS, process_group=group)
        if rank < 2:
            reference = nn.BatchNorm2d(CHANNELS)
            expected = reference(x)[3 * rank : 3 * rank + 3]
            got = sync(x[3 * rank : 3 * rank + 3])
        else:
            reference = bnext.BatchNorm2d(CHANNELS)
            expected = reference(x)
            got = sync(x)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(sync.running_var, reference.running_var)
        sync.eval()
        reference.eval()
        torch.testing.assert_close(sync(x), reference(x))  # eval: running stats, no collective
    except Exception:  # noqa: BLE001
        failures.append(f"rank {rank}:\n{traceback.format_exc()}")


def test_sync_batchnorm_subgroups_and_group_of_one():
    failures = spawn(_subgroup_worker, 3)
    assert not failures, "\n".join(failures)


def _mismatch_worker(rank, world, failures, kind):
    module = bnext.SyncBatchNorm(CHANNELS)
    channels = CHANNELS + 1 if kind == "channels" and rank == 1 else CHANNELS
    dtype = torch.float64 if kind == "dtype" and rank == 1 else torch.float32
    module = module.to(dtype)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        module(torch.randn(4, channels, 3, 3, dtype=dtype))
        failures.append(f"rank {rank}: no error for mismatched {kind}")
    except ValueError as e:
        if "disagree" not in str(e):
            failures.append(f"rank {rank}: unexpected message {e}")
    for k, v in module.state_dict().items():
        if not torch.equal(v, before[k]):
            failures.append(f"rank {rank}: {k} changed by a rejected call")


@pytest.mark.parametrize("kind", ["channels", "dtype"])
def test_mismatched_inputs_raise_on_every_process(kind):
    failures = spawn(_mismatch_worker, 2, kind)
    assert not failures, "\n".join(failures)


def _compile_worker(rank, world, failures):
    try:
        torch.manual_seed(0)
        x = torch.randn(8, CHANNELS, 4, 4)
        module = bnext.SyncBatchNorm(CHANNELS)
        reference = nn.BatchNorm2d(CHANNELS)
        compiled = torch.compile(module)
        shard = x[4 * rank : 4 * rank + 4].clone().requires_grad_()
        out = compiled(shard)
        out.sum().backward()
        x_ref = x.clone().requires_grad_()
        reference(x_ref).sum().backward()
        torch.testing.assert_close(out, reference(x)[4 * rank : 4 * rank + 4].detach(), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(shard.grad, x_ref.grad[4 * rank : 4 * rank + 4], rtol=1e-4, atol=2e-5)
    except Exception:  # noqa: BLE001
        failures.append(f"rank {rank}:\n{traceback.format_exc()}")


def test_sync_batchnorm_under_torch_compile():
    """torch.compile runs it (the collectives are graph breaks) with the same results."""
    failures = spawn(_compile_worker, 2)
    assert not failures, "\n".join(failures)


def test_without_process_group_it_is_bnext_batch_norm():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(6, CHANNELS, 3, 3)
    sync, plain = bnext.SyncBatchNorm(CHANNELS), bnext.BatchNorm2d(CHANNELS)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)


def test_convert_sync_keeps_state():
    model = nn.Sequential(nn.Conv2d(3, CHANNELS, 1), nn.BatchNorm2d(CHANNELS), nn.Sequential(nn.BatchNorm1d(4)))
    model[1].running_mean.fill_(0.25)
    weight = model[1].weight
    converted = bnext.convert(model, sync=True)
    assert isinstance(converted[1], bnext.SyncBatchNorm) and isinstance(converted[2][0], bnext.SyncBatchNorm)
    assert converted[1].weight is weight
    assert torch.equal(converted[1].running_mean, torch.full((CHANNELS,), 0.25))
    assert isinstance(bnext.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2)), bnext.SyncBatchNorm)
    assert isinstance(bnext.convert(nn.SyncBatchNorm(2)), bnext.SyncBatchNorm)
    group = object()  # stands for a process group: only stored until a forward uses it
    regrouped = bnext.convert(converted, sync=True, process_group=group)
    assert regrouped[1].process_group is group and regrouped[1].weight is weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_local_pass_operators(dtype, channels_last):
    """batch_norm_stats against float64 torch; batch_norm_backward_elemt with this process's own sums
    equals the training backward; opcheck on both."""
    ops = torch.ops.bnext
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(4, CHANNELS, 5, 3, generator=generator) * 3 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = ops.batch_norm_stats(x)
    x64 = x.double()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), **tol)
    torch.library.opcheck(ops.batch_norm_stats.default, (x,))

    dy = torch.randn(x.shape, generator=generator).to(dtype)
    weight = torch.rand(CHANNELS, generator=generator, dtype=mean.dtype) + 0.5
    _, save_mean, save_invstd = ops.batch_norm_train(x, weight, None, 1e-5)
    ones = torch.ones_like(save_mean)
    _, sum_dy_xmu, sum_dy = ops.batch_norm_backward(dy, x, ones, save_mean, ones, False, [False, True, True])
    expected, _, _ = ops.batch_norm_backward(dy, x, weight, save_mean, save_invstd, True, [True, False, False])
    count = torch.tensor([x.numel() // CHANNELS], dtype=torch.float64)
    args = (dy, x, weight, save_mean, save_invstd, sum_dy, sum_dy_xmu, count)
    torch.testing.assert_close(ops.batch_norm_backward_elemt(*args), expected, **tol)
    torch.library.opcheck(ops.batch_norm_backward_elemt.default, args)


def test_default_construction_passes_no_bias_keyword(monkeypatch):
    """torch 2.11's _BatchNorm.__init__ has no bias keyword (the H100 machine's torch): a
    SyncBatchNorm built with the default bias=True must not pass one."""
    original = _BatchNorm.__init__

    def init_without_bias_keyword(self, *args, **kwargs):
        if "bias" in kwargs:
            raise TypeError("_BatchNorm.__init__() got an unexpected keyword argument 'bias'")
        original(self, *args, **kwargs)

    monkeypatch.setattr(_BatchNorm, "__init__", init_without_bias_keyword)
    module = bnext.SyncBatchNorm(4)
    assert module.bias is not None and module.weight is not None
