"""Training and evaluation for any registered model, with checkpoints that resume exactly.

``fit`` trains with Adam and an exponential learning-rate decay per epoch (chapter 05), shifting
training images by up to 2 pixels, and scores a validation set as it goes, keeping the weights of
the best check; ``evaluate`` gives accuracy and predictions. The test set never enters ``fit``:
it is scored once, after training (``--export`` on the command line). A model is
anything whose forward ``model(images, labels)`` returns an object with ``predictions`` (B,),
trained with a loss called as ``loss(output, images, labels)``. Labels may also hold several
classes per example, (B, 2) for MultiMNIST pairs: an example is right when all of them are. A
training set that carries more per-example targets (``train.targets(index)``, a dict, e.g. the
two digits' layers of :class:`capsutil.multimnist_capsnet.PairDigits`) has them passed to the
loss by name: ``loss(output, images, labels, **targets)``.

Exact resumption: one dedicated ``torch.Generator`` draws the shuffling order and the shifts.
A checkpoint stores the model, optimiser, scheduler, the generator's state now and at the start
of the epoch (to redraw that epoch's order), the number of batches done in the epoch and its
running sums, and the history (with every validation check, so the best so far resumes too). Resuming replays nothing and skips nothing: the weights after
N steps are the same, bit for bit on the same machine and threads, as in an uninterrupted run.

Command line (a long run can go in the background and be resumed)::

    python -m capsutil.train capsnet --epochs 20 --run-dir runs/capsnet --data-root DIR
    python -m capsutil.train capsnet --epochs 20 --run-dir runs/capsnet --data-root DIR --resume \
        --export capsutil/weights
    python -m capsutil.train matrix --config '{"A": 64, "B": 8, "C": 16, "D": 16}' ...
    python -m capsutil.train capsnet_multi --pairs 60000 ...    # trained on MultiMNIST pairs
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from capsutil import runtime
from capsutil.checkpoints import (WEIGHTS_SUFFIX, RunDirectoryInUse, claimed_run_directory,
                                  export, load_checkpoint, rebuild, save_checkpoint)
from capsutil.data import Digits, load_mnist, random_shift, split_validation, to_float
from capsutil.classifier import predict_in_batches
from capsutil.matrix_init import start_half_active
from capsutil.models import MODELS, build_loss, build_model
from capsutil.multimnist_capsnet import DEFAULT_PAIRS, pair_splits, pairs_of_test_digits
from capsutil.stats import Accuracy

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
DIGIT_SHIFT = 2                       # pixels: training digits are shifted by up to this
RECIPE_KEYS = ("batch_size", "lr", "lr_decay", "max_shift", "seed", "train_size", "val_size",
               "loss")


@dataclass
class History:
    """One entry per finished epoch: mean training loss, training accuracy (on the shifted
    images, as seen during the epoch), validation accuracy (None without a validation set),
    learning rate used, and wall time in seconds (training plus validation).

    ``val_step`` and ``val_check`` list every validation check (after each epoch, and every
    ``val_every`` steps when asked): the step it was made after and the accuracy measured.
    """

    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_check: list[float] = field(default_factory=list)

    def append(self, **row) -> None:
        for key, value in row.items():
            getattr(self, key).append(value)

    def best(self) -> tuple[int, float] | None:
        """(step, accuracy) of the first check with the highest validation accuracy; None
        without checks. Ties go to the earlier check."""
        if not self.val_check:
            return None
        top = max(range(len(self.val_check)), key=lambda i: (self.val_check[i], -i))
        return self.val_step[top], self.val_check[top]

    def __len__(self) -> int:
        return len(self.epoch)


@dataclass
class Evaluation:
    """Accuracy on a split, with the predictions (N,) and true labels (N,) for confusion matrices."""

    accuracy: float
    predictions: torch.Tensor
    labels: torch.Tensor

    @property
    def score(self) -> Accuracy:
        """The number right out of the number scored, printed with its 95% interval."""
        return Accuracy(count_correct(self.predictions, self.labels), len(self.labels))

    def confusion_matrix(self, n_classes: int = 10) -> torch.Tensor:
        """Counts (n_classes, n_classes): row = true class, column = predicted class."""
        index = self.labels * n_classes + self.predictions
        return torch.bincount(index, minlength=n_classes**2).reshape(n_classes, n_classes)


def adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where the device has one (same update, fewer passes)."""
    device = next(model.parameters()).device
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        except RuntimeError:  # torch too old for a fused CPU Adam
            pass
    return torch.optim.Adam(model.parameters(), lr=lr)


