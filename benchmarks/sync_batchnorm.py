"""Per-step cost of bnext.SyncBatchNorm across processes (gloo, CPU), side by side with torch.

torch.nn.SyncBatchNorm cannot run on CPU: its forward raises "SyncBatchNorm expected input tensor
to be on GPU", and the kernel it relies on (torch.batch_norm_stats) has no CPU implementation. The
torch baseline here is therefore nn.BatchNorm2d on the same per-process shard, with no
synchronization at all: a lower bound on any torch CPU synchronized batch norm, which would add a
collective to it.

One step = forward + backward of a training batch norm on each process's shard. Both are timed in
the same processes, interleaved, medians of many steps after warm-up; rank 0 reports.

    python benchmarks/sync_batchnorm.py --world 2 --json benchmarks/results/sync_cpu_gloo_2proc.json
"""
import argparse
import datetime
import json
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import bnext

# ResNet-50 batch-norm layers, 4 images per process.
SHAPES = [(4, 64, 112, 112), (4, 256, 56, 56), (4, 512, 28, 28), (4, 1024, 14, 14), (4, 2048, 7, 7), (256, 1024)]


def _step(module, x, grad):
    x.grad = None
    module(x).backward(grad)


def _time(module, x, grad, repeat):
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        _step(module, x, grad)
        times.append(time.perf_counter() - start)
    return times


def _worker(rank, world, port, args, results):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    for shape in SHAPES:
        for channels_last in (False, True) if len(shape) == 4 else (False,):
            generator = torch.Generator().manual_seed(rank)
            x = torch.randn(shape, generator=generator) * 2 + 0.5
            grad = torch.randn(shape, generator=generator)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
                grad = grad.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            channels = shape[1]
            sync = bnext.SyncBatchNorm(channels)
            local = nn.BatchNorm2d(channels) if len(shape) == 4 else nn.BatchNorm1d(channels)
            for module in (sync, local):
                _time(module, x, grad, 3)  # warm-up
            samples = {"bnext_sync": [], "torch_local": []}
            for _ in range(args.rounds):  # interleaved, so that drift hits both
                samples["bnext_sync"] += _time(sync, x, grad, args.repeat)
                samples["torch_local"] += _time(local, x, grad, args.repeat)
            ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
            row = dict(shape=list(shape), layout="channels_last" if channels_last else "contiguous",
                       bnext_sync_ms=ms["bnext_sync"], torch_local_ms=ms["torch_local"],
                       speedup=ms["torch_local"] / ms["bnext_sync"])
            rows.append(row)
            if rank == 0:
                print(f"{'x'.join(map(str, shape)):>16} {row['layout']:>14}  bnext sync {row['bnext_sync_ms']:8.3f} ms"
                      f"  torch local {row['torch_local_ms']:8.3f} ms  speedup {row['speedup']:.2f}x", flush=True)
    if rank == 0:
        results.extend(rows)
    dist.barrier()  # no rank tears its gloo group down while a peer still uses it
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="steps per round")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().list()
    print(f"{args.world} processes x {args.threads} thread(s), gloo on localhost; one step = forward + backward")
    mp.start_processes(_worker, args=(args.world, port, args, results), nprocs=args.world, start_method="spawn")
    rows = list(results)
    geomean = statistics.geometric_mean(r["speedup"] for r in rows)
    print(f"geomean speedup of bnext.SyncBatchNorm over unsynchronized nn.BatchNorm: {geomean:.2f}x")
    if args.json:
        meta = dict(world=args.world, threads=args.threads, backend="gloo", torch=torch.__version__,
                    cpu=platform.processor() or platform.machine(), date=datetime.date.today().isoformat(),
                    baseline="nn.BatchNorm on each shard, no synchronization (nn.SyncBatchNorm has no CPU path)")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, geomean_speedup=geomean, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
