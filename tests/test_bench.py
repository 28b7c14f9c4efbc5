"""The benchmark's command line (python -m bnext.bench)."""
import pytest

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