def count_correct(predictions: torch.Tensor, labels: torch.Tensor) -> int:
    """The number of examples whose predictions all equal their labels: (N,) or (N, 2) each
    (two classes per example, both right; sorted alike, e.g. MultiMNIST pairs)."""
    return int((predictions == labels).reshape(len(labels), -1).all(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, digits: Digits, batch_size: int = 500) -> Evaluation:
    """Accuracy and predictions of ``model`` on ``digits`` (no shifts), in eval mode.

    The model's training/eval mode is restored afterwards.
    """
    predictions = predict_in_batches(model, digits.images, batch_size, prepare=to_float)  # (N,)
    accuracy = count_correct(predictions, digits.labels) / max(len(digits), 1)
    return Evaluation(accuracy, predictions, digits.labels.clone())


def _check_fit_arguments(epochs, batch_size, lr, lr_decay, max_shift, checkpoint_every,
                         val_every, max_steps) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected a positive integer {name}, got {value!r}")
    for name, value in (("checkpoint_every", checkpoint_every), ("val_every", val_every),
                        ("max_steps", max_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"expected {name} to be None or a positive integer, got {value!r}")
    if not lr > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"expected lr > 0 and 0 < lr_decay <= 1, got lr {lr!r}, lr_decay {lr_decay!r}")
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"expected a non-negative integer max_shift, got {max_shift!r}")


def _targets(data: Digits, index: torch.Tensor,
             device: torch.device) -> dict[str, torch.Tensor]:
    """The extra per-example targets of the examples ``index`` that ``data`` carries
    (``data.targets(index)``), on ``device``; none for plain :class:`Digits`."""
    targets = getattr(data, "targets", None)
    return {} if targets is None else {k: v.to(device) for k, v in targets(index).items()}


def _check_resumable(checkpoint: dict, path: Path, model: nn.Module, recipe: dict) -> None:
    name = getattr(model, "model_name", None)
    if checkpoint["model"] != name or checkpoint["config"] != getattr(model, "config", None):
        raise ValueError(f"checkpoint {path} holds model {checkpoint['model']!r} with config "
                         f"{checkpoint['config']}, not {name!r} with {getattr(model, 'config', None)}")
    differ = [f"{k}: checkpoint {checkpoint['recipe'].get(k)!r}, now {recipe[k]!r}"
              for k in RECIPE_KEYS if checkpoint["recipe"].get(k) != recipe[k]]
    if differ:
        raise ValueError(f"cannot resume {path} with a different recipe ({'; '.join(differ)})")


def _epoch_order(generator: torch.Generator, epoch_start_rng: torch.Tensor, n: int,
                 mid_epoch: bool) -> torch.Tensor:
    """The epoch's shuffled order (n,), drawn from the generator's state at the epoch's start.

    At the start of an epoch this simply draws it; when resuming ``mid_epoch`` it redraws the
    same order and puts the generator back where it was, so the shifts continue unchanged.
    """
    now = generator.get_state()
    generator.set_state(epoch_start_rng)
    order = torch.randperm(n, generator=generator)
    if mid_epoch:
        generator.set_state(now)
    return order


