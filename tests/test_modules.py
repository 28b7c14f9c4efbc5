"""bnext.convert, state_dict round trips, torch.compile and training equivalence with nn models."""
import copy

import pytest
import torch
import torch.nn as nn

import bnext
from helpers import DEVICES, NN_HAS_BIAS_KEYWORD


def small_cnn(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=None, **({"bias": False} if NN_HAS_BIAS_KEYWORD else {})),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def batch(step, device="cpu"):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 3, 6, 6, generator=gen).to(device), torch.randint(0, 4, (6,), generator=gen).to(device)


def test_convert_replaces_every_batch_norm_and_keeps_state():
    model = nn.Sequential(small_cnn(), nn.Sequential(nn.BatchNorm3d(2)), nn.BatchNorm1d(5, affine=False)).double()
    model.eval()
    before = {name: t for name, t in model.state_dict().items()}
    weight = model[0][1].weight
    converted = bnext.convert(model)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(bnext.BatchNorm2d) == 2 and kinds.count(bnext.BatchNorm1d) == 2
    assert kinds.count(bnext.BatchNorm3d) == 1
    assert not any(t in kinds for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    assert converted[0][1].weight is weight  # parameters are shared: optimizers keep working
    assert all(not m.training for m in converted.modules())
    after = converted.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert after[name] is before[name] or torch.equal(after[name], before[name])
        assert after[name].dtype == before[name].dtype


def test_convert_of_a_single_module_returns_its_twin():
    module = nn.BatchNorm2d(3, momentum=None, eps=1e-3).train()
    twin = bnext.convert(module)
    assert type(twin) is bnext.BatchNorm2d and twin.training and twin.momentum is None and twin.eps == 1e-3
    assert twin.weight is module.weight and twin.running_mean is module.running_mean


@pytest.mark.parametrize("direction", ["nn_to_bnext", "bnext_to_nn"])
def test_state_dict_round_trip(direction):
    source_cls, target_cls = (nn.BatchNorm2d, bnext.BatchNorm2d)
    if direction == "bnext_to_nn":
        source_cls, target_cls = target_cls, source_cls
    source = source_cls(5)
    source(torch.randn(4, 5, 3, 3) * 2 + 1)  # running stats and num_batches_tracked away from defaults
    target = target_cls(5)
    target.load_state_dict(source.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("device", DEVICES)
def test_converted_model_trains_like_the_original(device, momentum):
    """Ten SGD steps: same losses, parameters and buffers as the nn.BatchNorm model."""
    original = small_cnn(momentum).to(device)
    converted = bnext.convert(copy.deepcopy(original))
    losses = {}
    for name, model in [("nn", original), ("bnext", converted)]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses[name] = []
        for step in range(10):
            x, target = batch(step, device)
            loss = nn.functional.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["bnext"], losses["nn"], rtol=1e-4, atol=1e-5)
    for (name, expected), (_, got) in zip(original.state_dict().items(), converted.state_dict().items()):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
    original.eval()
    converted.eval()
    x, _ = batch(99, device)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fullgraph_matches_eager(device):
    """torch.compile(fullgraph=True) traces bnext layers, momentum=None included (nn.BatchNorm's
    cumulative average reads num_batches_tracked on the host and cannot)."""
    eager = bnext.convert(small_cnn(momentum=None).to(device))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(3):
        x, _ = batch(step, device)
        x_eager = x.clone().requires_grad_()
        x_compiled = x.clone().requires_grad_()
        y_eager = eager(x_eager)
        y_compiled = compiled(x_compiled)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-4, atol=1e-5)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-5)
        for (name, p_eager), (_, p_compiled) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, b_eager), (_, b_compiled) in zip(eager.named_buffers(), compiled_model.named_buffers()):
            torch.testing.assert_close(b_compiled, b_eager, rtol=1e-5, atol=1e-6, msg=name)
    assert int(compiled_model[4].num_batches_tracked) == 3
    eager.eval()
    compiled_model.eval()
    x, _ = batch(50, device)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
