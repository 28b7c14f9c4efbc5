"""The behaviour the seed notebooks (../shared/seeds/) show, with the numbers they printed."""
import pytest
import torch

import bnext


def test_notebook_000_batchnorm2d_printed_output():
    x = torch.arange(1.0, 97.0).reshape(2, 3, 4, 4)
    bn = bnext.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.7, 0.4, 0.95]))
        bn.bias.copy_(torch.tensor([0.2, 0.37, 0.67]))
    y = bn(x)
    printed = {
        (0, 0, 0): [-7.0226e-01, -6.7361e-01, -6.4497e-01, -6.1633e-01],
        (0, 0, 3): [-3.5854e-01, -3.2990e-01, -3.0125e-01, -2.7261e-01],
        (0, 1, 2): [-1.4636e-02, 1.7316e-03, 1.8099e-02, 3.4467e-02],
        (0, 2, 0): [-5.5449e-01, -5.1562e-01, -4.7675e-01, -4.3787e-01],
        (1, 0, 0): [6.7261e-01, 7.0125e-01, 7.2990e-01, 7.5854e-01],
        (1, 0, 2): [9.0176e-01, 9.3040e-01, 9.5904e-01, 9.8769e-01],
    }
    for (n, c, h), row in printed.items():
        torch.testing.assert_close(y[n, c, h], torch.tensor(row), rtol=0, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, 0.1 * torch.tensor([32.5, 48.5, 64.5]))
    # running_var takes the unbiased variance: 597.25 * 32 / 31
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * torch.full((3,), 597.25 * 32 / 31))


def test_notebook_001_momentum_none_without_running_stats():
    x = torch.randn(2, 3, 4, 4)
    bn = bnext.BatchNorm2d(3, momentum=None, affine=True, track_running_stats=False)
    mean = torch.mean(x, dim=(0, 2, 3), keepdim=True)
    sd = torch.sqrt(torch.var(x, dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(bn(x), (x - mean) / sd)
    bn.eval()  # no running stats: batch statistics in eval too
    torch.testing.assert_close(bn(x), (x - mean) / sd)
    assert bn.running_mean is None and bn.num_batches_tracked is None


def test_notebook_002_momentum_one_and_parameter_gradients():
    x = torch.randn(1, 2, 3, 3)
    bn = bnext.BatchNorm2d(2, momentum=1)
    y = bn(x)
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, x.var(dim=(0, 2, 3)))  # unbiased
    y.sum().backward()
    torch.testing.assert_close(bn.bias.grad, torch.tensor([9.0, 9.0]))  # elements per channel
    torch.testing.assert_close(bn.weight.grad, torch.zeros(2), rtol=0, atol=1e-5)


def test_notebook_003_batchnorm1d_2d_input():
    x = torch.arange(12.0).reshape(3, 4)
    bn = bnext.BatchNorm1d(4, momentum=1)
    torch.testing.assert_close(bn.running_mean, torch.zeros(4))
    torch.testing.assert_close(bn.running_var, torch.ones(4))
    y = bn(x)
    expected_rows = torch.tensor([-1.2247, 0.0, 1.2247]).unsqueeze(1).expand(3, 4)
    torch.testing.assert_close(y, expected_rows, rtol=0, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, torch.tensor([4.0, 5.0, 6.0, 7.0]))
    torch.testing.assert_close(bn.running_var, torch.full((4,), 16.0))


def test_notebook_003_batchnorm1d_3d_input_and_eval():
    x = torch.arange(60.0).reshape(3, 4, 5)
    # The notebook used eps=0.0, which torch 2.13 (and bnext) reject in training.
    with pytest.raises(ValueError, match="eps must be positive"):
        bnext.BatchNorm1d(4, eps=0.0, momentum=1.0)(x)
    bn = bnext.BatchNorm1d(4, eps=1e-12, momentum=1.0)
    y = bn(x)
    for c in range(4):
        torch.testing.assert_close(y[0, c], torch.tensor([-1.3422, -1.2812, -1.2202, -1.1592, -1.0982]), rtol=0, atol=1e-4)
        torch.testing.assert_close(y[1, c], torch.tensor([-0.12202, -0.061009, 0.0, 0.061009, 0.12202]), rtol=0, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, torch.tensor([22.0, 27.0, 32.0, 37.0]))
    torch.testing.assert_close(bn.running_var, torch.full((4,), 287.8571), rtol=0, atol=1e-4)
    bn.running_mean.fill_(10.0)
    bn.running_var.fill_(1.0)
    bn.eval()
    torch.testing.assert_close(bn(x), x - 10.0)
