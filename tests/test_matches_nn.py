"""bnext modules against torch.nn.BatchNorm over consecutive steps: outputs, gradients, running stats."""
import copy
import itertools

import pytest
import torch

from helpers import BNEXT_CLASSES, DEVICES, assert_close, make_input, module_pair, requires_bias_keyword

SHAPES = {2: (8, 5), 3: (4, 5, 7), 4: (3, 5, 4, 6), 5: (2, 5, 3, 4, 3)}
# (input dtype, parameter and running-stat dtype): reduced precision also in torch's mixed mode.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]
AFFINE = [
    pytest.param(dict(affine=True), id="affine"),
    pytest.param(dict(affine=False), id="no_affine"),
    pytest.param(dict(affine=True, bias=False), id="no_bias", marks=requires_bias_keyword),
]
MOMENTA = [0.1, None, 1.0]


def _cases():
    for rank, layout in itertools.product(SHAPES, LAYOUTS):
        if rank == 2 and layout == "channels_last":
            continue  # a contiguous (N, C) input already has its channel fastest
        yield rank, layout


def _step(reference, candidate, x, dtype, msg):
    x_ref = x.clone().requires_grad_()
    x_new = x.clone().requires_grad_()
    y_ref = reference(x_ref)
    y_new = candidate(x_new)
    assert y_new.dtype == y_ref.dtype and y_new.shape == y_ref.shape
    if x.dim() == 3 and x.movedim(1, -1).is_contiguous():
        # an (N, C, L) view of an (N, L, C) tensor keeps its layout (torch returns a contiguous copy)
        assert y_new.stride() == x.stride(), f"{msg}: output layout"
    elif x.is_contiguous() or x.movedim(1, -1).is_contiguous():
        assert y_new.stride() == y_ref.stride(), f"{msg}: output layout"
    assert_close(y_new, y_ref, dtype, msg=f"{msg} output")
    grad = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7)).to(x.device, dtype)
    y_ref.backward(grad)
    y_new.backward(grad)
    assert_close(x_new.grad, x_ref.grad, dtype, scale=2, msg=f"{msg} grad_input")
    for name, p_ref in reference.named_parameters():
        p_new = dict(candidate.named_parameters())[name]
        assert p_new.grad.dtype == p_ref.grad.dtype
        assert_close(p_new.grad, p_ref.grad, dtype, scale=4, msg=f"{msg} {name}.grad")
    for name, b_ref in reference.named_buffers():
        b_new = dict(candidate.named_buffers())[name]
        assert b_new.dtype == b_ref.dtype
        if name == "num_batches_tracked":
            assert torch.equal(b_new, b_ref), f"{msg} num_batches_tracked"
        else:
            assert_close(b_new, b_ref, dtype, msg=f"{msg} {name}")
    reference.zero_grad()
    candidate.zero_grad()


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype,param_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rank,layout", list(_cases()))
@pytest.mark.parametrize("device", DEVICES)
def test_steps_match_nn(device, rank, layout, dtype, param_dtype, affine, track_running_stats, momentum):
    reference, candidate = module_pair(
        rank, SHAPES[rank][1], param_dtype, device=device, momentum=momentum,
        track_running_stats=track_running_stats, **affine
    )
    # Three training steps, then eval; then training again after eval.
    for step, training in enumerate([True, True, True, False, True]):
        reference.train(training)
        candidate.train(training)
        x = make_input(SHAPES[rank], dtype, layout, seed=step, device=device) * (1 + step) + step
        _step(reference, candidate, x, dtype, msg=f"step {step} ({'train' if training else 'eval'})")


def _run_step(module, x, grad):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    results = {"output": y, "grad_input": x.grad}
    results.update({f"{n}.grad": p.grad.clone() for n, p in module.named_parameters()})
    results.update(dict(module.named_buffers()))
    module.zero_grad()
    return {name: t.detach().clone() for name, t in results.items()}


