import os

import pytest
import torch

from capsutil import checkpoints, train
from capsutil.data import Digits, load_sample
from capsutil.losses import CapsNetLoss
from capsutil.models import CapsNet

TINY = dict(conv_channels=16, primary_maps=8, primary_dims=4, digit_dims=8, decoder_hidden=(32, 64))


@pytest.fixture(scope="module")
def sample() -> Digits:
    return load_sample("train")


def _spread(digits: Digits, n: int) -> Digits:
    """``n`` images taken evenly through the (class-sorted) sample, so every class is there."""
    index = torch.arange(n) * (len(digits) // n)
    return Digits(digits.images[index], digits.labels[index], digits.source)


def _tiny(seed: int = 0) -> CapsNet:
    torch.manual_seed(seed)
    return CapsNet(**TINY)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tiny_capsnet_overfits_32_sample_images(sample):
    images = _spread(sample, 32)
    model = _tiny()
    train.fit(model, CapsNetLoss(), images, epochs=50, batch_size=32, lr=3e-3, lr_decay=1.0,
              max_shift=0, progress=False)
    assert train.evaluate(model, images).accuracy == 1.0


def test_history_has_one_entry_per_epoch_and_lr_decays_exponentially(sample):
    model = _tiny()
    history = train.fit(model, CapsNetLoss(), _spread(sample, 64), _spread(sample, 20), epochs=3,
                        batch_size=32, lr=1e-3, lr_decay=0.5, eval_every=2, progress=False)
    assert history.epoch == [1, 2, 3]
    assert history.lr == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert history.test_accuracy[0] is None and history.test_accuracy[1] is not None
    assert history.test_accuracy[2] is not None                # the last epoch is always tested
    assert all(0 <= a <= 1 for a in history.train_accuracy) and all(s > 0 for s in history.seconds)


def _run(sample, run_dir, **kwargs):
    model = _tiny()
    history = train.fit(model, CapsNetLoss(), _spread(sample, 64), epochs=2, batch_size=16,
                        run_dir=run_dir, progress=False, **kwargs)
    return model, history


def _same_history(a: train.History, b: train.History) -> bool:
    return (a.epoch, a.loss, a.train_accuracy, a.lr) == (b.epoch, b.loss, b.train_accuracy, b.lr)


def test_resuming_after_an_epoch_gives_the_weights_of_an_uninterrupted_run(sample, tmp_path):
    straight, straight_history = _run(sample, tmp_path / "straight")
    _run(sample, tmp_path / "split", max_steps=4)                 # stops at the end of epoch 1
    assert checkpoints.load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 4
    resumed, resumed_history = _run(sample, tmp_path / "split", resume=True)
    assert _same_weights(straight, resumed)
    assert _same_history(straight_history, resumed_history)


class _CrashAfter(CapsNetLoss):
    """CapsNet's loss that raises on its ``n``-th call, as if the process were killed."""

    def __init__(self, n: int):
        super().__init__()
        self.calls, self.n = 0, n

    def forward(self, output, images, labels):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return super().forward(output, images, labels)


def test_resuming_mid_epoch_from_a_step_checkpoint_gives_the_same_weights(sample, tmp_path):
    straight, straight_history = _run(sample, tmp_path / "straight")
    model = _tiny()
    with pytest.raises(KeyboardInterrupt):                     # killed during step 7 of 8
        train.fit(model, _CrashAfter(7), _spread(sample, 64), epochs=2, batch_size=16,
                  run_dir=tmp_path / "crash", checkpoint_every=3, progress=False)
    state = checkpoints.load_checkpoint(tmp_path / "crash" / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["batch"]) == (1, 6, 2)
    resumed, resumed_history = _run(sample, tmp_path / "crash", checkpoint_every=3, resume=True)
    assert _same_weights(straight, resumed)
    assert _same_history(straight_history, resumed_history)


def test_a_run_can_be_extended_by_resuming_with_more_epochs(sample, tmp_path):
    _run(sample, tmp_path)
    model = _tiny()
    history = train.fit(model, CapsNetLoss(), _spread(sample, 64), epochs=3, batch_size=16,
                        run_dir=tmp_path, resume=True, progress=False)
    assert history.epoch == [1, 2, 3]


def test_fit_refuses_to_overwrite_a_run_without_resume(sample, tmp_path):
    _run(sample, tmp_path, max_steps=1)
    with pytest.raises(FileExistsError, match="pass resume=True to continue"):
        _run(sample, tmp_path)


def test_resuming_with_a_different_recipe_is_refused(sample, tmp_path):
    _run(sample, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="batch_size: checkpoint 16, now 32"):
        train.fit(_tiny(), CapsNetLoss(), _spread(sample, 64), epochs=2, batch_size=32,
                  run_dir=tmp_path, resume=True, progress=False)


def test_resume_without_a_checkpoint_names_the_missing_file(sample, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*checkpoint.pt not found"):
        _run(sample, tmp_path, resume=True)


def test_checkpoint_write_is_atomic_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip archive")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path)["step"] == 1


def test_truncated_or_garbage_checkpoints_raise_value_error_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    checkpoints.save_checkpoint({"step": 3, "weights": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=f"checkpoint {path} is truncated or corrupt"):
            checkpoints.load_checkpoint(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(3)}, other)
    with pytest.raises(ValueError, match="is not a capsutil-checkpoint/1 file"):
        checkpoints.load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")


def test_evaluate_returns_accuracy_predictions_and_a_confusion_matrix(sample):
    model = _tiny()
    digits = _spread(sample, 50)
    result = train.evaluate(model, digits, batch_size=16)
    assert result.predictions.shape == (50,) and result.predictions.dtype == torch.int64
    assert result.accuracy == pytest.approx((result.predictions == digits.labels).float().mean().item())
    confusion = result.confusion_matrix()
    assert confusion.shape == (10, 10) and confusion.sum() == 50
    assert confusion.trace() == round(result.accuracy * 50)
    assert torch.equal(confusion.sum(dim=1), torch.bincount(digits.labels, minlength=10))


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=0), "positive integer epochs, got 0"),
    (dict(epochs=1, batch_size=0), "positive integer batch_size, got 0"),
    (dict(epochs=1, checkpoint_every=0), "checkpoint_every to be None or a positive integer, got 0"),
    (dict(epochs=1, lr_decay=1.5), "0 < lr_decay <= 1, got lr 0.001, lr_decay 1.5"),
    (dict(epochs=1, max_shift=-1), "non-negative integer max_shift, got -1"),
    (dict(epochs=1, resume=True), "resume=True needs the run_dir"),
])
def test_fit_rejects_bad_arguments(sample, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.fit(_tiny(), CapsNetLoss(), _spread(sample, 8), progress=False, **kwargs)


def test_command_line_trains_checkpoints_resumes_and_prints_provenance(tmp_path, capsys):
    args = ["capsnet", "--epochs", "1", "--batch-size", "4", "--run-dir", str(tmp_path / "run"),
            "--data-root", str(tmp_path / "no-data"), "--eager", "--max-steps"]
    train.main(args + ["1"])
    train.main(args + ["2", "--resume"])
    out = capsys.readouterr().out
    assert out.count("provenance: mode") == 2
    assert "train 5,000 | test 1,000" in out and "epochs 0.0016" in out
    assert checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2


def test_resuming_with_fewer_epochs_than_done_is_refused(sample, tmp_path):
    _run(sample, tmp_path)
    with pytest.raises(ValueError, match="already 2 epochs and 0 batches in; ask for at least 2"):
        train.fit(_tiny(), CapsNetLoss(), _spread(sample, 64), epochs=1, batch_size=16,
                  run_dir=tmp_path, resume=True, progress=False)


def test_command_line_builds_the_model_from_a_json_config_and_resumes_only_the_same(tmp_path,
                                                                                    capsys):
    config = '{"A": 8, "B": 4, "C": 4, "D": 4, "iterations": 2}'
    args = ["matrix", "--epochs", "1", "--batch-size", "4", "--run-dir", str(tmp_path / "run"),
            "--data-root", str(tmp_path / "no-data"), "--eager", "--max-steps", "1"]
    train.main(args + ["--config", config])
    checkpoint = checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["model"] == "matrix" and checkpoint["config"]["A"] == 8
    assert checkpoint["config"]["iterations"] == 2
    with pytest.raises(ValueError, match="holds model 'matrix' with config"):
        train.main(args[:-1] + ["2", "--resume"])              # the default config differs
