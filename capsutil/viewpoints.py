"""New viewpoints, measured: the test sets of chapter 09's generalisation experiment.

A model trained on expanded MNIST (:mod:`capsutil.sweep`, ``data="expanded"``) is scored on

- **expanded-MNIST test**: the 10,000 test digits, each at its own random place in 40x40
  (:func:`capsutil.affine_mnist.expand`, seed ``EXPANDED_TEST_SEED``), the paper's first number;
- **affNIST-style test**: the test digits under random affine transformations in affNIST's
  documented ranges (:func:`capsutil.affine_mnist.random_affine`, seed ``AFFNIST_SEED``);
- **one family at a time**: the first ``FAMILY_DIGITS`` test digits, centred, under one
  transformation at one magnitude (:func:`capsutil.affine_mnist.transform_family`), for
  accuracy-against-magnitude curves over the ``MAGNITUDES`` (within and beyond affNIST's
  ranges). The 33 points of the curves would be 330,000 images with every test digit, hours
  for CapsNet at 40x40 on a CPU; 1,000 digits give each point an interval of a few percent.

:func:`viewpoint_record` returns all of it as plain JSON: for each set, the number right, the
number scored and, for the two whole sets, which digits were right (a string of 0s and 1s in
test-file order), so that two models can be compared digit by digit
(:func:`capsutil.stats.paired_comparison`). On the command line, for the best validation check
of a training run::

    python -m capsutil.viewpoints runs/expanded/capsnet-expanded --out capsnet.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from capsutil.affine_mnist import FAMILIES, expand, random_affine, transform_family
from capsutil.checkpoints import load_checkpoint
from capsutil.data import Digits, load_mnist
from capsutil.models import build_model
from capsutil.runtime import describe_device, pick_device
from capsutil.stats import Accuracy
from capsutil.train import BEST_NAME, evaluate, load_selected

EXPANDED_TEST_SEED = 3          # fixed: every model is scored on the same placements
AFFNIST_SEED = 4                # and on the same affine draws
MAGNITUDES = {                  # affNIST's ranges: rotation 20 degrees, shear 0.2, scale 0.8-1.2
    "rotation": (-45, -30, -20, -10, 0, 10, 20, 30, 45),
    "shear": (-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4),
    "scale": (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4),
    "translation": (0, 2, 4, 6, 8, 10),   # pixels to the right of centre; training shifts up to 6
}
FAMILY_DIGITS = 1000            # test digits at each point of the curves


def _scored(model: nn.Module, digits: Digits, with_mask: bool = False) -> dict:
    """``{"correct", "n"}`` (and ``"right"``, a 0/1 string per digit) of ``model`` on ``digits``."""
    evaluation = evaluate(model, digits)
    right = evaluation.predictions == evaluation.labels                          # (N,) bool
    scored = dict(correct=int(right.sum()), n=len(right))
    if with_mask:
        scored["right"] = "".join("1" if r else "0" for r in right.tolist())
    return scored


def viewpoint_record(model: nn.Module, test: Digits,
                     magnitudes: dict[str, tuple] | None = None,
                     family_digits: int | None = None) -> dict:
    """Scores of ``model`` (a classifier of 40x40 images) on the sets above, made from the
    28x28 ``test`` digits (the curves from the first ``family_digits`` of them); see the
    module's docstring for the layout. Left out, ``magnitudes`` and ``family_digits`` are the
    module's ``MAGNITUDES`` and ``FAMILY_DIGITS``."""
    magnitudes = MAGNITUDES if magnitudes is None else magnitudes
    family_digits = FAMILY_DIGITS if family_digits is None else family_digits
    unknown = sorted(set(magnitudes) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown transformation families {unknown}; expected some of "
                         f"{list(FAMILIES)}")
    affine, _ = random_affine(test, AFFNIST_SEED)
    curve_digits = test.subset(family_digits)
    families = {family: dict(magnitudes=list(values),
                             scores=[_scored(model, transform_family(curve_digits, family,
                                                                     value))
                                     for value in values])
                for family, values in magnitudes.items()}
    return dict(test_data=test.source,
                expanded_test=_scored(model, expand(test, EXPANDED_TEST_SEED), with_mask=True),
                affnist_style=_scored(model, affine, with_mask=True), families=families)


def accuracy(scored: dict) -> Accuracy:
    """A set's score in a :func:`viewpoint_record` as an :class:`Accuracy` (prints with its
    95% interval)."""
    return Accuracy(scored["correct"], scored["n"])


def right_mask(scored: dict) -> torch.Tensor:
    """Which digits were right, bool (N,) in test-file order, from a whole set's score in a
    :func:`viewpoint_record` (its ``"right"`` string), for
    :func:`capsutil.stats.paired_comparison`."""
    return torch.tensor([flag == "1" for flag in scored["right"]])


def load_best(run_dir: str | Path,
              device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """The model of a training run's best validation check (``run_dir/best.pt``), in eval mode,
    and which check it is (:func:`capsutil.train.load_selected`'s record of it)."""
    best = load_checkpoint(Path(run_dir) / BEST_NAME)
    model = build_model(best["model"], **best["config"])
    selected = load_selected(model, run_dir, "best")
    return model.to(device or torch.device("cpu")).eval(), selected


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m capsutil.viewpoints",
        description="Score a training run's best check on expanded-MNIST test, an "
                    "affNIST-style test and one transformation family at a time.")
    parser.add_argument("run_dir", help="a training run's folder (holding best.pt)")
    parser.add_argument("--out", required=True, help="where the JSON record goes")
    parser.add_argument("--data-root", default=None, help="MNIST root (default $CAPSUTIL_DATA)")
    args = parser.parse_args(argv)
    device = pick_device()
    try:
        model, selected = load_best(args.run_dir, device)
        record = viewpoint_record(model, load_mnist("test", args.data_root))
    except (ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    record.update(run_dir=str(args.run_dir), scored_on=describe_device(device),
                  selected=selected["epoch"], selected_step=selected["step"])
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"{args.run_dir}: expanded-MNIST test {accuracy(record['expanded_test'])}; "
          f"affNIST-style {accuracy(record['affnist_style'])}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
