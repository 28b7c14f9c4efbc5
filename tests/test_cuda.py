"""CUDA-only behaviour: cuDNN on and off, CUDA graphs, streams, 64-bit indexing, device errors.

Every test here needs a GPU and is skipped without one. The device-independent behaviour (the
comparisons with nn.BatchNorm, opcheck, gradcheck, torch.compile) runs on CUDA in the other test
files, which are parametrized by device.
"""
import pytest
import torch
import torch.nn.functional as F

import bnext
from helpers import assert_close, make_input, module_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_nn_with_cudnn_on_and_off(layout, dtype, cudnn):
    reference, candidate = module_pair(4, 16, torch.float32, device="cuda")
    with torch.backends.cudnn.flags(enabled=cudnn):
        for step, training in enumerate([True, True, False]):
            reference.train(training)
            candidate.train(training)
            x = make_input((8, 16, 12, 10), dtype, layout, seed=step, device="cuda") * 2 + 1
            x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
            y_ref, y_new = reference(x_ref), candidate(x_new)
            assert_close(y_new, y_ref, dtype, msg=f"step {step} output")
            grad = torch.randn_like(y_ref)
            y_ref.backward(grad)
            y_new.backward(grad)
            assert_close(x_new.grad, x_ref.grad, dtype, scale=2, msg=f"step {step} grad_input")
            assert_close(candidate.weight.grad, reference.weight.grad, dtype, scale=4, msg="weight.grad")
            assert_close(candidate.running_var, reference.running_var, torch.float32, msg="running_var")
            reference.zero_grad()
            candidate.zero_grad()


def test_cuda_graph_replays_a_training_step():
    """Capture forward, backward and the running-stats update (momentum=None included) in a CUDA
    graph: no host synchronization may happen inside, and replays match eager steps."""
    torch.manual_seed(0)
    eager = bnext.BatchNorm2d(8, momentum=None).cuda()
    graphed = bnext.BatchNorm2d(8, momentum=None).cuda()
    graphed.load_state_dict(eager.state_dict())
    static_x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
        for _ in range(2):
            graphed(static_x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graphed.load_state_dict(eager.state_dict())
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = graphed(static_x)
        static_y.square().sum().backward()
    graphed.load_state_dict(eager.state_dict())  # the capture ran no kernels; restart both alike
    for step in range(3):
        x = torch.randn(4, 8, 6, 6, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        static_x.grad.zero_()
        static_x.data.copy_(x)
        graph.replay()
        x_eager = x.clone().requires_grad_()
        y_eager = eager(x_eager)
        y_eager.square().sum().backward()
        torch.testing.assert_close(static_y, y_eager)
        torch.testing.assert_close(static_x.grad, x_eager.grad)
        torch.testing.assert_close(graphed.running_mean, eager.running_mean)
        torch.testing.assert_close(graphed.running_var, eager.running_var)
    assert int(graphed.num_batches_tracked) == int(eager.num_batches_tracked) == 3


def test_runs_on_a_non_default_stream():
    x = make_input((8, 16, 12, 10), torch.float32, "channels_last", device="cuda")
    expected = F.batch_norm(x, None, None, training=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = bnext.batch_norm(x, None, None, training=True)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, expected)


def test_forward_over_2_31_elements_bf16():
    """64-bit indexing: a bfloat16 input of more than 2^31 elements."""
    length = 2**29 + 7
    x = torch.randn(2, 2, length, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    y = bnext.batch_norm(x, None, None, training=True)
    var, mean = torch.var_mean(x.float(), dim=(0, 2), unbiased=False)
    tail = x[:, :, -1000:].float()
    expected = (tail - mean[None, :, None]) * torch.rsqrt(var[None, :, None] + 1e-5)
    torch.testing.assert_close(y[:, :, -1000:].float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("on_cpu", ["weight", "running_mean", "input"])
def test_mixed_devices_raise(on_cpu):
    tensors = {
        "input": torch.randn(4, 3, 5, device="cuda"),
        "weight": torch.ones(3, device="cuda"),
        "running_mean": torch.zeros(3, device="cuda"),
    }
    tensors[on_cpu] = tensors[on_cpu].cpu()
    running_var = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="is on (cpu|cuda:0) but input is on (cuda:0|cpu)"):
        bnext.batch_norm(tensors["input"], tensors["running_mean"], running_var, tensors["weight"], None, True)
