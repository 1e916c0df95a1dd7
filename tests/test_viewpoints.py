import json

import pytest
import torch

from capsutil import viewpoints
from capsutil.affine_mnist import expand
from capsutil.checkpoints import load_checkpoint
from capsutil.data import load_sample
from capsutil.models import build_loss, build_model
from capsutil.sweep import training_data
from capsutil.train import evaluate, fit

SMALL = {"rotation": (0, 30), "translation": (0, 4)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small 40x40 CNN trained a few steps on centred sample digits, with its run folder."""
    train, val, shift = training_data("expanded", str(tmp_path_factory.mktemp("no-data")))
    torch.manual_seed(0)
    model = build_model("cnn_small", image_size=40)
    run_dir = tmp_path_factory.mktemp("run")
    fit(model, build_loss("cnn_small"), train, val, epochs=1, batch_size=128, lr=3e-3,
        max_shift=shift, run_dir=run_dir, progress=False)
    return model.eval(), run_dir


def test_the_record_scores_every_set_on_every_test_digit(tiny_run):
    model, _ = tiny_run
    test = load_sample("test")
    record = viewpoints.viewpoint_record(model, test, SMALL)
    json.dumps(record)                                      # plain JSON
    n = len(test)
    for name in ("expanded_test", "affnist_style"):
        scored = record[name]
        assert scored["n"] == n and len(scored["right"]) == n
        assert scored["right"].count("1") == scored["correct"]
    assert list(record["families"]) == list(SMALL)
    rotation = record["families"]["rotation"]
    assert rotation["magnitudes"] == [0, 30] and all(s["n"] == n for s in rotation["scores"])
    # rotation 0 and translation 0 are the same centred digits
    assert rotation["scores"][0] == record["families"]["translation"]["scores"][0]


def test_the_mask_of_right_digits_reads_back_the_predictions(tiny_run):
    model, _ = tiny_run
    test = load_sample("test")
    record = viewpoints.viewpoint_record(model, test, SMALL)
    evaluation = evaluate(model, expand(test, viewpoints.EXPANDED_TEST_SEED))
    right = viewpoints.right_mask(record["expanded_test"])
    assert right.dtype == torch.bool and right.shape == (len(test),)
    assert torch.equal(right, evaluation.predictions == evaluation.labels)


def test_the_curves_score_the_first_digits_asked_for(tiny_run):
    test = load_sample("test")
    record = viewpoints.viewpoint_record(tiny_run[0], test, SMALL, family_digits=100)
    assert record["expanded_test"]["n"] == len(test) > 100
    assert all(s["n"] == 100 for family in record["families"].values()
               for s in family["scores"])


def test_the_sets_are_the_same_for_every_model(tiny_run):
    model, _ = tiny_run
    test = load_sample("test")
    first = viewpoints.viewpoint_record(model, test, {"scale": (0.8,)})
    assert viewpoints.viewpoint_record(model, test, {"scale": (0.8,)}) == first


def test_unknown_families_are_named(tiny_run):
    with pytest.raises(ValueError, match="unknown transformation families \\['zoom'\\]"):
        viewpoints.viewpoint_record(tiny_run[0], load_sample("test"), {"zoom": (1,)})


def test_the_command_line_scores_the_best_check(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPSUTIL_DATA", str(tmp_path / "no-data"))
    monkeypatch.setattr(viewpoints, "MAGNITUDES", SMALL)
    out = tmp_path / "record.json"
    record = viewpoints.main([str(tiny_run[1]), "--out", str(out)])
    assert json.loads(out.read_text()) == record and record["selected"] == 1
    best = load_checkpoint(tiny_run[1] / "best.pt")
    assert record["selected_step"] == best["step"] > 0
    assert "affNIST-style" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        viewpoints.main([str(tmp_path / "missing"), "--out", str(out)])
    assert "best.pt" in capsys.readouterr().err
