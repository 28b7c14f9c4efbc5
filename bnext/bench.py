"""Benchmark bnext.batch_norm against torch.nn.functional.batch_norm, on CPU or CUDA.

    python -m bnext.bench [--quick] [--device cpu|cuda] [--dtype float32,bfloat16]
                          [--cases train_fwd,...] [--threads N] [--repeat N] [--json PATH] [--plot PATH]

On CUDA (the default where a GPU is present) torch is timed twice: its default path (cuDNN where
torch picks it) and its native kernels (cuDNN disabled); times are device times between CUDA events,
and the shapes are GPU-sized (ResNet-50's layers at batch 64 and 256; see GPU_SHAPES).

Every configuration (shape, layout, dtype) is first checked against torch: training forward
output, running statistics, eval output and the input/weight/bias gradients. Any disagreement
aborts with a non-zero exit before anything is timed. Then each case is timed with bnext, torch
and a plain copy of the input (the memory-traffic floor) interleaved in one loop, so that clock
or thermal drift hits all three alike; each case runs in three rounds, each on freshly allocated
tensors, and reports the median over rounds of each timer's median.

The training backward cases (train_bwd, fwd_bwd) time the layer's autograd node applied to the
output's gradient, as a training step's backward pass applies it (backward_timer); the cost of
entering autograd, once per backward() call, is measured apart and printed with the table.
eval_bwd, timed only when --cases asks for it, does the same for a layer in eval mode (running
statistics frozen, weight and bias still trained, as when fine-tuning).
"""
import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import bnext

RESNET50_SHAPES = [  # the batch-norm layers of ResNet-50 at batch 8
    (8, 64, 112, 112),
    (8, 64, 56, 56),
    (8, 256, 56, 56),
    (8, 128, 28, 28),
    (8, 512, 28, 28),
    (8, 256, 14, 14),
    (8, 1024, 14, 14),
    (8, 512, 7, 7),
    (8, 2048, 7, 7),
]
BATCHNORM1D_SHAPES = [(4096, 256), (256, 1024), (32, 128, 1000)]
BATCHNORM3D_SHAPES = [(2, 64, 16, 56, 56)]
ALL_SHAPES = RESNET50_SHAPES + BATCHNORM1D_SHAPES + BATCHNORM3D_SHAPES
# Large and small spatial extents, many channels, and an MLP shape.
QUICK_SHAPES = [(8, 64, 56, 56), (8, 1024, 14, 14), (8, 2048, 7, 7), (4096, 256)]
# On a GPU: the same ResNet-50 layers at batch 64 and 256, and BatchNorm1d/3d sized to fill one.
GPU_SHAPES = (
    [(batch, *shape[1:]) for batch in (64, 256) for shape in RESNET50_SHAPES]
    + [(65536, 256), (256, 4096)]
    + [(8, 64, 16, 56, 56)]
)
GPU_QUICK_SHAPES = [(64, 64, 56, 56), (256, 1024, 14, 14), (64, 2048, 7, 7), (65536, 256)]

CASES = ("train_fwd", "eval_fwd", "train_bwd", "fwd_bwd")
OPTIONAL_CASES = ("eval_bwd",)  # timed only when --cases names them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (rtol, atol); atol is scaled by the reference's magnitude, see `mismatch`.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
# Fewest bytes each case must move, in units of |x| (the input's size in bytes): a forward reads
# x and writes y, a backward reads x and dy and writes dx, and a copy reads x and writes y.
TRAFFIC = {"train_fwd": 2, "eval_fwd": 2, "train_bwd": 3, "fwd_bwd": 5, "eval_bwd": 3}
COPY_TRAFFIC = 2


def torch_native_batch_norm(*args):
    """torch's own CUDA kernels: F.batch_norm with cuDNN disabled (backward follows the forward's choice)."""
    with torch.backends.cudnn.flags(enabled=False):
        return F.batch_norm(*args)


IMPLEMENTATIONS = {"bnext": bnext.batch_norm, "torch": F.batch_norm}
CUDA_IMPLEMENTATIONS = {**IMPLEMENTATIONS, "native": torch_native_batch_norm}


