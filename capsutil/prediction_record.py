"""Records of trained models whose weights are not shipped (Part IV's baselines).

A baseline's weights can be as large as the capsule network's, and a chapter only needs its test
predictions to compare the two digit by digit (:func:`capsutil.stats.paired_comparison`). The
record is the JSON written by :func:`capsutil.checkpoints.export` (sha256 of the weights, config,
recipe, metrics) plus ``test_predictions``: the predicted class of every test example in file
order, one character per class, two per MultiMNIST pair (its two classes, ascending)::

    python -m capsutil.prediction_record runs/export/cnn_multi.json \\
        --out capsutil/records/cnn_multi.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from capsutil.checkpoints import WEIGHTS_SUFFIX, atomic_write, load_exported
from capsutil.data import load_mnist
from capsutil.models import MODELS
from capsutil.multimnist_capsnet import evaluate_pairs, pairs_of_test_digits
from capsutil.train import evaluate


def test_predictions(model: torch.nn.Module, root: str | None = None) -> torch.Tensor:
    """``model``'s predictions on the MNIST test set: int64 (N,) for digits, or (N, 2) on the
    MultiMNIST test pairs for a model trained on pairs."""
    test = load_mnist("test", root)
    if getattr(model, "trained_on_pairs", False):
        return evaluate_pairs(model, pairs_of_test_digits(test)).predictions        # (N, 2)
    return evaluate(model, test).predictions                                         # (N,)


def encode(predictions: torch.Tensor) -> str:
    """Classes 0-9, (N,) or (N, 2), as one string of digits in row order."""
    if predictions.numel() and (int(predictions.min()) < 0 or int(predictions.max()) > 9):
        raise ValueError("expected classes 0-9 to encode as digits")
    return "".join(map(str, predictions.flatten().tolist()))


def decode(record: dict) -> torch.Tensor:
    """The test predictions of a record: int64 (N,), or (N, 2) for a model trained on pairs."""
    if "test_predictions" not in record:
        raise ValueError(f"the record of {record.get('model')!r} holds no test_predictions")
    flat = torch.tensor([int(c) for c in record["test_predictions"]])                # (N * k,)
    on_pairs = getattr(MODELS[record["model"]].model, "trained_on_pairs", False)
    return flat.view(-1, 2) if on_pairs else flat


def write_record(weights_json: str | os.PathLike, out: str | os.PathLike,
                 root: str | None = None) -> Path:
    """The export record ``weights_json`` plus the test predictions of its weights (checked
    against its sha256), written to ``out``; the weights file itself is not copied."""
    weights_json = Path(weights_json)
    record = json.loads(weights_json.read_text())
    model = load_exported(weights_json.with_suffix(WEIGHTS_SUFFIX), record["sha256"])
    predictions = test_predictions(model, root)
    size_mb = record["bytes"] / 1e6
    record["test_predictions"] = encode(predictions)
    record["note"] = (f"the {size_mb:.0f} MB {record['dtype']} weights (sha256 above) are not "
                      f"shipped with the package; test_predictions are their predictions on "
                      f"{record['metrics']['test_data']}, in order, computed with "
                      f"capsutil.prediction_record for paired comparisons")
    return atomic_write((json.dumps(record, indent=1) + "\n").encode(), Path(out))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m capsutil.prediction_record",
                                     description="Record an exported model's test predictions "
                                                 "without its weights.")
    parser.add_argument("weights_json", help="the JSON written beside the exported weights")
    parser.add_argument("--out", required=True, help="the record to write")
    parser.add_argument("--data-root", default=None, help="MNIST root (default $CAPSUTIL_DATA)")
    args = parser.parse_args(argv)
    try:
        path = write_record(args.weights_json, args.out, args.data_root)
    except (ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except KeyError as err:
        parser.exit(2, f"{parser.prog}: error: {args.weights_json} is not an export record "
                       f"(it has no {err})\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
