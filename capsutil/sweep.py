"""Families of training runs fixed in advance, run one after another and recorded (Part IV and
chapter 08's training choices).

A sweep is a list of :class:`Run`: a registered model with its config, its loss options, a seed,
and the recipe of :func:`capsutil.train.fit`. Every run trains on the 55,000 / 5,000 split of the
MNIST training set (``data="expanded"``: the same digits centred in 40x40 frames and shifted by
up to 6 pixels, which is expanded MNIST drawn on the fly) and is scored on the validation images
only; the test set is never touched here. Each run keeps its checkpoints in its own folder, so an
interrupted sweep resumes where it stopped, and its history goes into one JSON record::

    python -m capsutil.sweep capsnet-routing --runs-dir runs/sweeps --out record.json
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from capsutil import runtime
from capsutil.affine_mnist import centre, expand
from capsutil.checkpoints import load_checkpoint
from capsutil.data import Digits, load_mnist, split_validation
from capsutil.matrix_init import start_half_active
from capsutil.models import build_loss, build_model
from capsutil.train import CHECKPOINT_NAME, DIGIT_SHIFT, History, fit, schedule_complete

EXPANDED_SHIFT = 6                   # expanded MNIST: the official code's --shift=6 --pad=6
EXPANDED_VAL_SEED = 1                # fixed placements of the validation digits


@dataclass(frozen=True)
class Run:
    """One training run of a sweep; ``name`` names its folder and its entry in the record."""

    name: str
    model: str
    config: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    init: str = "default"                    # "half-active": capsutil.matrix_init (matrix only)
    seed: int = 0
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay: float = 0.9
    data: str = "mnist"                      # or "expanded"
    checkpoint_every: int | None = None      # steps; None: a checkpoint after each epoch only
    max_steps: int | None = None             # a budget in steps, when shorter than the epochs
    val_every: int | None = None             # steps between validation checks within an epoch


def _seeds(name: str, seeds=(0, 1, 2), **settings) -> list[Run]:
    return [Run(f"{name}-seed{seed}", seed=seed, **settings) for seed in seeds]


# At 40x40 the primary-capsule convolution has 4 times the outputs it has at 28x28, and one
# epoch of CapsNet takes hours on 2 CPU cores. The budget is fixed at 300 steps of 128 (38,400
# images, about 70% of an epoch) for both networks, checked on validation every 75 steps, so
# that training and scoring one network fit one sitting; a checkpoint every 20 steps keeps an
# interruption's loss to minutes.
EXPANDED_RECIPE = dict(epochs=1, max_steps=300, val_every=75, data="expanded",
                       checkpoint_every=20)
SMALL_MATRIX = dict(A=64, B=8, C=16, D=16, iterations=2, conv1_padding=1)
MATRIX_RECIPE = dict(model="matrix", batch_size=64, lr=0.01, lr_decay=0.8)


def _matrix_choices() -> list[Run]:
    """Chapter 08's training choices, one change at a time from the repaired network, 3 seeds,
    one epoch each; the two iteration counts end at the same inverse temperature."""
    base = dict(MATRIX_RECIPE, config=dict(SMALL_MATRIX, last_inverse_temperature=0.1),
                init="half-active")
    changes = {"base": {},
               "3-iterations": dict(config=dict(base["config"], iterations=3)),
               "detached": dict(config=dict(base["config"], detach_intermediate=True)),
               "fan-in-start": dict(init="default"),
               "beta-u-0": dict(config=dict(base["config"], beta_u_init=0.0)),
               "no-coordinate-addition": dict(config=dict(base["config"],
                                                          coordinate_addition=False))}
    return [run for name, change in changes.items() for run in _seeds(name, **{**base, **change})]


def _capsnet_routing() -> list[Run]:
    """The paper's Table 1 in small: 1 (uniform couplings) or 3 routing iterations, with and
    without the reconstruction loss, 3 seeds, 3 epochs of the shipped recipe each."""
    runs = []
    for iterations in (1, 3):
        for scale, label in ((0.0005, "reconstruction"), (0.0, "no-reconstruction")):
            runs += _seeds(f"routing{iterations}-{label}", model="capsnet", epochs=3,
                           config=dict(routing_iterations=iterations),
                           loss=dict(reconstruction_scale=scale))
    return runs


SWEEPS = {
    "matrix-choices": _matrix_choices,
    "capsnet-routing": _capsnet_routing,
    "baselines": lambda: [Run("cnn_capsnet", "cnn_capsnet", epochs=20),
                          Run("cnn_small", "cnn_small", epochs=24, batch_size=64, lr=0.01,
                              lr_decay=0.8)],
    "expanded": lambda: [Run(f"{model}-expanded", model, dict(image_size=40), **EXPANDED_RECIPE)
                         for model in ("capsnet", "cnn_capsnet")],
}


def training_data(kind: str, root: str | None) -> tuple[Digits, Digits, int]:
    """(train, validation, max_shift) of ``kind``: "mnist" (28x28, shifts of 2 pixels) or
    "expanded" (training digits centred in 40x40 frames and shifted by up to 6 pixels at each
    step; validation digits each at a fixed random place in the frame: expanded MNIST)."""
    split = split_validation(load_mnist("train", root))
    if kind == "mnist":
        return split.train, split.val, DIGIT_SHIFT
    if kind == "expanded":             # validated like the test set: each digit placed at random
        return centre(split.train), expand(split.val, EXPANDED_VAL_SEED), EXPANDED_SHIFT
    raise ValueError(f"expected data 'mnist' or 'expanded', got {kind!r}")


def train_run(run: Run, data: tuple[Digits, Digits, int], runs_dir: Path,
              device: torch.device) -> dict:
    """Train ``run`` on ``data`` (:func:`training_data` of ``run.data``), resuming its folder
    when it holds a checkpoint, and return its record: the run's settings, its history and the
    best validation check."""
    train, val, max_shift = data
    runtime.seed_everything(run.seed)
    model = build_model(run.model, **run.config).to(device)
    run_dir = runs_dir / run.name
    resume = (run_dir / CHECKPOINT_NAME).is_file()
    if run.init == "half-active" and not resume:
        start_half_active(model, train)
    started = time.perf_counter()
    history = fit(model, build_loss(run.model, **run.loss).to(device), train, val,
                  epochs=run.epochs, batch_size=run.batch_size, lr=run.lr,
                  lr_decay=run.lr_decay, max_shift=max_shift, seed=run.seed, run_dir=run_dir,
                  checkpoint_every=run.checkpoint_every, resume=resume,
                  max_steps=run.max_steps, val_every=run.val_every, progress=False)
    step, accuracy = history.best()
    return dict(asdict(run), history=asdict(history), best_step=step,
                best_val_accuracy=accuracy, device=runtime.describe_device(device),
                seconds=round(training_seconds(history, run_dir), 1),
                seconds_this_call=round(time.perf_counter() - started, 1))


def training_seconds(history: History, run_dir: Path) -> float:
    """Wall time of a run over all its calls, training plus validation: its finished epochs
    and, when it stopped within an epoch (``max_steps``), that epoch's part."""
    within_epoch = load_checkpoint(run_dir / CHECKPOINT_NAME)["sums"]["seconds"]
    return sum(history.seconds) + within_epoch


