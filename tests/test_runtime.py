import torch
import pytest

import capsutil
from capsutil import runtime


def test_quick_mode_is_on_under_the_test_configuration():
    assert capsutil.is_quick()
    assert capsutil.mode() == "quick"
    assert capsutil.pick(full=30, quick=1) == 1


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_quick_mode_follows_the_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv(runtime.QUICK_ENV, value)
    assert runtime.is_quick() is expected
    assert runtime.pick("full", "quick") == ("quick" if expected else "full")


def test_setup_seeds_torch_and_prints_device_and_mode(capsys):
    device = capsutil.setup(seed=123)
    first = torch.rand(3)
    capsutil.setup(seed=123)
    assert torch.equal(first, torch.rand(3))
    assert device == capsutil.pick_device()
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"capsutil: device {device.type}")
    assert "mode quick" in out[0] and "seed 123" in out[0]


def test_setup_rejects_a_non_integer_seed():
    with pytest.raises(ValueError, match="integer seed"):
        capsutil.setup(seed="zero")


def test_provenance_line_names_mode_sizes_device_epochs_and_time(capsys):
    line = capsutil.provenance(n_train=60_000, n_test=10_000, device=torch.device("cpu"),
                               epochs=2, seconds=12.345, data="MNIST")
    printed = capsys.readouterr().out.strip().splitlines()
    assert " ".join(p.strip() for p in printed) == line         # the record, folded
    assert all(len(p) <= 80 for p in printed) and printed[0].startswith("provenance: ")
    for part in ("mode quick", "data MNIST", "train 60,000", "test 10,000", "device cpu",
                 "epochs 2", "wall time 12.3 s"):
        assert part in line


def test_fold_breaks_only_at_separators_and_keeps_short_lines_whole():
    assert runtime.fold("a | b | c", width=80) == "a | b | c"
    assert runtime.fold("aaaa | bbbb | cccc", width=11) == "aaaa | bbbb\n  | cccc"
    assert runtime.fold("x" * 90, width=80) == "x" * 90           # no separator to break at


def test_provenance_prints_a_recorded_device_description_as_it_is():
    line = capsutil.provenance(n_train=10, n_test=5, device="cuda (NVIDIA H100)", epochs=1,
                               seconds=2.0, data="MNIST")
    assert "| device cuda (NVIDIA H100) |" in line