def implementations(device):
    return CUDA_IMPLEMENTATIONS if torch.device(device).type == "cuda" else IMPLEMENTATIONS
MOMENTUM = 0.1
EPS = 1e-5


@dataclass(frozen=True)
class Config:
    shape: tuple
    layout: str
    dtype: torch.dtype
    device: str = "cpu"

    @property
    def dtype_name(self):
        return str(self.dtype).removeprefix("torch.")

    def describe(self):
        return f"{format_shape(self.shape)} {self.layout} {self.dtype_name}"


@dataclass(frozen=True)
class TimingPlan:
    """How many repetitions to run per round: fixed, or enough to fill `budget_s` per case over
    `rounds` rounds (each on freshly allocated tensors, see time_case)."""

    warmup: int
    budget_s: float
    min_repeats: int
    max_repeats: int
    fixed_repeats: int | None = None
    rounds: int = 1

    def repeats_for(self, seconds_per_repetition):
        if self.fixed_repeats is not None:
            return self.fixed_repeats
        wanted = round(self.budget_s / self.rounds / max(seconds_per_repetition, 1e-9))
        return min(max(wanted, self.min_repeats), self.max_repeats)


@dataclass
class Result:
    shape: tuple
    layout: str
    dtype: str
    case: str
    repeats: int
    torch_ms: float
    bnext_ms: float
    copy_ms: float
    speedup: float  # torch time / bnext time
    bnext_floor_multiple: float  # bnext time / floor, floor = (TRAFFIC / COPY_TRAFFIC) * T_copy
    torch_floor_multiple: float
    bnext_gbps: float  # TRAFFIC * |x| / bnext time
    native_ms: float | None = None  # CUDA: torch's native kernels (cuDNN disabled)
    native_speedup: float | None = None  # native time / bnext time


def format_shape(shape):
    return "x".join(map(str, shape))


def layouts_for(shape):
    channels_last = {4: ["channels_last"], 5: ["channels_last_3d"]}
    return ["contiguous"] + channels_last.get(len(shape), [])


def configurations(shapes, dtypes, device="cpu"):
    return [
        Config(shape, layout, dtype, device) for dtype in dtypes for shape in shapes for layout in layouts_for(shape)
    ]


# ---------------------------------------------------------------------------------------------
# Data


def random_tensor(config):
    """Normal data with a non-zero mean and non-unit spread, so that normalizing does real work."""
    data = torch.randn(config.shape) * 2.0 + 0.5
    return data.to(config.device, config.dtype).contiguous(memory_format=MEMORY_FORMATS[config.layout])


def random_parameters(config, requires_grad):
    """(weight, bias, running_mean, running_var) in the input's dtype, as after `module.to(dtype)`."""
    channels = config.shape[1]
    weight = torch.rand(channels) + 0.5
    bias = torch.randn(channels)
    running_mean = torch.randn(channels) * 0.1
    running_var = torch.rand(channels) + 0.5
    weight, bias, running_mean, running_var = (
        t.to(config.device, config.dtype) for t in (weight, bias, running_mean, running_var)
    )
    return weight.requires_grad_(requires_grad), bias.requires_grad_(requires_grad), running_mean, running_var


def clone_parameters(parameters):
    """Independent copies: each implementation updates its own running stats and gradients."""
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in parameters)


# ---------------------------------------------------------------------------------------------
# Correctness


def run_reference_step(batch_norm, x, grad_output, parameters):
    """One training step, then one eval step (forward and backward); every tensor worth comparing,
    by name."""
    weight, bias, running_mean, running_var = clone_parameters(parameters)
    x = x.detach().clone().requires_grad_()
    output = batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)
    output.backward(grad_output)
    tensors = {
        "train output": output.detach(),
        "grad_input": x.grad,
        "grad_weight": weight.grad,
        "grad_bias": bias.grad,
        "running_mean": running_mean,
        "running_var": running_var,
    }
    for tensor in (x, weight, bias):
        tensor.grad = None
    eval_output = batch_norm(x, running_mean, running_var, weight, bias, False, MOMENTUM, EPS)
    eval_output.backward(grad_output)
    tensors.update({
        "eval output": eval_output.detach(),
        "eval grad_input": x.grad,
        "eval grad_weight": weight.grad,
        "eval grad_bias": bias.grad,
    })
    return tensors