def finished(run: Run, runs_dir: Path) -> bool:
    """True when the run's folder holds a checkpoint of all its epochs or steps."""
    path = runs_dir / run.name / CHECKPOINT_NAME
    if not path.is_file():
        return False
    checkpoint = load_checkpoint(path)
    return schedule_complete(checkpoint["epoch"], checkpoint["step"], run.epochs,
                             run.max_steps)


def setting_of(name: str) -> str:
    """The setting a run belongs to: its name without the seed, ``"base-seed2"`` -> ``"base"``."""
    return name.rsplit("-seed", 1)[0]


def summarise(record: dict) -> dict[str, dict]:
    """Per setting of a sweep ``record``, in the sweep's order: the seeds' best validation
    accuracies (``"accuracies"``), their ``"mean"`` and sample standard deviation (``"sd"``,
    0 for a single seed)."""
    groups: dict[str, list[float]] = {}
    for name, entry in record["runs"].items():
        groups.setdefault(setting_of(name), []).append(entry["best_val_accuracy"])
    return {setting: dict(accuracies=values, mean=statistics.fmean(values),
                          sd=statistics.stdev(values) if len(values) > 1 else 0.0)
            for setting, values in groups.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m capsutil.sweep",
                                     description="Run a sweep of training runs fixed in advance.")
    parser.add_argument("sweep", choices=sorted(SWEEPS))
    parser.add_argument("--runs-dir", required=True, help="one folder per run goes here")
    parser.add_argument("--out", required=True, help="the JSON record of the sweep")
    parser.add_argument("--data-root", default=None, help="MNIST root (default $CAPSUTIL_DATA)")
    parser.add_argument("--only", default="*", metavar="PATTERN",
                        help="run only the runs whose names match this shell pattern, e.g. "
                             "'*-seed1' (several processes can share a sweep this way)")
    args = parser.parse_args(argv)
    device = runtime.pick_device()
    out, record = Path(args.out), {"sweep": args.sweep, "runs": {}}
    if out.is_file():
        record = json.loads(out.read_text())
    data = {}                                    # training_data of each kind, loaded once
    for run in SWEEPS[args.sweep]():
        if not fnmatch.fnmatchcase(run.name, args.only):
            continue
        if run.name in record["runs"] and finished(run, Path(args.runs_dir)):
            continue
        if run.data not in data:
            data[run.data] = training_data(run.data, args.data_root)
        record["runs"][run.name] = train_run(run, data[run.data], Path(args.runs_dir), device)
        out.write_text(json.dumps(record, indent=1))
        print(f"{run.name}: best validation accuracy "
              f"{record['runs'][run.name]['best_val_accuracy']:.2%}", flush=True)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
