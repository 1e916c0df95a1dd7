"""Specifications of training under faults: NaN losses and gradients, a run directory that is
busy, unwritable, full or a file, and interrupted saves."""
import errno
import os
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest
import torch

from capsutil import checkpoints, train
from capsutil.checkpoints import RunDirectoryInUse, load_checkpoint
from capsutil.data import Digits, load_sample
from capsutil.losses import CapsNetLoss, SpreadLoss
from capsutil.models import CapsNet, MatrixCapsNet

TINY_CAPSNET = dict(conv_channels=16, primary_maps=8, primary_dims=4, digit_dims=8,
                    decoder_hidden=(32, 64))
TINY_MATRIX = dict(A=8, B=4, C=4, D=4, iterations=2)


@pytest.fixture(scope="module")
def images() -> Digits:
    """32 sample images spread over the classes: 4 steps of 8 an epoch."""
    sample = load_sample("train")
    index = torch.arange(32) * (len(sample) // 32)
    return Digits(sample.images[index], sample.labels[index], sample.source)


def _capsnet() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(**TINY_CAPSNET)


def _nan_from_call(loss_class, n: int):
    """A loss of ``loss_class`` that returns NaN from its ``n``-th call on."""
    class NaNFrom(loss_class):
        calls = 0

        def forward(self, output, images, labels):
            NaNFrom.calls += 1
            loss = super().forward(output, images, labels)
            return loss * float("nan") if NaNFrom.calls >= n else loss
    return NaNFrom()


def _fit(model, loss_fn, images, run_dir, **kwargs):
    return train.fit(model, loss_fn, images, epochs=2, batch_size=8, max_shift=0,
                     run_dir=run_dir, progress=False, **kwargs)


@pytest.mark.parametrize("model, loss_class", [(_capsnet, CapsNetLoss),
                                               (lambda: MatrixCapsNet(**TINY_MATRIX), SpreadLoss)])
def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_checkpoint(
        images, tmp_path, model, loss_class):
    with pytest.raises(train.NonFiniteTraining,
                       match=f"step 3: the loss is nan; training stopped before this step's "
                             f"update, the last good checkpoint {tmp_path / 'checkpoint.pt'} "
                             f"\\(step 2\\) is untouched"):
        _fit(model(), _nan_from_call(loss_class, 3), images, tmp_path, checkpoint_every=1)
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["step"] == 2
    assert all(torch.isfinite(t).all() for t in kept["model_state"].values())


def test_a_nan_gradient_stops_training_naming_the_step_and_the_parameter(images, tmp_path):
    model = _capsnet()
    model.decoder.net[0].weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(train.NonFiniteTraining,
                       match="step 1: the gradient of decoder.net.0.weight holds NaN or "
                             "infinite values; training stopped before this step's update, "
                             f"before its first checkpoint: no {tmp_path / 'checkpoint.pt'} "
                             f"was written"):
        _fit(model, CapsNetLoss(), images, tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_the_command_line_reports_a_nan_loss_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "build_loss", lambda name: _nan_from_call(CapsNetLoss, 1))
    with pytest.raises(SystemExit) as exit:
        train.main(["capsnet", "--epochs", "1", "--batch-size", "4", "--run-dir",
                    str(tmp_path / "run"), "--data-root", str(tmp_path / "no-data"), "--eager",
                    "--config", '{"conv_channels": 8, "primary_maps": 4, "primary_dims": 4, '
                                '"digit_dims": 6, "decoder_hidden": [16, 32]}'])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "error: step 1: the loss is nan" in error and "Traceback" not in error


HOLD_THE_RUN_DIRECTORY = textwrap.dedent("""
    import sys
    from capsutil.checkpoints import claimed_run_directory
    with claimed_run_directory(sys.argv[1], {"checkpoint.pt": 0}):
        print("claimed", flush=True)
        sys.stdin.read()                 # hold it until the test closes our standard input
""")


def test_a_second_run_on_the_same_directory_refuses_to_start(images, tmp_path):
    other = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN_DIRECTORY, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "claimed\n"
        loss = _nan_from_call(CapsNetLoss, 10**9)                   # counts its calls
        with pytest.raises(RunDirectoryInUse, match=f"run directory {tmp_path} is in use by "
                                                    f"another run \\(process {other.pid}\\)"):
            _fit(_capsnet(), loss, images, tmp_path, max_steps=1)
        assert type(loss).calls == 0 and not (tmp_path / "checkpoint.pt").exists()
    finally:
        other.stdin.close()
        other.wait()
    _fit(_capsnet(), CapsNetLoss(), images, tmp_path, max_steps=1)    # free again
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_the_lock_of_a_killed_run_is_released(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN_DIRECTORY, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "claimed\n"
    other.kill()
    other.wait()
    with checkpoints.claimed_run_directory(tmp_path, {"checkpoint.pt": 0}):
        assert (tmp_path / checkpoints.LOCK_NAME).read_text() == f"{os.getpid()}\n"


def _refused_before_training(images, run_dir, message):
    loss = _nan_from_call(CapsNetLoss, 10**9)
    with pytest.raises(ValueError, match=message):
        _fit(_capsnet(), loss, images, run_dir)
    assert type(loss).calls == 0


def test_a_run_directory_that_is_a_file_is_refused_before_training(images, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.write_text("")
    _refused_before_training(images, run_dir, f"run directory {run_dir} is a file")


def test_a_read_only_run_directory_is_refused_before_training(images, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(run_dir)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    _refused_before_training(images, run_dir, f"run directory {run_dir} is not writable: "
                                              f".*Read-only file system")


def test_a_full_disk_is_refused_before_training(images, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 4096))
    _refused_before_training(images, tmp_path, f"run directory {tmp_path} has 0.0 MiB free; "
                                               f"its checkpoints need about [0-9.]+ MiB more")


def test_a_run_keeps_its_previous_checkpoint_and_cleans_up_after_a_killed_save(images,
                                                                              tmp_path):
    _fit(_capsnet(), CapsNetLoss(), images, tmp_path, max_steps=2, checkpoint_every=1)
    stale = tmp_path / ".checkpoint.pt.x8y2z.tmp"
    stale.write_bytes(b"the first half of a checkpoint")
    _fit(_capsnet(), CapsNetLoss(), images, tmp_path, max_steps=3, checkpoint_every=1,
         resume=True)
    assert not stale.exists()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["step"] == 2
