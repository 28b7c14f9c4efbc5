"""Numerical stability against float64 references, and results independent of the thread count."""
import pytest
import torch
import torch.nn.functional as F

import bnext
from helpers import DEVICES, assert_close, make_input, torch_threads

LAYOUTS = ["contiguous", "channels_last"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_constant_channel_normalizes_to_zero(device, layout, training):
    x = make_input((4, 3, 5, 5), torch.float32, layout, device=device)
    x[:, 0] = 1e4
    running_mean = torch.full((3,), 1e4, device=device)
    running_var = (torch.zeros(3) if not training else torch.ones(3)).to(device)
    y = bnext.batch_norm(x, running_mean, running_var, training=training)
    assert torch.equal(y[:, 0], torch.zeros_like(y[:, 0]))
    if training:
        assert running_mean[0].item() == 1e4
        assert running_var[0].item() == pytest.approx(0.9, abs=1e-7)  # 0.9 * 1 + 0.1 * 0


@pytest.mark.parametrize("layout", LAYOUTS + ["rank2"])
@pytest.mark.parametrize("device", DEVICES)
def test_huge_constant_channel_in_float64_normalizes_to_zero(device, layout):
    """Merging with an empty partial must not compute inf * 0 when the mean's square overflows."""
    shape = (512, 3) if layout == "rank2" else (40, 3, 9, 9)
    x = make_input(shape, torch.float64, "contiguous" if layout == "rank2" else layout, device=device)
    x[:, 1] = 1e200
    y = bnext.batch_norm(x, None, None, training=True)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    torch.testing.assert_close(y[:, [0, 2]], F.batch_norm(x, None, None, training=True)[:, [0, 2]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((4, 3, 5, 7), "contiguous"),
        ((4, 3, 5, 7), "channels_last"),
        # outputs of 1.5 MB and more are streamed: whole lines, and each plane's head and tail
        ((16, 64, 32, 33), "contiguous"),
        ((16, 64, 32, 32), "channels_last"),
        ((8, 130, 31, 33), "contiguous"),
        ((24, 1000, 7, 7), "contiguous"),
        # past 8 MB, streamed on CPUs whose L3 takes smaller outputs; 24 channels: read as wider
        # rows of 96 values (4 pixels, Columns)
        ((48, 24, 64, 64), "channels_last"),
        ((48, 24, 61, 59), "contiguous"),
        # 48 channels, rows of 96 bytes: a pair of vectors (32 values converted together on
        # AVX-512), then a vector; every other row's pair starts half a line past a line boundary
        ((48, 48, 64, 64), "channels_last"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_reduced_precision_output_rounds_as_torch(device, shape, layout, dtype):
    """A bfloat16/float16 eval output is bnext's float32 result on the same values, converted by
    torch: rounded to nearest even, denormals kept, overflow to infinity, NaN kept."""
    finfo = torch.finfo(dtype)
    x = make_input(shape, dtype, layout, device=device)
    x[1, 2].view(-1)[3] = float("nan")
    channels = shape[1]
    weight = torch.rand(channels) + 0.5
    weight[0] = finfo.tiny  # outputs in dtype's denormal range
    weight[1] = finfo.max / 2  # outputs beyond dtype's largest value
    bias = torch.randn(channels)
    bias[0] = 0.0
    running_mean, running_var = torch.randn(channels) * 0.1, torch.rand(channels) + 0.5
    params = [t.to(device) for t in (running_mean, running_var, weight, bias)]
    with torch_threads(1):  # the larger shapes' outputs are then streamed
        y = bnext.batch_norm(x, *params, training=False)
    expected = bnext.batch_norm(x.float(), *params, training=False).to(dtype)
    assert y.dtype == dtype
    assert (y[:, 0] != 0).any() and (y[:, 0].abs() < finfo.tiny).any() and y[:, 1].isinf().any()
    assert torch.equal(y.isnan(), expected.isnan()) and y.isnan().sum() == 1
    # bits (signed zeros too) wherever not NaN: torch's own scalar and vector conversions give
    # different NaN bits
    nan = y.isnan()
    assert torch.equal(y.view(torch.int16).masked_fill(nan, 0), expected.view(torch.int16).masked_fill(nan, 0))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 4, 2048), (544, 4, 31)])  # walked plane by plane; in memory order
def test_every_bfloat16_value_rounds_as_torch_on_cpu(shape, layout):
    """All 65536 bfloat16 bit patterns (and some again, to fill the shape) through a CPU eval: the
    output is torch's conversion of bnext's float32 result, ties to even included. Channels 0 and 1
    scale by 1.5 and 1.25 exactly, which puts thousands of results on ties."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = values.repeat(2)[: torch.Size(shape).numel()].reshape(shape)
    if layout == "channels_last":  # the same values, channel fastest in memory
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    running_mean = torch.tensor([0.0, 0.0, 0.3, -1.7])
    running_var = torch.tensor([1.0, 1.0, 0.7, 2.5])
    weight = torch.tensor([1.5, 1.25, 1.3, -0.6])
    bias = torch.tensor([0.0, 0.0, 0.25, 3.0])
    params = (running_mean, running_var, weight, bias)
    y = bnext.batch_norm(x, *params, training=False, eps=0.0)
    exact = bnext.batch_norm(x.float(), *params, training=False, eps=0.0)
    expected = exact.to(torch.bfloat16)
    finite = exact[:, :2].isfinite()
    ties = exact[:, :2][finite].view(torch.int32) & 0xFFFF == 0x8000
    kept_odd = exact[:, :2][finite].view(torch.int32) & 0x10000 != 0
    assert (ties & kept_odd).sum() > 1000 and (ties & ~kept_odd).sum() > 1000
    nan = y.isnan()
    assert torch.equal(nan, expected.isnan())
    assert torch.equal(y.view(torch.int16).masked_fill(nan, 0), expected.view(torch.int16).masked_fill(nan, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((4, 3, 5, 7), "contiguous"),
        ((4, 3, 5, 7), "channels_last"),
        ((16, 64, 32, 33), "contiguous"),  # streamed outputs
        ((16, 64, 32, 32), "channels_last"),
        ((24, 1000, 7, 7), "contiguous"),
        ((32, 24, 32, 40), "channels_last"),  # 24 channels: read as wider rows of 96 values (Columns)
        # rows of whole vectors: bfloat16 pairs take their per-channel coefficients in lane order
        # (AVX2), by blocks of channels that each task of the statistics finishes and normalizes
        # itself (64 rows: one part), by rows after several parts (300 rows), and in eval by
        # blocks of 2048 channels (16 rows)
        ((64, 1040), "contiguous"),
        ((300, 272), "contiguous"),
        ((16, 4112), "contiguous"),
        ((6, 48, 9, 10), "channels_last"),
        # 48 channels, outputs streamed: every other row's pair (AVX-512) starts half a line past
        # a line boundary
        ((16, 48, 40, 40), "channels_last"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_reduced_precision_is_float32_rounded_on_cpu(shape, layout, dtype, training):
    """On CPU, bfloat16/float16 input computes in float32 from the same values as float32 input
    would, with the same float64 sums: its output and input gradient (training and eval) are the
    float32 results rounded by torch, bit for bit, and its weight and bias gradients equal them."""
    x = make_input(shape, dtype, layout) * 2 + 1
    grad = make_input(shape, dtype, layout, seed=1)
    channels = shape[1]
    weight = torch.rand(channels) + 0.5
    bias = torch.randn(channels)
    running_mean, running_var = torch.randn(channels), torch.rand(channels) + 0.5
    results = []
    for x_in, grad_in in ((x, grad), (x.float(), grad.float())):
        x_in = x_in.clone().requires_grad_()
        w_in, b_in = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        stats = (None, None) if training else (running_mean, running_var)
        y = bnext.batch_norm(x_in, *stats, w_in, b_in, training=training)
        y.backward(grad_in)
        results.append((y.detach(), x_in.grad, w_in.grad, b_in.grad))
    (y, grad_x, grad_w, grad_b), (y32, grad_x32, grad_w32, grad_b32) = results
    for got, exact in ((y, y32), (grad_x, grad_x32)):
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.int16), exact.to(dtype).view(torch.int16))
    assert torch.equal(grad_w, grad_w32) and torch.equal(grad_b, grad_b32)


@pytest.mark.parametrize("layout", LAYOUTS + ["rank2", "rank3"])
@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_is_at_least_as_accurate_as_torch(device, layout):
    """Data with mean 1e5 and std 1 in float32, against float64 math on the same float32 values.

    Gradients of both are bound by the float32 saved mean (the op's contract), hence the 5% margin."""
    shapes = {"rank2": (512, 4), "rank3": (8, 4, 300)}
    shape = shapes.get(layout, (8, 4, 16, 16))
    x = (make_input(shape, torch.float64, layout if layout in LAYOUTS else "contiguous", device=device) + 1e5).float()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    exact_mean = x.double().mean([0, *range(2, x.dim())])
    results = {}
    for name, fn in [("torch", F.batch_norm), ("bnext", bnext.batch_norm), ("exact", F.batch_norm)]:
        dtype = torch.float64 if name == "exact" else torch.float32
        x_in = x.to(dtype).clone().requires_grad_()
        weight = torch.full((4,), 1.5, dtype=dtype, device=device, requires_grad=True)
        running_mean = torch.zeros(4, dtype=dtype, device=device)
        running_var = torch.ones(4, dtype=dtype, device=device)
        y = fn(x_in, running_mean, running_var, weight, None, True, 1.0, 1e-5)
        y.backward(grad.to(dtype))
        results[name] = [t.detach().double() for t in (y, x_in.grad, weight.grad, running_mean, running_var)]
    torch.testing.assert_close(results["exact"][3], exact_mean)
    for i, quantity in enumerate(["output", "grad_input", "grad_weight", "running_mean", "running_var"]):
        bnext_error = (results["bnext"][i] - results["exact"][i]).abs().max().item()
        torch_error = (results["torch"][i] - results["exact"][i]).abs().max().item()
        assert bnext_error <= 1.05 * torch_error + 1e-6 * results["exact"][i].abs().max().item(), (
            f"{quantity}: bnext error {bnext_error:.3e}, torch error {torch_error:.3e}"
        )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stds", [0.0, 0.9, 1.1, 12.0, 1000.0])
@pytest.mark.parametrize(
    "shape,layout",
    [((8, 16, 12, 12), "contiguous"), ((8, 16, 12, 12), "channels_last"), ((512, 48), "contiguous")],
)
@pytest.mark.parametrize("device", DEVICES)
def test_output_within_a_unit_of_float64_wherever_the_mean_lies(device, shape, layout, stds, training):
    """Every channel's mean `stds` standard deviations from zero (the batch's in training, the
    running one in eval): the float32 output stays within one unit in the last place of its largest
    value of float64 math on the same inputs. CPU passes fold the mean into the shift only within one
    standard deviation of zero; folded at 12 or 1000, as torch folds, the error is 1-3000 units."""
    dims = [0, *range(2, len(shape))]
    x = make_input(shape, torch.float64, layout)
    spread = x.std(dims, correction=0, keepdim=True)
    x = (x - x.mean(dims, keepdim=True) + stds * spread).float()
    channels = shape[1]
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)
    stats = (None, None) if training else (x.double().mean(dims).float(), x.double().var(dims, correction=0).float())
    y = bnext.batch_norm(x.to(device), *[None if t is None else t.to(device) for t in stats], weight.to(device),
                         bias.to(device), training=training)
    exact = F.batch_norm(x.double(), *[None if t is None else t.double() for t in stats], weight.double(),
                         bias.double(), training=training)
    error = (y.cpu().double() - exact).abs().max().item()
    unit = torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert error <= unit, f"error {error / unit:.2f} units of the largest output"


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((64, 4, 32, 32), "contiguous"),  # planar
        ((64, 4, 32, 32), "channels_last"),  # rows, several parts
        ((100, 300), "contiguous"),  # rows, one part (fewer than 128 rows)
        ((8, 4, 300), "contiguous"),  # planar, rank 3
        ((256, 8, 2, 2), "contiguous"),  # planes shorter than a vector: rows of columns, one part
        ((3000, 4, 3), "contiguous"),  # the same in several parts
        ((20000, 3), "contiguous"),  # rows of 3 channels, read as wide rows of 96 values
        ((64, 3, 32, 32), "contiguous"),  # planar, 3 channels: each channel's images in runs
    ],
)
@pytest.mark.parametrize("outlier", [1e2, 1e4])
def test_statistics_stay_exact_when_the_first_values_are_outliers(shape, layout, outlier):
    """CPU sums are shifted by the mean of each channel's first values; where those lie far from
    the channel's mean, the sums are redone around it. Against float64 math on the same float32
    values, the output stays within 1e-6 of its largest value (2e-7 here; without the redo, an
    outlier of 1e4 left NCHW output 5e-5 off) and the running statistics within float32 rounding."""
    x = make_input(shape, torch.float64, layout) + 5
    first_values = x.movedim(1, -1).reshape(-1, shape[1]) if layout == "channels_last" or len(shape) == 2 else None
    if first_values is not None:  # a view on x: its first rows are x's first values in memory
        first_values[:4] += outlier
    else:
        x.view(shape[0], shape[1], -1)[0, :, :4] += outlier
    x = x.float()
    exact_mean, exact_var = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    exact = F.batch_norm(x.double(), exact_mean, exact_var, training=True, momentum=1.0)
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    y = bnext.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    scale = exact.abs().max().item()
    assert (y.double() - exact).abs().max().item() <= 1e-6 * scale
    torch.testing.assert_close(running_mean.double(), exact_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(running_var.double(), exact_var, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((4, 3, 70, 70), "contiguous"),
        ((16, 8, 30, 30), "channels_last"),
        ((70000, 5), "contiguous"),
        ((6, 5000), "contiguous"),
        ((64, 8192), "contiguous"),
        ((3, 2, 9000), "contiguous"),
        ((4, 6, 5, 20, 20), "channels_last"),
        ((300, 6, 3, 3), "contiguous"),
        ((3000, 5, 3), "contiguous"),
        ((50001, 6), "contiguous"),
        ((20, 3, 40, 50), "channels_last"),
        ((6, 2, 50, 60), "contiguous"),  # planar runs as tasks of their own on 3 threads only
        ((3, 3, 16, 64, 64), "contiguous"),
        ((64, 41, 7, 7), "contiguous"),  # short planes of a large batch, read as Columns on AVX2
        ((2048, 2100), "contiguous"),  # over 16 MB with its gradient: float32 backward sums in memory order
        ((8, 1024, 14, 14), "contiguous"),  # 19 MB of float32 dy, x and dx: input gradient in blocks of channels
    ],
)
def test_results_do_not_depend_on_thread_count(shape, layout, dtype):
    x = make_input(shape, dtype, layout) * 2 + 3
    grad = make_input(shape, dtype, layout, seed=1)
    weight = torch.rand(shape[1]) + 0.5
    outputs = []
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x_in = x.clone().requires_grad_()
            w_in = weight.clone().requires_grad_()
            running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
            y = bnext.batch_norm(x_in, running_mean, running_var, w_in, None, True)
            y.backward(grad)
            y_eval = bnext.batch_norm(x, running_mean, running_var, w_in, None, False)
            outputs.append([y, x_in.grad, w_in.grad, running_mean, running_var, y_eval])
    finally:
        torch.set_num_threads(threads_before)
    for other in outputs[1:]:
        for got, expected in zip(other, outputs[0]):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("training", [True, False])