def _file_sizes(model: nn.Module) -> dict[str, int]:
    """About how large a run's files get: the checkpoint holds the weights and Adam's two
    moments of each, the best checkpoint the weights alone."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {CHECKPOINT_NAME: 3 * weights, BEST_NAME: weights}


class NonFiniteTraining(FloatingPointError):
    """A training step met a NaN or infinite loss or gradient; the message names the step."""


def _check_finite_step(model: nn.Module, loss: float, step: int, path: Path | None,
                       saved_step: int | None) -> None:
    """Raise :class:`NonFiniteTraining` naming ``step`` when the loss or a gradient of ``model``
    is NaN or infinite, saying that the checkpoint ``path`` of ``saved_step`` is kept."""
    if not math.isfinite(loss):
        raise NonFiniteTraining(f"step {step}: the loss is {loss}; training stopped before this "
                                f"step's update, {_kept(path, saved_step)}")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
        name = next(n for n, p in model.named_parameters()
                    if p.grad is not None and not bool(p.grad.isfinite().all()))
        raise NonFiniteTraining(f"step {step}: the gradient of {name} holds NaN or infinite "
                                f"values; training stopped before this step's update, "
                                f"{_kept(path, saved_step)}")


def _kept(path: Path | None, saved_step: int | None) -> str:
    """What a stopped run keeps, in words: its last checkpoint, untouched."""
    if path is None:
        return "and without a run_dir no checkpoint was written"
    if saved_step is None:
        return f"before its first checkpoint: no {path} was written"
    return f"the last good checkpoint {path} (step {saved_step}) is untouched"


def schedule_complete(epoch: int, step: int, epochs: int, max_steps: int | None) -> bool:
    """True when a run has trained all its ``epochs`` or reached its ``max_steps`` budget."""
    return epoch >= epochs or (max_steps is not None and step >= max_steps)


def fit(model: nn.Module, loss_fn: nn.Module, train: Digits, val: Digits | None = None, *,
        epochs: int, batch_size: int = 128, lr: float = 1e-3, lr_decay: float = 0.9,
        max_shift: int = DIGIT_SHIFT, seed: int = 0, run_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None, resume: bool = False,
        val_every: int | None = None, max_steps: int | None = None, compile: bool = False,
        progress: bool = True) -> History:
    """Train ``model`` in place with Adam (``lr``, times ``lr_decay`` after each epoch).

    Each epoch draws a fresh order of ``train`` and shifts every image by up to ``max_shift``
    pixels (training images only), both from one generator seeded with ``seed``; a training set
    with per-example ``targets`` (see the module's docstring) is not shifted: it needs
    ``max_shift=0``. ``val`` is
    scored after every epoch (and every ``val_every`` steps when given); with ``run_dir`` the
    weights of the best check so far go to ``run_dir/best.pt`` (see :meth:`History.best`). There
    is no test set here: choose with ``val``, then score the test set once, after training.

    After each epoch (and every ``checkpoint_every`` steps) a checkpoint goes to
    ``run_dir/checkpoint.pt``; ``resume=True`` continues from it exactly, also mid-epoch, and
    ``epochs`` may then be larger than first planned. ``max_steps`` stops after that many steps
    in all (checkpointing first). ``compile`` applies :func:`capsutil.runtime.compile_model`.
    On the CPU, :func:`capsutil.runtime.keep_freed_memory` is switched on. Shows one tqdm bar
    and prints one line per epoch when ``progress``. Returns the :class:`History`, also stored
    in every checkpoint.

    Before any training, ``run_dir`` is created and checked (writable, with room for its
    checkpoints) and locked, so that a second run on the same folder refuses to start
    (``RunDirectoryInUse``) until this one ends; temporary files of an interrupted save are
    removed (see :func:`capsutil.checkpoints.claimed_run_directory`). A NaN or infinite loss or
    gradient stops training before that step's update with :class:`NonFiniteTraining`, which
    names the step; the last checkpoint written stays as it was.
    """
    _check_fit_arguments(epochs, batch_size, lr, lr_decay, max_shift, checkpoint_every,
                         val_every, max_steps)
    if max_shift and hasattr(train, "targets"):
        raise ValueError(f"the training set carries per-example targets "
                         f"({type(train).__name__}.targets) that a shift of the images would "
                         f"not follow; train it with max_shift=0, got {max_shift}")
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir that holds the checkpoint")
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay,
                    max_shift=max_shift, seed=seed, checkpoint_every=checkpoint_every,
                    resume=resume, val_every=val_every, max_steps=max_steps, compile=compile,
                    progress=progress)
    if run_dir is None:
        return _train(model, loss_fn, train, val, **settings)
    with claimed_run_directory(run_dir, _file_sizes(model)):
        return _train(model, loss_fn, train, val, run_dir=Path(run_dir), **settings)


def _train(model: nn.Module, loss_fn: nn.Module, train: Digits, val: Digits | None, *,
           epochs: int, batch_size: int, lr: float, lr_decay: float, max_shift: int, seed: int,
           checkpoint_every: int | None, resume: bool, val_every: int | None,
           max_steps: int | None, compile: bool, progress: bool,
           run_dir: Path | None = None) -> History:
    """The training loop of :func:`fit`, on checked arguments and a claimed ``run_dir``."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        runtime.keep_freed_memory()
    path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    if path is not None and not resume and path.exists():
        raise FileExistsError(f"{path} already exists; pass resume=True to continue that run "
                              f"or choose another run_dir")
    recipe = dict(batch_size=batch_size, lr=lr, lr_decay=lr_decay, max_shift=max_shift,
                  seed=seed, train_size=len(train), val_size=len(val) if val is not None else 0,
                  epochs=epochs, data=train.source, loss=dict(getattr(loss_fn, "config", {})))
    optimizer = adam(model, lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    generator = torch.Generator().manual_seed(seed)
    history, epoch, step, batch = History(), 0, 0, 0
    sums = dict(loss=0.0, correct=0, seen=0, seconds=0.0)       # running sums of the epoch
    epoch_start_rng = generator.get_state()
    saved_step = None                                 # the step of the last checkpoint written
    trained_on = []                  # the devices of the run's earlier stretches, oldest first
    if resume:
        checkpoint = load_checkpoint(path, map_location=device)
        _check_resumable(checkpoint, path, model, recipe)
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        scheduler.load_state_dict(checkpoint["scheduler_state"])
        if isinstance(loss_fn, nn.Module):
            loss_fn.load_state_dict(checkpoint["loss_state"])
        torch.set_rng_state(checkpoint["torch_rng"].cpu())
        generator.set_state(checkpoint["generator_rng"].cpu())
        epoch_start_rng = checkpoint["epoch_start_rng"].cpu()
        history = History(**checkpoint["history"])
        epoch, step, batch, sums = (checkpoint["epoch"], checkpoint["step"], checkpoint["batch"],
                                    checkpoint["sums"])
        saved_step = step
        trained_on = list(checkpoint.get("trained_on", []))
        if epochs < epoch + (batch > 0):
            raise ValueError(f"checkpoint {path} is already {epoch} epochs and {batch} batches "
                             f"in; ask for at least {epoch + (batch > 0)} epochs")
    if compile:
        runtime.compile_model(model)
    n_batches = math.ceil(len(train) / batch_size)
    here, first_step = runtime.describe_device(device), step

    def devices() -> list[str]:
        """Every device that trained this run so far, this one once it has taken a step."""
        trained_here = step > first_step and here not in trained_on
        return trained_on + [here] if trained_here else trained_on

    def save() -> None:
        nonlocal saved_step
        if path is not None:
            save_checkpoint(dict(
                model=getattr(model, "model_name", None), config=getattr(model, "config", None),
                model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                loss_state=loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {},
                torch_rng=torch.get_rng_state(), generator_rng=generator.get_state(),
                epoch_start_rng=epoch_start_rng, history=asdict(history), recipe=recipe,
                epoch=epoch, step=step, batch=batch, sums=sums, trained_on=devices()), path)
            saved_step = step

    def validate() -> float:
        """Score ``val``, log the check, and keep the weights when they are the best so far."""
        accuracy = evaluate(model, val).accuracy
        history.append(val_step=step, val_check=accuracy)
        if run_dir is not None and history.best()[0] == step:
            save_checkpoint(dict(model=getattr(model, "model_name", None),
                                 config=getattr(model, "config", None),
                                 model_state=model.state_dict(), step=step,
                                 epoch=step / n_batches, val_accuracy=accuracy,
                                 recipe=recipe), run_dir / BEST_NAME)
        return accuracy

    model.train()
    while not schedule_complete(epoch, step, epochs, max_steps):
        if batch == 0:
            epoch_start_rng = generator.get_state()
        order = _epoch_order(generator, epoch_start_rng, len(train), mid_epoch=batch > 0)
        started = time.perf_counter() - sums["seconds"]
        bar = tqdm(total=n_batches, initial=batch, desc=f"epoch {epoch + 1}/{epochs}",
                   unit="batch", disable=not progress, leave=True)
        while batch < n_batches:
            index = order[batch * batch_size:(batch + 1) * batch_size]
            images = random_shift(to_float(train.images[index]), max_shift, generator=generator)
            images, labels = images.to(device), train.labels[index].to(device)
            targets = _targets(train, index, device)
            optimizer.zero_grad(set_to_none=True)
            output = model(images, labels)
            loss = loss_fn(output, images, labels, **targets)
            loss_value = loss.item()
            loss.backward()
            _check_finite_step(model, loss_value, step + 1, path, saved_step)
            optimizer.step()
            sums["loss"] += loss_value * len(labels)
            sums["correct"] += count_correct(output.predictions, labels)
            sums["seen"] += len(labels)
            batch, step = batch + 1, step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}",
                            acc=f"{sums['correct'] / sums['seen']:.4f}", refresh=False)
            if batch == n_batches:
                break                       # the end of an epoch is validated and saved below
            if val is not None and val_every and step % val_every == 0:
                validate()
            stop = schedule_complete(epoch, step, epochs, max_steps)
            if stop or (checkpoint_every and step % checkpoint_every == 0):
                sums["seconds"] = time.perf_counter() - started
                save()
            if stop:
                bar.close()
                return history
        bar.close()
        val_accuracy = validate() if val is not None else None
        history.append(epoch=epoch + 1, loss=sums["loss"] / sums["seen"],
                       train_accuracy=sums["correct"] / sums["seen"], val_accuracy=val_accuracy,
                       lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - started)
        scheduler.step()
        epoch, batch = epoch + 1, 0
        sums = dict(loss=0.0, correct=0, seen=0, seconds=0.0)
        save()
        if progress:
            print(_epoch_line(history, epochs))
    return history