def mismatch(actual, expected, dtype):
    """A description of how `actual` differs from `expected`, or None when they agree.

    atol is scaled by the reference's largest magnitude: grad_weight and grad_bias are sums over
    N*H*W values, so they grow with the batch and their rounding (which depends on summation
    order) grows with them; a fixed atol would flag near-zero entries of a correct sum.
    """
    if actual is None or expected is None:
        return None if actual is expected else "one implementation returned None"
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"shape/dtype {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    rtol, atol = TOLERANCES[dtype]
    actual, expected = actual.float(), expected.float()
    scaled_atol = atol * max(1.0, expected.abs().max().item())
    if torch.allclose(actual, expected, rtol=rtol, atol=scaled_atol):
        return None
    error = (actual - expected).abs().max().item()
    return f"max abs error {error:.3g} (rtol={rtol}, atol={scaled_atol:.3g})"


def max_error(actual, exact):
    return (actual.double() - exact).abs().max().item()


def check_configuration(config):
    """Mismatch descriptions for one configuration; empty when bnext agrees with torch.

    Where the two differ by more than the tolerance (bfloat16 sums over many values, rounded to
    bfloat16), bnext still passes if it is at least as close to float64 math as torch (within 2x).
    """
    x = random_tensor(config)
    grad_output = random_tensor(config)
    parameters = random_parameters(config, requires_grad=True)
    bnext_tensors = run_reference_step(bnext.batch_norm, x, grad_output, parameters)
    torch_tensors = run_reference_step(F.batch_norm, x, grad_output, parameters)
    exact_tensors = None
    problems = []
    for name, expected in torch_tensors.items():
        problem = mismatch(bnext_tensors[name], expected, config.dtype)
        if problem and bnext_tensors[name] is not None and bnext_tensors[name].shape == expected.shape:
            if exact_tensors is None:
                exact_parameters = tuple(t.double().requires_grad_(t.requires_grad) for t in parameters)
                exact_tensors = run_reference_step(F.batch_norm, x.double(), grad_output.double(), exact_parameters)
            exact = exact_tensors[name]
            if max_error(bnext_tensors[name], exact) <= 2 * max_error(expected, exact):
                problem = None
        if problem:
            problems.append(f"{config.describe()}: {name}: {problem}")
    return problems


