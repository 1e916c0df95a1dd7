import inspect
import json
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
                        batch_size=32, lr=1e-3, lr_decay=0.5, progress=False)
    assert history.epoch == [1, 2, 3]
    assert history.lr == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert history.val_step == [2, 4, 6] and history.val_check == history.val_accuracy
    assert all(0 <= a <= 1 for a in history.train_accuracy + history.val_accuracy)
    assert all(s > 0 for s in history.seconds)


def test_fit_has_no_way_to_reach_the_test_set():
    parameters = inspect.signature(train.fit).parameters
    assert not [name for name in parameters if "test" in name]


def test_training_from_the_command_line_never_loads_the_test_split(tmp_path, monkeypatch):
    real_load = train.load_mnist

    def train_split_only(split, *args, **kwargs):
        assert split == "train", "the test split was loaded during training"
        return real_load(split, *args, **kwargs)
    monkeypatch.setattr(train, "load_mnist", train_split_only)
    train.main(["capsnet", "--epochs", "1", "--batch-size", "4", "--run-dir",
                str(tmp_path / "run"), "--data-root", str(tmp_path / "no-data"), "--eager",
                "--max-steps", "1", "--config", json.dumps(TINY)])


def _validated_run(sample, run_dir, **kwargs):
    model = _tiny()
    history = train.fit(model, CapsNetLoss(), _spread(sample, 64), _spread(sample, 40), epochs=3,
                        batch_size=16, lr=3e-3, run_dir=run_dir, val_every=2, progress=False,
                        **kwargs)
    return model, history


def test_best_checkpoint_holds_the_weights_of_the_validation_argmax(sample, tmp_path):
    model, history = _validated_run(sample, tmp_path)
    assert history.val_step == [2, 4, 6, 8, 10, 12]        # every 2 steps; 4 steps an epoch
    top = history.val_check.index(max(history.val_check))  # the first of the highest
    best = checkpoints.load_checkpoint(tmp_path / "best.pt")
    assert (best["step"], best["val_accuracy"]) == (history.val_step[top], history.val_check[top])
    assert history.best() == (best["step"], best["val_accuracy"])
    selected = _tiny(seed=1)
    assert train.load_selected(selected, tmp_path, "best")["step"] == best["step"]
    assert train.evaluate(selected, _spread(sample, 40)).accuracy == best["val_accuracy"]
    assert train.load_selected(selected, tmp_path, "last")["step"] == 12
    assert _same_weights(selected, model)


def test_history_best_breaks_ties_towards_the_earlier_check():
    history = train.History(val_step=[10, 20, 30], val_check=[0.5, 0.9, 0.9])
    assert history.best() == (20, 0.9)
    assert train.History().best() is None


def test_resuming_keeps_the_best_so_far(sample, tmp_path):
    straight, straight_history = _validated_run(sample, tmp_path / "straight")
    _validated_run(sample, tmp_path / "split", max_steps=7, checkpoint_every=3)
    resumed, resumed_history = _validated_run(sample, tmp_path / "split", resume=True,
                                              checkpoint_every=3)
    assert _same_weights(straight, resumed)
    assert _same_history(straight_history, resumed_history)
    assert (resumed_history.val_step, resumed_history.val_check) == (straight_history.val_step,
                                                                     straight_history.val_check)
    best = [checkpoints.load_checkpoint(tmp_path / run / "best.pt") for run in ("straight", "split")]
    assert best[0]["step"] == best[1]["step"]
    assert all(torch.equal(a, b) for a, b in zip(best[0]["model_state"].values(),
                                                 best[1]["model_state"].values()))


