import json

import pytest

from capsutil import sweep
from capsutil.sweep import Run

TINY_CAPSNET = dict(conv_channels=8, primary_maps=4, primary_dims=4, digit_dims=4,
                    decoder_hidden=[16, 16])


@pytest.fixture
def tiny_sweep(monkeypatch):
    runs = [Run("capsnet-tiny", "capsnet", TINY_CAPSNET, epochs=1, batch_size=256),
            Run("cnn-small", "cnn_small", epochs=1, batch_size=256, lr=3e-3)]
    monkeypatch.setitem(sweep.SWEEPS, "tiny", lambda: runs)
    return runs


def test_a_sweep_records_every_run_with_its_best_validation_check(tiny_sweep, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("CAPSUTIL_DATA", str(tmp_path / "no-data"))   # the shipped sample
    out = tmp_path / "record.json"
    record = sweep.main(["tiny", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert json.loads(out.read_text()) == record
    assert list(record["runs"]) == ["capsnet-tiny", "cnn-small"]
    for entry in record["runs"].values():
        history = entry["history"]
        assert entry["best_val_accuracy"] == max(history["val_check"])
        assert history["epoch"] == [1] and entry["seed"] == 0


def test_a_finished_run_is_not_trained_again(tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSUTIL_DATA", str(tmp_path / "no-data"))
    args = ["tiny", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")]
    first = sweep.main(args)

    def refuse(*_, **__):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep, "train_run", refuse)
    assert sweep.main(args) == first


def test_expanded_mnist_is_the_digits_centred_in_40_pixels_with_shifts_of_6(tmp_path):
    train, val, max_shift = sweep.training_data("expanded", str(tmp_path / "no-data"))
    assert train.images.shape[1:] == (1, 40, 40) and val.images.shape[1:] == (1, 40, 40)
    assert max_shift == 6
    assert train.images[:, :, :6].sum() == 0 and train.images[:, :, 34:].sum() == 0
    assert val.images[:, :, :6].sum() > 0          # validation digits placed at random
    with pytest.raises(ValueError, match="expected data"):
        sweep.training_data("affnist", str(tmp_path / "no-data"))


def test_the_fixed_sweeps_vary_one_thing_at_a_time_over_three_seeds():
    choices = sweep.SWEEPS["matrix-choices"]()
    assert len(choices) == 18 and {run.seed for run in choices} == {0, 1, 2}
    base = next(run for run in choices if run.name == "base-seed0")
    three = next(run for run in choices if run.name == "3-iterations-seed0")
    assert {k for k in base.config if base.config[k] != three.config[k]} == {"iterations"}
    routing = sweep.SWEEPS["capsnet-routing"]()
    assert len(routing) == 12
    assert {(run.config["routing_iterations"], run.loss["reconstruction_scale"])
            for run in routing} == {(1, 0.0005), (1, 0.0), (3, 0.0005), (3, 0.0)}


def test_only_runs_the_runs_whose_names_match(tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSUTIL_DATA", str(tmp_path / "no-data"))
    record = sweep.main(["tiny", "--runs-dir", str(tmp_path / "runs"),
                         "--out", str(tmp_path / "r.json"), "--only", "cnn-*"])
    assert list(record["runs"]) == ["cnn-small"]


def test_summarise_groups_the_seeds_of_each_setting():
    record = {"runs": {f"{setting}-seed{seed}": {"best_val_accuracy": value}
                       for setting, values in (("base", (0.9, 0.8, 1.0)), ("3-iterations", (0.5,)))
                       for seed, value in enumerate(values)}}
    summary = sweep.summarise(record)
    assert list(summary) == ["base", "3-iterations"]
    assert summary["base"]["mean"] == pytest.approx(0.9)
    assert summary["base"]["sd"] == pytest.approx(0.1)
    assert summary["3-iterations"] == dict(accuracies=[0.5], mean=0.5, sd=0.0)


def test_a_run_checkpoints_validates_and_stops_at_its_own_cadence(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSUTIL_DATA", str(tmp_path / "no-data"))
    run = Run("cnn-small", "cnn_small", epochs=1, batch_size=64, checkpoint_every=3,
              max_steps=4, val_every=2)
    calls = []
    real_fit = sweep.fit

    def recording_fit(*args, **kwargs):
        calls.append({key: kwargs[key] for key in ("checkpoint_every", "max_steps",
                                                   "val_every")})
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sweep, "fit", recording_fit)
    data = sweep.training_data("mnist", None)
    assert not sweep.finished(run, tmp_path)
    entry = sweep.train_run(run, data, tmp_path, sweep.runtime.pick_device())
    assert calls == [dict(checkpoint_every=3, max_steps=4, val_every=2)]
    assert entry["checkpoint_every"] == 3 and entry["max_steps"] == 4
    assert entry["history"]["val_step"] == [2, 4]          # checked every 2 steps, stopped at 4
    assert entry["history"]["seconds"] == []               # no epoch finished, yet timed:
    assert 0 < entry["seconds"] <= entry["seconds_this_call"]
    assert sweep.finished(run, tmp_path)                   # 4 steps: less than an epoch


def test_the_long_expanded_runs_share_a_budget_shorter_than_an_epoch():
    steps_per_epoch = 55_000 // 128
    runs = sweep.SWEEPS["expanded"]()
    assert [run.model for run in runs] == ["capsnet", "cnn_capsnet"]
    for run in runs:
        assert run.data == "expanded" and run.config == {"image_size": 40}
        assert run.max_steps == runs[0].max_steps < steps_per_epoch
        assert run.max_steps % run.val_every == 0          # the last step is checked
        assert run.checkpoint_every is not None and run.checkpoint_every < run.val_every