def _epoch_line(history: History, epochs: int) -> str:
    """``epoch 3/20: loss 0.0312, train 98.84%, val 99.10% (best), lr 8.10e-04, 540.2 s``."""
    val = history.val_accuracy[-1]
    best = history.best()
    checked = "" if val is None else (
        f", val {val:.2%}" + (" (best)" if best[0] == history.val_step[-1] else ""))
    return (f"epoch {history.epoch[-1]}/{epochs}: loss {history.loss[-1]:.4f}, "
            f"train {history.train_accuracy[-1]:.2%}{checked}, lr {history.lr[-1]:.2e}, "
            f"{history.seconds[-1]:.1f} s")


def load_selected(model: nn.Module, run_dir: str | os.PathLike, select: str = "best") -> dict:
    """Load into ``model`` the weights a finished run ships, and say which they are.

    ``select="best"`` takes ``run_dir/best.pt``, the check with the highest validation accuracy;
    ``"last"`` the weights of ``run_dir/checkpoint.pt``. Returns ``{"select", "step", "epoch",
    "val_accuracy"}`` (the last two None when unknown).
    """
    if select not in ("best", "last"):
        raise ValueError(f"expected select to be 'best' or 'last', got {select!r}")
    run_dir = Path(run_dir)
    last = load_checkpoint(run_dir / CHECKPOINT_NAME)
    n_batches = math.ceil(last["recipe"]["train_size"] / last["recipe"]["batch_size"])
    if select == "last":
        model.load_state_dict(last["model_state"])
        history = History(**last["history"])
        checked = history.val_step and history.val_step[-1] == last["step"]
        return dict(select="last", step=last["step"], epoch=last["step"] / n_batches,
                    val_accuracy=history.val_check[-1] if checked else None)
    if not (run_dir / BEST_NAME).is_file():
        raise FileNotFoundError(f"{run_dir / BEST_NAME} not found: no validation check has run "
                                f"yet, or the run has no validation set; train on, or select "
                                f"the last weights instead")
    best = load_checkpoint(run_dir / BEST_NAME)
    if best["config"] != getattr(model, "config", None):
        raise ValueError(f"{run_dir / BEST_NAME} holds config {best['config']}, "
                         f"not {getattr(model, 'config', None)}")
    model.load_state_dict(best["model_state"])
    return dict(select="best", step=best["step"], epoch=best["epoch"],
                val_accuracy=best["val_accuracy"])