def test_backward_of_short_planes_beyond_the_caches_matches_float64(training):
    """Planes under 256 values whose backward touches more than the caches near the threads hold
    (dy, x and dx of 8x1024x14x14 float32: 19 MB, over half of a 32 MB L3) take their input
    gradient in blocks of channels, in memory order, after the block's sums."""
    shape = (8, 1024, 14, 14)
    x = make_input(shape, torch.float32, "contiguous") * 2 + 3
    grad = make_input(shape, torch.float32, "contiguous", seed=1)
    weight, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    running_mean, running_var = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    bnext.batch_norm(inputs[0], running_mean.clone(), running_var.clone(), inputs[1], inputs[2], training).backward(grad)
    exact = [t.double().requires_grad_() for t in (x, weight, bias)]
    F.batch_norm(exact[0], running_mean.double(), running_var.double(), exact[1], exact[2], training).backward(
        grad.double()
    )
    for got, expected in zip(inputs, exact):
        assert_close(got.grad, expected.grad.float(), torch.float32)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch.")
)
@pytest.mark.parametrize(
    "plane", [(1, 2), (3, 3), (4, 4), (4, 5), (7, 7), (8, 8), (14, 14), (15, 17)], ids=lambda p: f"{p[0]}x{p[1]}"
)
@pytest.mark.parametrize("streamed", [False, True], ids=["small", "streamed"])
def test_eval_of_short_planes_keeps_each_channel_apart(streamed, plane, dtype):
    """CPU eval walks contiguous input with planes under 256 values in memory order, each lane of
    a vector taking its coefficients from its own plane's channel (vectors straddle two planes,
    or many); outputs of 1.5 MB and more are streamed whole (on one thread, here). Each channel's output is, bit for bit, the
    output of that channel alone, and all of it matches torch within the dtype's tolerance."""
    channels = 37
    values = (2 << 20) // dtype.itemsize if streamed else 20000  # 2 MB, or 20000 values
    batch = -(-values // (channels * plane[0] * plane[1]))
    x = make_input((batch, channels, *plane), dtype, "contiguous") * 2 + 1
    mean, var = torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    params = [t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in (mean, var, weight, bias)]
    with torch_threads(1 if streamed else torch.get_num_threads()):
        y = bnext.batch_norm(x, *params, training=False)
    for c in range(channels):
        alone = bnext.batch_norm(x[:, c : c + 1].contiguous(), *[t[c : c + 1] for t in params], training=False)
        assert torch.equal(_bits(y[:, c : c + 1]), _bits(alone)), f"channel {c}"
    expected = F.batch_norm(x.double(), mean, var, weight, bias, training=False)
    assert_close(y, expected.to(dtype), dtype)


def test_one_openmp_runtime_in_the_process():
    """bnext's parallel loops run on torch's own OpenMP runtime, not a second one."""
    import re

    with open("/proc/self/maps") as maps:
        runtimes = set(re.findall(r"/\S*lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*", maps.read()))
    assert len(runtimes) == 1, runtimes