def test_a_run_stopped_at_max_steps_does_not_train_past_it_on_resume(sample, tmp_path):
    _run(sample, tmp_path, max_steps=3)
    _run(sample, tmp_path, max_steps=3, resume=True)
    assert checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


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

    def disk_full(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", disk_full)                  # after the data is written
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
    with pytest.raises(ValueError, match=f"checkpoint {truncated} is corrupt .checksum mismatch"):
        checkpoints.load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(3)}, other)
    for path in (garbage, other):
        with pytest.raises(ValueError, match=f"checkpoint {path} is not a capsutil-checkpoint/2"):
            checkpoints.load_checkpoint(path)
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
    (dict(epochs=1, val_every=0), "val_every to be None or a positive integer, got 0"),
])
def test_fit_rejects_bad_arguments(sample, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.fit(_tiny(), CapsNetLoss(), _spread(sample, 8), progress=False, **kwargs)


def test_command_line_trains_checkpoints_resumes_and_prints_provenance(tmp_path, capsys):
    args = ["capsnet", "--epochs", "1", "--batch-size", "4", "--run-dir", str(tmp_path / "run"),
            "--data-root", str(tmp_path / "no-data"), "--eager", "--max-steps"]
    train.main(args + ["1"])
    train.main(args + ["2", "--resume"])
    out = capsys.readouterr().out.replace("\n  | ", " | ")     # the records, unfolded
    assert out.count("provenance: mode") == 2
    assert "train 4,583 | val 417 | test 0" in out and "epochs 0.00174" in out
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
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main(args[:-1] + ["2", "--resume"])              # the default config differs
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "holds model 'matrix' with config" in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1


def test_each_model_has_its_own_help_with_its_options_and_defaults(capsys):
    for name, key in (("capsnet", "routing_iterations = 3"), ("matrix", "iterations = ")):
        with pytest.raises(SystemExit) as exit:
            train.main([name, "--help"])
        assert exit.value.code == 0
        out = capsys.readouterr().out
        assert f"python -m capsutil.train {name}" in out and key in out
        assert "(default: 128)" in out and "(default: best)" in out


@pytest.mark.parametrize("config, message", [
    ("{bad", "argument --config: not valid JSON"),
    ("[1]", "argument --config: expected a JSON object"),
    ('{"Z": 1}', "model 'capsnet' takes no argument 'Z'; it takes image_size"),
])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys, config, message):
    with pytest.raises(SystemExit) as exit:
        train.main(["capsnet", "--epochs", "1", "--run-dir", str(tmp_path / "run"),
                    "--data-root", str(tmp_path / "no-data"), "--eager", "--config", config])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_the_loss_options_are_part_of_the_recipe_and_a_changed_loss_is_not_resumed(sample,
                                                                                   tmp_path):
    digits = _spread(sample, 64)
    train.fit(_tiny(), CapsNetLoss(reconstruction_scale=0.0), digits, epochs=1, batch_size=16,
              run_dir=tmp_path, max_steps=1, progress=False)
    recipe = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")["recipe"]
    assert recipe["loss"]["reconstruction_scale"] == 0.0
    with pytest.raises(ValueError, match="loss: checkpoint"):
        train.fit(_tiny(), CapsNetLoss(), digits, epochs=1, batch_size=16, run_dir=tmp_path,
                  resume=True, progress=False)


def test_command_line_passes_loss_options_and_refuses_unknown_ones(tmp_path, capsys):
    args = ["capsnet", "--epochs", "1", "--batch-size", "4", "--data-root",
            str(tmp_path / "no-data"), "--eager", "--max-steps", "1"]
    train.main(args + ["--run-dir", str(tmp_path / "a"), "--loss",
                       '{"reconstruction_scale": 0}'])
    recipe = checkpoints.load_checkpoint(tmp_path / "a" / "checkpoint.pt")["recipe"]
    assert recipe["loss"]["reconstruction_scale"] == 0
    capsys.readouterr()
    for extra, message in ((["--loss", '{"scale": 1}'], "takes no argument 'scale'"),
                           (["--init", "half-active"], "is for the matrix model")):
        with pytest.raises(SystemExit) as exit:
            train.main(args + ["--run-dir", str(tmp_path / "b")] + extra)
        assert exit.value.code == 2
        assert message in capsys.readouterr().err


def test_command_line_half_active_start_prints_the_shares_of_active_capsules(tmp_path, capsys):
    train.main(["matrix", "--epochs", "1", "--batch-size", "4", "--run-dir",
                str(tmp_path / "run"), "--data-root", str(tmp_path / "no-data"), "--eager",
                "--max-steps", "1", "--init", "half-active", "--config",
                '{"A": 8, "B": 4, "C": 4, "D": 4, "iterations": 2, "conv1_padding": 1}'])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("half-active"))
    shares = [int(part.split()[-1].rstrip("%")) for part in line.split(": ", 1)[1].split(", ")]
    assert len(shares) == 4 and all(30 <= share <= 70 for share in shares[1:])


def test_the_checkpoint_lists_each_device_that_trained_the_run(sample, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _run(sample, tmp_path, max_steps=2)
        one = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")["trained_on"]
        torch.set_num_threads(2)
        _run(sample, tmp_path, resume=True)
    finally:
        torch.set_num_threads(before)
    both = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")["trained_on"]
    assert len(one) == 1 and one[0].startswith("cpu (1 thread,")
    assert both[0] == one[0] and "2 threads," in both[1] and len(both) == 2