def export_run(model: nn.Module, history: History, recipe: dict, test: Digits,
               directory: str | os.PathLike, trained_on: str, *, selected: dict,
               split: dict | None = None) -> tuple[Path, Accuracy]:
    """Export ``model`` in float16 and score the test set once, with the exported weights.

    The record beside the weights holds the ``recipe``, the validation ``split`` (see
    :meth:`capsutil.data.ValidationSplit.record`), the per-epoch history, which weights were
    ``selected`` (see :func:`load_selected`), the device they were trained on (``trained_on``,
    e.g. ``runtime.describe_device(device)``) and the test accuracy of the float16-rounded
    weights with its 95% interval. Returns the JSON path and that test score.
    """
    rounded = rebuild(model.model_name, model.config,
                      {k: v.half() if v.is_floating_point() else v
                       for k, v in model.state_dict().items()})
    score = evaluate(rounded, test).score
    metrics = {"test_accuracy": score.value, "test_correct": score.correct,
               "test_size": score.n, "test_interval_95": list(score.interval),
               "test_data": test.source, "split": split, "selected": selected,
               "epochs": len(history), "train_seconds": round(sum(history.seconds), 1),
               "trained_on": trained_on, "history": asdict(history)}
    return export(model, directory, recipe=recipe, metrics=metrics), score