LARGE_SHAPES = {
    "long_planes": (2, 3, 100, 100),
    "many_rows": (64, 3, 40, 40),
    "long_runs": (3, 2, 9000),
    "wide_rows": (40, 1100, 3),
    # few rows of many channels: per-channel work in blocks, across several channel blocks
    "wide_few_rows": (6, 5000),
    # fewer than 128 rows, whose tasks normalize (and back-propagate) their own channels, streamed
    "wide_few_rows_streamed": (64, 8192),
    # rows wider than one block of coefficients (2048 channels), walked block by block
    "wide_rows_blocked": (130, 4100),
    # outputs of 1.5 MB and more are streamed: whole when their runs fill whole lines
    # (aligned), all but each plane's head and tail for long unaligned planes (1023 values), not at
    # all for short unaligned ones walked channel by channel (7x7 below, without AVX-512); with
    # AVX-512, eval walks planes under 256 values in memory order and streams them whole, and so
    # do the training forward and backward with planes under 64 values, after every channel's sums.
    "streamed_aligned": (16, 64, 32, 33),
    "streamed_unaligned": (8, 130, 31, 33),
    "unstreamed_short_planes": (24, 1000, 7, 7),
    # 7x7 planes, each a short stretch of its channel's sums: float lane totals lost accuracy here.
    "short_planes": (12, 1000, 7, 7),
    # planes shorter than a vector: reduced as N rows of C * inner columns, in one part or in
    # several, then normalized (and back-propagated) in memory order, streamed from 1.5 MB on
    "tiny_planes": (64, 256, 2, 2),
    "tiny_planes_several_parts": (3000, 7, 3),
    "tiny_planes_streamed": (1024, 64, 3, 3),
    # channels_last rows narrower than 64 values or not whole vectors: read as wider rows of
    # several rows each (96 values for 6 channels), the last rows left over (5365 rows, 16 per wide
    # row), or 400 values for 100 channels; streamed from 1.5 MB on
    "narrow_rows_leftover": (5, 6, 37, 29),
    "narrow_rows_odd_channels": (40, 100, 3, 3),
    "narrow_rows_streamed": (16, 3, 128, 128),
    # planar, fewer than 4 channels: each channel summed in runs of images, merged; the runs are
    # tasks of their own where the channels do not spread evenly over the threads
    "split_three_channels": (10, 3, 60, 70),
    "split_two_channels": (3, 2, 16, 96, 96),
    # few channels of 7x7 planes: summed in runs of images, then (AVX-512) the elementwise passes
    # in memory order
    "split_short_planes": (40, 3, 7, 7),
    # planes under 64 values in a batch of at least as many images: read as Columns on builds
    # without AVX-512, with a tail of columns past whole vectors (41 x 49), or wide rows of two
    # images and one left over (24 x 9 values; 33 images)
    "short_planes_large_batch": (64, 41, 7, 7),
    "short_planes_leftover_image": (33, 24, 3, 3),
    # input and output gradient of over 16 MB together: float32 channels_last backward sums walk the
    # rows in memory order on builds without AVX-512 (on AMD CPUs from half the L3 on, elsewhere past
    # the L2s)
    "rows_past_the_caches": (4, 256, 48, 48),
}


def _assert_as_accurate_as_nn(device, shape, layout, dtype):
    """Three steps (train, train, eval): every result of bnext is at least as close to float64
    math as nn.BatchNorm's result (within a factor 2), on the same dtype-rounded input."""
    reference, candidate = module_pair(len(shape), shape[1], torch.float32, device=device)
    exact = copy.deepcopy(reference).double()
    for step, training in enumerate([True, True, False]):
        for module in (reference, candidate, exact):
            module.train(training)
        x = (make_input(shape, torch.float32, layout, seed=step, device=device) * 3 + 1).to(dtype)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(step)).to(device, dtype)
        torch_result = _run_step(reference, x, grad)
        bnext_result = _run_step(candidate, x, grad)
        exact_result = _run_step(exact, x.double(), grad.double())
        for name, expected in exact_result.items():
            if name == "num_batches_tracked":
                assert torch.equal(bnext_result[name], expected)
                continue
            bnext_error = (bnext_result[name].double() - expected).abs().max().item()
            torch_error = (torch_result[name].double() - expected).abs().max().item()
            # Neither can beat the rounding of its own results and running stats: up to about one
            # unit in the last place of the largest value. Where torch's error happens to fall
            # under that (an eval weight gradient of 5e4 on CUDA: torch 0.0018, one float32 ulp
            # 0.0039), twice torch's error alone would ask bnext for less than rounding allows.
            rounding = torch.finfo(bnext_result[name].dtype).eps * expected.abs().max().item()
            assert bnext_error <= 2 * torch_error + max(rounding, 1e-6), (
                f"step {step} {name}: {bnext_error} vs torch {torch_error} (rounding {rounding})"
            )


