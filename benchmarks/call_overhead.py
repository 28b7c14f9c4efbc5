"""Where the time of a small batch norm goes: kernels alone against whole autograd calls.

    python benchmarks/call_overhead.py [--json PATH]

For each shape, for bnext and for torch, all in one run: the training forward and backward
kernels alone (operators called below autograd); the functional call, training and eval, with no
gradient to record (nothing requires grad: inference, a frozen layer); the functional training
call with a graph recorded, and its backward. The gap between the kernels and the calls is the
fixed cost per call.
"""
import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

import bnext
from bnext.bench import git_commit

SHAPES = [((8, 512, 7, 7), "contiguous"), ((8, 512, 7, 7), "channels_last"), ((8, 2048, 7, 7), "channels_last"),
          ((8, 256, 14, 14), "contiguous"), ((8, 256, 14, 14), "channels_last"), ((256, 1024), "contiguous"),
          ((4, 8, 2, 2), "contiguous")]
KERNELS_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def median_ms(fn, repeats=200, warmup=20):
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def median_backward_ms(batch_norm, x, grad, parameters, repeats=200, warmup=20):
    times = []
    for i in range(warmup + repeats):
        y = batch_norm(x, *parameters)
        start = time.perf_counter()
        y.backward(grad)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def measure(shape, layout):
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    grad = torch.randn_like(x)
    with torch.no_grad():
        _, mean, invstd = torch.ops.bnext.batch_norm_train(x, weight, bias, 1e-5)
    kernels = {
        "bnext_fwd": lambda: torch.ops.bnext.batch_norm_train.default.redispatch(KERNELS_ONLY, x, weight, bias, 1e-5),
        "torch_fwd": lambda: torch.ops.aten.native_batch_norm.default.redispatch(
            KERNELS_ONLY, x, weight, bias, None, None, True, 0.1, 1e-5),
        "bnext_bwd": lambda: torch.ops.bnext.batch_norm_backward.default.redispatch(
            KERNELS_ONLY, grad, x, weight, mean, invstd, True, [True, True, True]),
        "torch_bwd": lambda: torch.ops.aten.native_batch_norm_backward.default.redispatch(
            KERNELS_ONLY, grad, x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True]),
    }
    result = {f"kernel_{name}_ms": median_ms(fn) for name, fn in kernels.items()}
    for name, batch_norm in [("bnext", bnext.batch_norm), ("torch", F.batch_norm)]:
        for mode, training in [("fwd", True), ("eval", False)]:
            frozen = (torch.zeros(channels), torch.ones(channels), weight, bias, training)
            result[f"no_graph_{name}_{mode}_ms"] = median_ms(lambda: batch_norm(x, *frozen))
    x_grad = x.clone().requires_grad_()
    parameters = (torch.zeros(channels), torch.ones(channels), weight.clone().requires_grad_(),
                  bias.clone().requires_grad_(), True)
    for name, batch_norm in [("bnext", bnext.batch_norm), ("torch", F.batch_norm)]:
        result[f"autograd_{name}_fwd_ms"] = median_ms(lambda: batch_norm(x_grad, *parameters))
        result[f"autograd_{name}_bwd_ms"] = median_backward_ms(batch_norm, x_grad, grad, parameters)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = []
    print(f"{'shape':14s} {'layout':14s}  kernels fwd torch/bnext  kernels bwd torch/bnext  "
          "no-graph fwd torch/bnext  no-graph eval torch/bnext  "
          "autograd fwd torch/bnext  autograd bwd torch/bnext (ms)")
    for shape, layout in SHAPES:
        r = measure(shape, layout)
        rows.append({"shape": list(shape), "layout": layout, **r})
        print(f"{'x'.join(map(str, shape)):14s} {layout:14s}  "
              f"{r['kernel_torch_fwd_ms']:.3f}/{r['kernel_bnext_fwd_ms']:.3f}             "
              f"{r['kernel_torch_bwd_ms']:.3f}/{r['kernel_bnext_bwd_ms']:.3f}             "
              f"{r['no_graph_torch_fwd_ms']:.3f}/{r['no_graph_bnext_fwd_ms']:.3f}              "
              f"{r['no_graph_torch_eval_ms']:.3f}/{r['no_graph_bnext_eval_ms']:.3f}                "
              f"{r['autograd_torch_fwd_ms']:.3f}/{r['autograd_bnext_fwd_ms']:.3f}              "
              f"{r['autograd_torch_bwd_ms']:.3f}/{r['autograd_bnext_bwd_ms']:.3f}", flush=True)
    if args.json:
        metadata = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "git_commit": git_commit()}
        with open(args.json, "w") as f:
            json.dump({"metadata": metadata, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