def check_all(configs):
    """Check every configuration against torch; exit non-zero, listing mismatches, if any disagree."""
    log(f"checking {len(configs)} configurations against torch.nn.functional.batch_norm ...")
    problems = [problem for config in configs for problem in check_configuration(config)]
    if problems:
        print("bnext DISAGREES with torch; not timing:", *problems, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    log(f"all {len(configs)} configurations agree with torch")


# ---------------------------------------------------------------------------------------------
# Timing


class Stopwatch:
    """Seconds taken by one call: wall time on CPU; on CUDA, device time between two events,
    waiting for the second so that repetitions do not overlap."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, start):
        if not self.cuda:
            return time.perf_counter() - start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


# Each timer keeps the tensors its previous call allocated and frees them right before its next
# call, which then allocates that same memory again (glibc hands back the chunk freed last). An
# implementation's outputs thus never land in memory another one just wrote: after streaming
# (non-temporal) stores that memory is out of cache, and whoever allocates it next pays for that
# (measured here before this: torch's eval of a 25 MB layer took 1.74 ms in runs where bnext
# streamed its outputs, 0.99 ms where it did not).


def forward_timer(batch_norm, x, parameters, training, stopwatch):
    """Forward only; nothing requires grad, so no graph is recorded: the kernel and call overhead."""
    weight, bias, running_mean, running_var = parameters
    kept = []

    def run():
        kept.clear()
        start = stopwatch.start()
        output = batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
        elapsed = stopwatch.elapsed(start)
        kept.append(output)
        return elapsed

    return run


def node_inputs(output, grad_output):
    """The arguments of output.grad_fn for the gradient grad_output: one per differentiable output
    of the forward (bnext's node also has the batch statistics', which are None)."""
    return (grad_output,) + (None,) * (len(output.grad_fn._input_metadata) - 1)


def backward_timer(batch_norm, x, grad_output, parameters, include_forward, stopwatch, training=True):
    """Backward (of a training forward, or of an eval one): the layer's autograd node, recorded by a
    forward every repetition, applied to grad_output with grad mode off, as the autograd engine
    applies each node of a backward pass. The forward is timed only if asked.

    `output.backward(grad_output)` would add autograd's entry cost (checking the gradients, setting
    up the graph task), which a training step pays once per backward() call for the whole network,
    not once per layer: measured here at 45-120 us on a one-node graph, more than the kernel of a
    small layer, for bnext and torch alike. The report gives it (autograd_entry_us), measured in
    the same run."""
    weight, bias, running_mean, running_var = parameters
    probe = batch_norm(x.detach().requires_grad_(), running_mean.clone(), running_var.clone(), weight, bias,
                       training, MOMENTUM, EPS)
    gradients = node_inputs(probe, grad_output)
    del probe
    kept = []

    def run():
        kept.clear()
        leaf = x.detach().requires_grad_()
        start = stopwatch.start()
        output = batch_norm(leaf, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
        with torch.no_grad():
            if not include_forward:
                start = stopwatch.start()
            grads = output.grad_fn(*gradients)
            elapsed = stopwatch.elapsed(start)
        kept.extend([leaf, output, grads])
        return elapsed

    return run


def autograd_entry_seconds(device, repetitions=300):
    """Median time of backward() on a graph of one multiply of a one-value tensor: what autograd
    costs per backward() call beyond its nodes' work (backward_timer leaves it out)."""
    stopwatch = Stopwatch(device)
    value = torch.ones(1, device=device)
    gradient = torch.ones(1, device=device)
    samples = []
    for repetition in range(repetitions + 20):
        output = value.detach().requires_grad_().mul(2)
        start = stopwatch.start()
        output.backward(gradient)
        if repetition >= 20:  # warm-up
            samples.append(stopwatch.elapsed(start))
    return statistics.median(samples)


def copy_timer(x, stopwatch):
    destination = torch.empty_like(x)  # same size and layout as x

    def run():
        start = stopwatch.start()
        destination.copy_(x)
        return stopwatch.elapsed(start)

    return run


def make_timers(config, case):
    """name -> function running one repetition and returning its duration in seconds."""
    x = random_tensor(config)
    grad_output = random_tensor(config)
    needs_grad = case in ("train_bwd", "fwd_bwd", "eval_bwd")
    parameters = random_parameters(config, requires_grad=needs_grad)
    stopwatch = Stopwatch(config.device)
    timers = {}
    for name, batch_norm in implementations(config.device).items():
        own = clone_parameters(parameters)
        if case in ("train_fwd", "eval_fwd"):
            timers[name] = forward_timer(batch_norm, x, own, case == "train_fwd", stopwatch)
        else:
            timers[name] = backward_timer(
                batch_norm, x, grad_output, own, case == "fwd_bwd", stopwatch, training=case != "eval_bwd"
            )
    timers["copy"] = copy_timer(x, stopwatch)
    return timers


def run_interleaved(timers, repetitions):
    """Durations per timer; the order rotates every repetition so that drift hits all alike.

    Each timed call comes right after an untimed call of the same timer, so that it starts from
    that implementation's own cache state. Otherwise one implementation's traffic would land on
    the next one's time: after streaming (non-temporal) stores, which leave the output out of
    cache, the following call of another implementation ran up to 1.6x slower here."""
    names = list(timers)
    samples = {name: [] for name in names}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            timers[name]()
            samples[name].append(timers[name]())
    return samples


