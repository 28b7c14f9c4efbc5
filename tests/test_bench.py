"""The benchmark's command line (python -m bnext.bench)."""
import pytest
import torch

from bnext import bench


def test_shapes_option_replaces_the_default_set():
    args = bench.parse_args(["--shapes", "8x8192, 2x3x5x5"])
    assert bench.shapes_for(args) == [(8, 8192), (2, 3, 5, 5)]
    assert bench.shapes_for(bench.parse_args(["--device", "cpu"])) == bench.ALL_SHAPES


@pytest.mark.parametrize("text", ["8", "8xa", "0x16", "1x16", "8x"])
def test_shapes_option_rejects_what_batch_norm_cannot_train_on(text, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", text])
    assert "--shapes" in capsys.readouterr().err


def test_each_round_times_fresh_tensors_and_the_median_round_counts(monkeypatch):
    """A round whose tensors landed badly (one timer 3x slower throughout) does not move the
    result: each round makes its own timers, and the median over rounds is reported."""
    made = []

    def make_timers(config, case):
        slow = len(made) == 1  # the second round's allocation is the unlucky one
        made.append(case)
        return {
            "bnext": lambda: 3e-3 if slow else 1e-3,
            "torch": lambda: 2e-3,
            "copy": lambda: 0.5e-3,
        }

    monkeypatch.setattr(bench, "make_timers", make_timers)
    plan = bench.TimingPlan(warmup=1, budget_s=0.0, min_repeats=4, max_repeats=4, rounds=3)
    medians, repeats = bench.time_case(None, "eval_fwd", plan)
    assert len(made) == 3 and repeats == 12
    assert medians == {"bnext": 1e-3, "torch": 2e-3, "copy": 0.5e-3}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["bnext", "torch"])
def test_backward_cases_time_the_whole_backward(name, training):
    """The backward cases apply the layer's autograd node; it gives the gradients backward() gives."""
    torch.manual_seed(0)
    batch_norm = bench.implementations("cpu")[name]
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    grad_output = torch.randn_like(x)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    leaf = x.clone().requires_grad_()
    output = batch_norm(leaf, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), weight, bias,
                        training, 0.1, 1e-5)
    with torch.no_grad():
        node_grads = output.grad_fn(*bench.node_inputs(output, grad_output))
    output.backward(grad_output)
    expected = [leaf.grad, weight.grad, bias.grad]
    assert len([g for g in node_grads if g is not None]) == 3
    for got, want in zip([g for g in node_grads if g is not None], expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eval_backward_is_timed_only_when_asked():
    assert "eval_bwd" not in bench.parse_args([]).cases
    assert bench.parse_args(["--cases", "eval_bwd,train_fwd"]).cases == ["eval_bwd", "train_fwd"]


def test_configuration_check_catches_a_wrong_eval_gradient(monkeypatch):
    """The check before timing covers the gradients of an eval-mode forward, which eval_bwd times:
    an eval input gradient off by half the output gradient, with every output right, is reported."""
    import types

    import torch.nn.functional as F

    def eval_gradient_off(x, running_mean, running_var, weight, bias, training, momentum, eps):
        output = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return output if training else output + 0.5 * (x - x.detach())

    monkeypatch.setattr(bench, "bnext", types.SimpleNamespace(batch_norm=eval_gradient_off))
    problems = bench.check_configuration(bench.Config((4, 3, 5, 5), "channels_last", torch.float32))
    assert len(problems) == 1 and "eval grad_input" in problems[0]