@pytest.mark.parametrize(
    "shape,layout",
    [(shape, layout) for shape in LARGE_SHAPES.values() for layout in ("contiguous", "channels_last")]
    + [((70000, 3), "contiguous")],  # a contiguous (N, C) input already has its channel fastest
    ids=[f"{name}-{layout}" for name in LARGE_SHAPES for layout in ("contiguous", "channels_last")] + ["tall_2d"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_large_inputs_as_accurate_as_nn(device, shape, layout):
    """Shapes that span several chunks, blocks and parts of the kernels' reductions."""
    _assert_as_accurate_as_nn(device, shape, layout, torch.float32)


@pytest.mark.parametrize("name", ["streamed_aligned", "streamed_unaligned", "split_three_channels"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_large_reduced_precision_inputs_as_accurate_as_nn(device, dtype, layout, name):
    """bfloat16 and float16 outputs of 1.5 MB and more are streamed too (with float32 parameters),
    and few channels are summed in runs of images as in float32."""
    _assert_as_accurate_as_nn(device, LARGE_SHAPES[name], layout, dtype)


@requires_bias_keyword
def test_modules_are_nn_subclasses_with_nn_constructor():
    for rank, cls in BNEXT_CLASSES.items():
        module = cls(4, eps=1e-3, momentum=None, affine=True, track_running_stats=True, bias=False)
        assert isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        assert module.bias is None and module.weight is not None and module.momentum is None
        assert module.eps == 1e-3


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_matches_nn(device, rank):
    shape = (0, 4) + (3,) * (rank - 2)
    reference, candidate = module_pair(rank, 4, torch.float32, device=device)
    x = torch.randn(shape, device=device)
    _step(reference, candidate, x, torch.float32, msg="train N=0")
    reference.eval()
    candidate.eval()
    _step(reference, candidate, x, torch.float32, msg="eval N=0")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plane", [(5, 5), (2, 2)], ids=["5x5", "2x2"])
def test_nan_stays_in_its_channel(device, layout, plane):
    x = make_input((4, 3, *plane), torch.float32, layout, device=device)
    x[1, 1, 1, 1] = float("nan")
    reference, candidate = module_pair(4, 3, torch.float32, device=device)
    y = candidate(x)
    assert torch.isnan(y[:, 1]).all()
    assert not torch.isnan(y[:, [0, 2]]).any()
    torch.testing.assert_close(y[:, [0, 2]], reference(x)[:, [0, 2]])


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_inference_mode_match_nn(device, layout, context):
    """Calls that need no gradient take the short path to the kernels: same results, no graph."""
    reference, candidate = module_pair(4, 5, torch.float32, device=device)
    for step, training in enumerate([True, True, False]):
        reference.train(training)
        candidate.train(training)
        x = make_input((3, 5, 4, 6), torch.float32, layout, seed=step, device=device).requires_grad_()
        with context():
            y_ref = reference(x)
            y_new = candidate(x)
        assert y_new.grad_fn is None and not y_new.requires_grad
        assert_close(y_new, y_ref, torch.float32, msg=f"step {step}")
        for (name, b_ref), (_, b_new) in zip(reference.named_buffers(), candidate.named_buffers()):
            assert_close(b_new.float(), b_ref.float(), torch.float32, msg=name)