def time_case(config, case, plan):
    """Seconds of bnext, torch and the copy for one case, and the repetitions used in all.

    Each of plan.rounds rounds allocates its own tensors and takes each timer's median; the
    result is the median over rounds. Where the tensors land in memory moves a timer's median by
    up to 40% on this VM (torch's eval of 8x2048x7x7 channels_last on 1 thread: 0.255 or 0.35 ms
    from one allocation to the next, in one process), which more repetitions of one allocation
    cannot average out."""
    round_medians = []
    total_repeats = 0
    for _ in range(plan.rounds):
        timers = make_timers(config, case)
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection in the middle of a repetition would land on one timer only
        try:
            warmup = run_interleaved(timers, plan.warmup)
            # Two calls per timer per repetition: one untimed, one timed.
            seconds_per_repetition = 2 * sum(statistics.median(samples) for samples in warmup.values())
            repeats = plan.repeats_for(seconds_per_repetition)
            samples = run_interleaved(timers, repeats)
        finally:
            if gc_was_enabled:
                gc.enable()
        round_medians.append({name: statistics.median(values) for name, values in samples.items()})
        total_repeats += repeats
        del timers  # this round's tensors, before the next round allocates its own
    return {name: statistics.median(one[name] for one in round_medians) for name in round_medians[0]}, total_repeats


def make_result(config, case, medians, repeats):
    floor = TRAFFIC[case] / COPY_TRAFFIC * medians["copy"]
    input_bytes = math.prod(config.shape) * config.dtype.itemsize
    return Result(
        shape=config.shape,
        layout=config.layout,
        dtype=config.dtype_name,
        case=case,
        repeats=repeats,
        torch_ms=medians["torch"] * 1e3,
        bnext_ms=medians["bnext"] * 1e3,
        copy_ms=medians["copy"] * 1e3,
        speedup=medians["torch"] / medians["bnext"],
        bnext_floor_multiple=medians["bnext"] / floor,
        torch_floor_multiple=medians["torch"] / floor,
        bnext_gbps=TRAFFIC[case] * input_bytes / medians["bnext"] / 1e9,
        native_ms=medians["native"] * 1e3 if "native" in medians else None,
        native_speedup=medians["native"] / medians["bnext"] if "native" in medians else None,
    )


def benchmark(configs, cases, plan):
    results = []
    total = len(configs) * len(cases)
    for config in configs:
        for case in cases:
            medians, repeats = time_case(config, case, plan)
            result = make_result(config, case, medians, repeats)
            results.append(result)
            log(
                f"[{len(results)}/{total}] {config.describe()} {case}: torch {result.torch_ms:.3f} ms, "
                f"bnext {result.bnext_ms:.3f} ms, speedup {result.speedup:.2f}x ({repeats} reps)"
            )
    return results


# ---------------------------------------------------------------------------------------------
# Reporting


TABLE_HEADER = (
    "speedup = torch ms / bnext ms. floor x = time / floor, floor = T_copy (fwd), 1.5 T_copy "
    "(train_bwd, eval_bwd), 2.5 T_copy (fwd_bwd), where T_copy is the median of y.copy_(x) (moves 2|x|).\n"
    "GB/s = minimal bytes / bnext time, minimal bytes = 2|x| (fwd), 3|x| (train_bwd, eval_bwd), 5|x| (fwd_bwd)."
)
AUTOGRAD_ENTRY_NOTE = (
    "The backward cases apply the layer's autograd node, as a backward pass does; backward() also "
    "costs {:.1f} us per call (this run, a one-node graph), once per training step, not included."
)
COLUMNS = [  # (title, width, format of a Result)
    ("shape", 16, lambda r: format_shape(r.shape)),
    ("layout", 16, lambda r: r.layout),
    ("dtype", 8, lambda r: r.dtype),
    ("case", 9, lambda r: r.case),
    ("torch ms", 9, lambda r: f"{r.torch_ms:.3f}"),
    ("bnext ms", 9, lambda r: f"{r.bnext_ms:.3f}"),
    ("copy ms", 8, lambda r: f"{r.copy_ms:.3f}"),
    ("speedup", 7, lambda r: f"{r.speedup:.2f}"),
    ("bnext floor x", 13, lambda r: f"{r.bnext_floor_multiple:.2f}"),
    ("torch floor x", 13, lambda r: f"{r.torch_floor_multiple:.2f}"),
    ("bnext GB/s", 10, lambda r: f"{r.bnext_gbps:.1f}"),
]
NATIVE_COLUMNS = [  # CUDA only: torch's native kernels
    ("native ms", 9, lambda r: f"{r.native_ms:.3f}"),
    ("vs native", 9, lambda r: f"{r.native_speedup:.2f}"),
]