def _model_options(name: str) -> str:
    """The constructor arguments of model ``name`` with their defaults, one per line."""
    signature = inspect.signature(MODELS[name].model)
    return "\n".join(f"  {parameter.name} = {parameter.default!r}"
                     for parameter in signature.parameters.values()
                     if parameter.default is not inspect.Parameter.empty)


def _json_object(text: str) -> dict:
    """``--config``'s value: a JSON object, or an error that says what was wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at character {err.pos}): "
                                         f"{text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"A\": 64}}', "
                                         f"got {text!r}")
    return value


def _training_options() -> argparse.ArgumentParser:
    """The options every model's command shares (a parent parser, without help of its own)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--epochs", type=int, required=True, help="epochs to train in all")
    options.add_argument("--run-dir", required=True, help="where checkpoint.pt and best.pt go")
    options.add_argument("--data-root", default=None, help="MNIST root (default $CAPSUTIL_DATA)")
    options.add_argument("--config", type=_json_object, default={}, metavar="JSON",
                         help="model constructor arguments (listed below), as a JSON object")
    options.add_argument("--loss", type=_json_object, default={}, metavar="JSON",
                         help="options of the model's loss, as a JSON object, e.g. "
                              "'{\"reconstruction_scale\": 0}' for capsnet")
    options.add_argument("--init", choices=("default", "half-active"), default="default",
                         help="matrix only: half-active rescales each routed layer so that "
                              "about half its capsules start active (capsutil.matrix_init)")
    options.add_argument("--resume", action="store_true", help="continue run-dir's checkpoint")
    options.add_argument("--batch-size", type=int, default=128, help="images per step")
    options.add_argument("--lr", type=float, default=1e-3, help="Adam's first learning rate")
    options.add_argument("--lr-decay", type=float, default=0.9, help="factor per epoch")
    options.add_argument("--val-size", type=int, default=None,
                         help="training images held out for validation (default 1/12 of the "
                              "training set: 5,000 of MNIST's 60,000); 0 for none")
    options.add_argument("--val-every", type=int, default=None, metavar="STEPS",
                         help="also validate every STEPS steps (always after each epoch)")
    options.add_argument("--select", choices=("best", "last"), default="best",
                         help="which weights --export ships: the best validation check or the "
                              "last")
    options.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                         help="also checkpoint every STEPS steps (always after each epoch)")
    options.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    options.add_argument("--seed", type=int, default=0, help="seeds the order, shifts and weights")
    options.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    options.add_argument("--eager", action="store_true", help="do not use torch.compile")
    options.add_argument("--export", default=None, metavar="DIR",
                         help="after training, export float16 weights and their JSON to DIR")
    return options


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option, and the epilog's lines kept as written."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m capsutil.train", formatter_class=_HelpFormatter,
        description="Train a registered model on MNIST, choosing its weights on a validation\n"
                    "split of the training set; the test set is scored once, at --export.\n"
                    "`python -m capsutil.train MODEL --help` lists a model's options.")
    models = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    shared = _training_options()
    for name in sorted(MODELS):
        command = models.add_parser(name, parents=[shared], formatter_class=_HelpFormatter,
                                    help=f"train {name}", description=f"Train the {name} model.",
                                    epilog=f"--config keys of {name}, with their defaults:\n"
                                           f"{_model_options(name)}")
        if _trained_on_pairs(name):
            command.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, metavar="N",
                                 help="MultiMNIST training pairs, drawn once from the training "
                                      "digits with --seed; validation and test pairs: one per "
                                      "digit of their split")
    return parser


