"""Where the time of one batch-norm call goes on a GPU: the call as bnext.bench times it (CUDA
events around one call, the GPU idle before) against the sum of its kernels' device times
(torch.profiler), for bnext and torch. The difference is time the GPU waits for the host: Python,
dispatch and kernel launches. Also lists bnext's kernels with their mean device time.

    python benchmarks/cuda_profile.py [--dtype float32,bfloat16] [--host]

--host instead prints the host-side profile (CPU time per operator and CUDA runtime call) of
forward+backward on two shapes, for bnext and torch.
"""
import argparse
import collections
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from bnext import bench

SHAPES = [
    ((64, 64, 56, 56), "contiguous"),
    ((64, 64, 56, 56), "channels_last"),
    ((256, 1024, 14, 14), "contiguous"),
    ((64, 2048, 7, 7), "contiguous"),
    ((64, 2048, 7, 7), "channels_last"),
    ((65536, 256), "contiguous"),
]
CALLS = 20


def make_calls(shape, layout, dtype, case):
    """bnext.bench's own timers for one case: name -> one timed call, returning its seconds."""
    timers = bench.make_timers(bench.Config(shape, layout, dtype, "cuda"), case)
    return {name: timers[name] for name in ("torch", "bnext")}


def event_ms(call):
    return statistics.median(call() for _ in range(CALLS * 3)) * 1e3


def kernel_times(call):
    """Mean device time per call of each kernel (us), and of all of them."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            call()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.time_range.elapsed_us() / CALLS
    return per_kernel, sum(per_kernel.values())


def short(name):
    for key in ("planar_partials", "rows_partials", "finish_moments", "finish_grad_sums", "normalize",
                "input_grad", "update_running", "increment_counter", "running_affine", "copy", "fill"):
        if key in name:
            return key
    return name[:40]


def host_profiles():
    for shape, layout, dtype in (((64, 2048, 7, 7), "contiguous", torch.bfloat16),
                                 ((64, 64, 56, 56), "contiguous", torch.float32)):
        for name, call in make_calls(shape, layout, dtype, "fwd_bwd").items():
            for _ in range(5):
                call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(CALLS):
                    call()
                torch.cuda.synchronize()
            print(f"\n{name} fwd_bwd {'x'.join(map(str, shape))} {layout} {dtype}: {CALLS} calls")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--host", action="store_true")
    args = parser.parse_args()
    if args.host:
        host_profiles()
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; times in us per call (median of "
          f"{CALLS * 3} event-timed calls; kernel sums over {CALLS} profiled calls)")
    print(f"{'shape':<16} {'layout':<13} {'dtype':<8} {'case':<9} {'impl':<5} {'event':>7} {'kernels':>8} "
          f"{'host gap':>8}  bnext kernels (us)")
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        for shape, layout in SHAPES:
            for case in ("train_fwd", "fwd_bwd", "eval_fwd"):
                for name, call in make_calls(shape, layout, dtype, case).items():
                    for _ in range(5):
                        call()
                    elapsed = event_ms(call) * 1e3
                    per_kernel, total = kernel_times(call)
                    listing = ""
                    if name == "bnext":
                        merged = collections.defaultdict(float)
                        for kernel, us in per_kernel.items():
                            merged[short(kernel)] += us
                        listing = " ".join(f"{k}={v:.1f}" for k, v in merged.items())
                    print(f"{'x'.join(map(str, shape)):<16} {layout:<13} {dtype_name:<8} {case:<9} {name:<5} "
                          f"{elapsed:7.1f} {total:8.1f} {elapsed - total:8.1f}  {listing}", flush=True)


if __name__ == "__main__":
    main()