def columns_for(results):
    return COLUMNS + (NATIVE_COLUMNS if any(r.native_ms is not None for r in results) else [])


def format_row(cells, columns):
    return "  ".join(
        cell.ljust(width) if index < 4 else cell.rjust(width)  # text left, numbers right
        for index, (cell, (_, width, _)) in enumerate(zip(cells, columns))
    )


def geometric_mean(values):
    return math.exp(statistics.fmean(math.log(v) for v in values))


def summarize(results):
    """Geometric-mean and minimum speedup per (dtype, case), in the order first seen."""
    groups = {}
    for result in results:
        groups.setdefault((result.dtype, result.case), []).append(result)
    rows = []
    for (dtype, case), group in groups.items():
        slowest = min(group, key=lambda r: r.speedup)
        rows.append(
            {
                "dtype": dtype,
                "case": case,
                "geomean_speedup": geometric_mean(r.speedup for r in group),
                "min_speedup": slowest.speedup,
                "min_speedup_at": describe_result(slowest),
                "count": len(group),
            }
        )
        if all(r.native_speedup is not None for r in group):
            rows[-1]["geomean_speedup_vs_native"] = geometric_mean(r.native_speedup for r in group)
            rows[-1]["min_speedup_vs_native"] = min(r.native_speedup for r in group)
    return rows


def describe_result(result):
    return f"{format_shape(result.shape)} {result.layout}"


def print_report(results, summary, autograd_entry_us):
    columns = columns_for(results)
    print(TABLE_HEADER)
    print(AUTOGRAD_ENTRY_NOTE.format(autograd_entry_us))
    print(format_row([title for title, _, _ in columns], columns))
    print(format_row(["-" * width for _, width, _ in columns], columns))
    for result in results:
        print(format_row([cell(result) for _, _, cell in columns], columns))
    print()
    for row in summary:
        vs_native = ""
        if "geomean_speedup_vs_native" in row:
            vs_native = (
                f"  vs native: geomean {row['geomean_speedup_vs_native']:.2f}x "
                f"min {row['min_speedup_vs_native']:.2f}x"
            )
        print(
            f"{row['dtype']:8} {row['case']:9}  geomean speedup {row['geomean_speedup']:.2f}x  "
            f"min {row['min_speedup']:.2f}x ({row['min_speedup_at']})  over {row['count']}{vs_native}"
        )
    slowest = min(results, key=lambda r: r.speedup)
    print(f"minimum speedup overall: {slowest.speedup:.2f}x ({describe_result(slowest)} {slowest.dtype} {slowest.case})")


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (what lscpu shows), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        directory = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(args, plan):
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_model(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_busy_before_start": args.cpu_busy_before_start,
        "git_commit": git_commit(),
        "dtypes": args.dtype,
        "cases": args.cases,
        "quick": args.quick,
        "shapes": [list(shape) for shape in shapes_for(args)],
        "malloc_keeps_freed_memory": args.malloc_keeps_freed_memory,
        "huge_pages": args.huge_pages,
        "autograd_entry_us": args.autograd_entry_us,
        "timing": asdict(plan),
        "definitions": TABLE_HEADER,
    }