def _trained_on_pairs(name: str) -> bool:
    """Whether model ``name`` learns from MultiMNIST pairs instead of single digits."""
    return getattr(MODELS[name].model, "trained_on_pairs", False)


def main(argv: list[str] | None = None) -> History:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.select == "best" and args.val_size == 0:
        parser.error("--select best needs a validation set; give --val-size > 0 or --select last")
    try:
        return _train_and_export(args)
    except (ValueError, OSError, RunDirectoryInUse, NonFiniteTraining) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def _start_half_active(model: nn.Module, train: Digits) -> None:
    """``--init half-active``: :func:`capsutil.matrix_init.start_half_active`, then one line
    with the shares of active capsules."""
    if model.model_name != "matrix":
        raise ValueError(f"--init half-active is for the matrix model, not {model.model_name!r}")
    shares = ", ".join(f"{name} {share:.0%}"
                       for name, share in start_half_active(model, train).items())
    print(f"half-active start: active capsules {shares}")


def _trained_on(checkpoint: dict, device: torch.device) -> str:
    """The devices a run was trained on, as its checkpoint lists them; for a checkpoint written
    before they were listed, the device of this process."""
    return "; ".join(checkpoint.get("trained_on") or [runtime.describe_device(device)])


def _train_and_export(args: argparse.Namespace) -> History:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = runtime.setup(seed=args.seed)
    official = load_mnist("train", args.data_root)
    split = split_validation(official, args.val_size) if args.val_size != 0 else None
    train, val = (split.train, split.val) if split is not None else (official, None)
    pairs = _trained_on_pairs(args.model)
    if pairs:                                      # drawn once; fit shifts them no further
        if args.pairs < 1:
            raise ValueError(f"expected --pairs as a positive integer, got {args.pairs}")
        train, val = pair_splits(train, val, args.pairs, args.seed)
    model = build_model(args.model, **args.config).to(device)
    loss_fn = build_loss(args.model, **args.loss).to(device)
    if args.init == "half-active" and not args.resume:
        _start_half_active(model, train)
    history = fit(model, loss_fn, train, val, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, lr_decay=args.lr_decay, max_shift=0 if pairs else DIGIT_SHIFT,
                  seed=args.seed, run_dir=args.run_dir, checkpoint_every=args.checkpoint_every,
                  resume=args.resume, val_every=args.val_every, max_steps=args.max_steps,
                  compile=not args.eager)
    checkpoint = load_checkpoint(Path(args.run_dir) / CHECKPOINT_NAME)
    test = load_mnist("test", args.data_root) if args.export is not None else None
    if pairs and test is not None:
        test = pairs_of_test_digits(test)
    runtime.provenance(n_train=len(train), n_val=len(val) if val is not None else 0,
                       n_test=len(test) if test is not None else 0, device=device,
                       epochs=checkpoint["step"] / math.ceil(len(train) / args.batch_size),
                       seconds=sum(history.seconds) + checkpoint["sums"]["seconds"],
                       data=train.source)
    if args.export is not None:
        selected = load_selected(model, args.run_dir, args.select)
        json_path, score = export_run(
            model, history, dict(checkpoint["recipe"], init=args.init), test, args.export,
            trained_on=_trained_on(checkpoint, device), selected=selected,
            split=split.record() if split is not None else None)
        print(f"selected: {args.select} weights, epoch {selected['epoch']:g}; "
              f"test set, scored once: {score}")
        print(f"exported {json_path.with_suffix(WEIGHTS_SUFFIX).name} and {json_path.name} to "
              f"{args.export}")
    return history


if __name__ == "__main__":
    main(sys.argv[1:])