def write_json(path, args, plan, results, summary):
    document = {"metadata": metadata(args, plan), "results": [asdict(r) for r in results], "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump(document, file, indent=2)
    log(f"wrote {path}")


def write_plot(path, results, title):
    """Two panels per dtype, a bar per case and shape: speedup over torch, and bnext's time as a
    multiple of the copy floor (torch's as dots)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed; skipping the plot {path}")
        return
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    cases = list(dict.fromkeys(r.case for r in results))
    configs = list(dict.fromkeys((r.shape, r.layout) for r in results))
    labels = [f"{format_shape(shape)}\n{layout.replace('channels_last', 'CL')}" for shape, layout in configs]
    width = 0.8 / len(cases)
    figure, axes = plt.subplots(
        2 * len(dtypes), 1, figsize=(max(8, 0.55 * len(configs)), 5.5 * len(dtypes)), squeeze=False
    )
    for d, dtype in enumerate(dtypes):
        speed_axes, floor_axes = axes[2 * d][0], axes[2 * d + 1][0]
        for k, case in enumerate(cases):
            by_config = {(r.shape, r.layout): r for r in results if r.dtype == dtype and r.case == case}
            positions = [i + (k - (len(cases) - 1) / 2) * width for i in range(len(configs))]
            rows = [by_config.get(config) for config in configs]
            speed_axes.bar(positions, [r.speedup if r else 0 for r in rows], width, label=case)
            floor_axes.bar(positions, [r.bnext_floor_multiple if r else 0 for r in rows], width, label=case)
            floor_axes.plot(positions, [r.torch_floor_multiple if r else float("nan") for r in rows], "k.",
                            markersize=3, label="torch" if k == 0 else None)
        speed_axes.axhline(1.0, color="black", linewidth=0.8)  # parity with torch
        speed_axes.set_ylabel("speedup over torch (x)")
        speed_axes.set_title(f"{title}, {dtype}")
        floor_axes.axhline(1.0, color="black", linewidth=0.8)  # the copy floor
        floor_axes.set_ylabel("time / copy floor")
        floor_axes.set_yscale("log")
        for ax in (speed_axes, floor_axes):
            ax.set_xticks(range(len(configs)), labels, fontsize=6, rotation=90)
            ax.legend(fontsize=7, ncol=len(cases) + 1)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    log(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Command line


def log(message):
    print(message, file=sys.stderr, flush=True)


def keep_freed_memory():
    """Stop glibc's malloc from handing freed memory back to the OS, and say whether it worked.

    By default glibc serves large blocks (the outputs and gradients here) with mmap, or trims the
    heap after a free, so a repetition may or may not pay ~1 page fault per 4 KiB of its output,
    depending on the allocator's state: timings of the same call then jump between two levels.
    Keeping freed memory (as a caching allocator or a long training loop would) measures the
    kernels in steady state, and both implementations alike.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        # 32 MiB is the largest threshold glibc accepts; every benchmarked tensor is smaller.
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False


def huge_pages():
    """How tensors' memory gets huge pages: torch's CPU allocator asks for them (madvise) for
    blocks of 2 MB and up only when THP_MEM_ALLOC_ENABLE=1 is set before the first allocation, and
    Linux grants them as /sys/kernel/mm/transparent_hugepage/enabled says. With 4 KB pages, an
    output of a few MB cost every implementation here up to twice a copy into a preallocated
    tensor (benchmarks/CPU_NOTES.md)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            system = next((word[1:-1] for word in setting.read().split() if word.startswith("[")), None)
    except OSError:
        system = None
    return {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "transparent_hugepage": system}


def cpu_busy_fraction(seconds=0.5):
    """Fraction of all CPUs' time spent busy over `seconds`, from /proc/stat; None off Linux."""

    def busy_and_total():
        with open("/proc/stat") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        return sum(ticks) - idle, sum(ticks)

    try:
        busy_before, total_before = busy_and_total()
        time.sleep(seconds)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    return (busy_after - busy_before) / max(total_after - total_before, 1)


def warn_if_busy():
    """Timings taken beside a build or a test run are noise: say so rather than hide it.
    (The load average lags by a minute, so it would also flag a benchmark run just before.)"""
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.2:
        log(f"warning: the CPUs are {busy:.0%} busy before starting; timings may be noisy")
    return busy


def comma_list(choices):
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}")
        return names

    return parse


def shape_list(text):
    """'8x8192,64x8192' -> [(8, 8192), (64, 8192)]: shapes (N, C, *) of rank 2 and up."""
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(size) for size in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a shape: {item!r} (expected sizes joined by x, e.g. 8x64x56x56)")
        if len(shape) < 2 or min(shape) < 1 or math.prod(shape) == shape[1]:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected (N, C, *), every size at least 1, more than one value per channel"
            )
        shapes.append(shape)
    return shapes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bnext.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="representative subset, fewer repetitions (< 1 min)")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda when a GPU is present)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) (default: torch's own default)")
    parser.add_argument("--dtype", type=comma_list(list(DTYPES)), default=["float32"], help="float32,bfloat16")
    parser.add_argument(
        "--cases",
        type=comma_list(list(CASES + OPTIONAL_CASES)),
        default=list(CASES),
        help=f"subset of {','.join(CASES + OPTIONAL_CASES)} (default: {','.join(CASES)})",
    )
    parser.add_argument(
        "--shapes", type=shape_list, help="shapes to time instead of the default set, e.g. 8x8192,64x8192"
    )
    parser.add_argument(
        "--repeat", type=int, help="timed repetitions per case and round (default: adaptive, about 1 s per case in 3 rounds; "
        "0.25 s in one round with --quick)"
    )
    parser.add_argument("--json", metavar="PATH", help="write results and metadata as JSON (e.g. benchmarks/results/)")
    parser.add_argument(
        "--plot", metavar="PATH", help="save a PNG chart of speedup and multiple of the copy floor per case (needs matplotlib)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the data")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc malloc's defaults (freed memory goes back to the OS: page faults in the timings)",
    )
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no CUDA device")
    return args


def plot_title(args):
    if args.device == "cuda":
        return f"bnext vs torch on {torch.cuda.get_device_name()}"
    return f"bnext vs torch, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def shapes_for(args):
    if args.shapes:
        return args.shapes
    if args.device == "cuda":
        return GPU_QUICK_SHAPES if args.quick else GPU_SHAPES
    return QUICK_SHAPES if args.quick else ALL_SHAPES


def timing_plan(args):
    if args.quick:
        return TimingPlan(warmup=2, budget_s=0.25, min_repeats=5, max_repeats=100, fixed_repeats=args.repeat)
    return TimingPlan(warmup=3, budget_s=1.0, min_repeats=9, max_repeats=200, fixed_repeats=args.repeat, rounds=3)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.malloc_keeps_freed_memory = False if args.system_malloc else keep_freed_memory()
    args.huge_pages = huge_pages()
    if not args.system_malloc and not args.malloc_keeps_freed_memory:
        log("warning: could not tune malloc (not glibc?); page faults may add noise to the timings")
    plan = timing_plan(args)
    configs = configurations(shapes_for(args), [DTYPES[name] for name in args.dtype], args.device)
    args.cpu_busy_before_start = warn_if_busy()
    check_all(configs)
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        pages = args.huge_pages
        where = (f"{torch.get_num_threads()} CPU threads (THP_MEM_ALLOC_ENABLE={pages['THP_MEM_ALLOC_ENABLE']}, "
                 f"transparent_hugepage {pages['transparent_hugepage']})")
    log(f"timing {len(configs) * len(args.cases)} cases on {where} ...")
    results = benchmark(configs, args.cases, plan)
    args.autograd_entry_us = autograd_entry_seconds(args.device) * 1e6
    summary = summarize(results)
    print_report(results, summary, args.autograd_entry_us)
    if args.json:
        write_json(args.json, args, plan, results, summary)
    if args.plot:
        write_plot(args.plot, results, plot_title(args))


if __name__ == "__main__":
    main()
