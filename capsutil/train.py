"""Training and evaluation for any registered model, with checkpoints that resume exactly.

``fit`` trains with Adam and an exponential learning-rate decay per epoch (chapter 05), shifting
training images by up to 2 pixels; ``evaluate`` gives accuracy and predictions. A model is
anything whose forward ``model(images, labels)`` returns an object with ``predictions`` (B,),
trained with a loss called as ``loss(output, images, labels)``.

Exact resumption: one dedicated ``torch.Generator`` draws the shuffling order and the shifts.
A checkpoint stores the model, optimiser, scheduler, the generator's state now and at the start
of the epoch (to redraw that epoch's order), the number of batches done in the epoch and its
running sums, and the history. Resuming replays nothing and skips nothing: the weights after
N steps are the same, bit for bit on the same machine and threads, as in an uninterrupted run.

Command line (a long run can go in the background and be resumed)::

    python -m capsutil.train capsnet --epochs 30 --run-dir runs/capsnet --data-root DIR
    python -m capsutil.train capsnet --epochs 30 --run-dir runs/capsnet --data-root DIR --resume
    python -m capsutil.train matrix --config '{"A": 64, "B": 8, "C": 16, "D": 16}' ...
"""
from __future__ import annotations

import argparse
import ctypes
import functools
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
from capsutil.checkpoints import export, load_checkpoint, rebuild, save_checkpoint
from capsutil.data import Digits, load_mnist, random_shift, to_float
from capsutil.models import MODELS, build_loss, build_model, predict_in_batches

CHECKPOINT_NAME = "checkpoint.pt"
RECIPE_KEYS = ("batch_size", "lr", "lr_decay", "max_shift", "seed", "train_size")


@dataclass
class History:
    """One entry per finished epoch: mean training loss, training accuracy (on the shifted
    images, as seen during the epoch), test accuracy (None when not evaluated that epoch),
    learning rate used, and wall time in seconds (training plus evaluation)."""

    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def append(self, **row) -> None:
        for key, value in row.items():
            getattr(self, key).append(value)

    def __len__(self) -> int:
        return len(self.epoch)


@dataclass
class Evaluation:
    """Accuracy on a split, with the predictions (N,) and true labels (N,) for confusion matrices."""

    accuracy: float
    predictions: torch.Tensor
    labels: torch.Tensor

    def confusion_matrix(self, n_classes: int = 10) -> torch.Tensor:
        """Counts (n_classes, n_classes): row = true class, column = predicted class."""
        index = self.labels * n_classes + self.predictions
        return torch.bincount(index, minlength=n_classes**2).reshape(n_classes, n_classes)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the system.

    Training allocates and frees tensors of tens of megabytes every step; by default glibc maps
    each with ``mmap`` and unmaps it on free, so every step pays page faults on fresh memory
    (on a 2-core CPU this costs about a quarter of CapsNet's step time). With ``mmap`` off for
    allocations and a high trim threshold the memory is reused. It changes no result. Returns
    False where the C library is not glibc (nothing is changed there).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4                      # mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


@functools.cache
def compile_works(device_type: str = "cpu") -> bool:
    """Whether ``torch.compile`` works on this device type here (a tiny function is compiled).

    It needs a C++ compiler on the CPU (Triton on CUDA); when it fails, one line says so.
    """
    try:
        torch.compile(lambda x: torch.softmax(x, 0) * 2)(torch.ones(2, device=device_type))
        return True
    except Exception as err:  # any backend failure means eager mode
        print(f"capsutil.train: torch.compile is unavailable here ({type(err).__name__}); "
              f"running eagerly")
        return False


def compile_model(model: nn.Module) -> bool:
    """Compile in place the parts a model lists in ``compiled_parts`` with ``torch.compile``.

    CapsNet lists its digit capsules: the routing's softmax, products and sums fuse into a few
    loops. The maths is unchanged (sums may be reordered in the last bits); the state dict keeps
    its keys. Where :func:`compile_works` is False, or the model lists no parts, the model stays
    eager. Returns True when something was compiled.
    """
    parts = getattr(model, "compiled_parts", ())
    if not parts or not compile_works(next(model.parameters()).device.type):
        return False
    for name in parts:
        model.get_submodule(name).compile()
    return True


def adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where the device has one (same update, fewer passes)."""
    device = next(model.parameters()).device
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        except RuntimeError:  # torch too old for a fused CPU Adam
            pass
    return torch.optim.Adam(model.parameters(), lr=lr)


@torch.no_grad()
def evaluate(model: nn.Module, digits: Digits, batch_size: int = 500) -> Evaluation:
    """Accuracy and predictions of ``model`` on ``digits`` (no shifts), in eval mode.

    The model's training/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"expected a positive batch size, got {batch_size}")
    predictions = predict_in_batches(model, digits.images, batch_size, prepare=to_float)  # (N,)
    accuracy = int((predictions == digits.labels).sum()) / max(len(digits), 1)
    return Evaluation(accuracy, predictions, digits.labels.clone())


def _check_fit_arguments(epochs, batch_size, lr, lr_decay, max_shift, checkpoint_every,
                         eval_every, max_steps) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_every", eval_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"expected a positive integer {name}, got {value!r}")
    for name, value in (("checkpoint_every", checkpoint_every), ("max_steps", max_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"expected {name} to be None or a positive integer, got {value!r}")
    if not lr > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"expected lr > 0 and 0 < lr_decay <= 1, got lr {lr!r}, lr_decay {lr_decay!r}")
    if not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"expected a non-negative integer max_shift, got {max_shift!r}")


def _check_resumable(checkpoint: dict, path: Path, model: nn.Module, recipe: dict) -> None:
    name = getattr(model, "model_name", None)
    if checkpoint["model"] != name or checkpoint["config"] != getattr(model, "config", None):
        raise ValueError(f"checkpoint {path} holds model {checkpoint['model']!r} with config "
                         f"{checkpoint['config']}, not {name!r} with {getattr(model, 'config', None)}")
    differ = [f"{k}: checkpoint {checkpoint['recipe'][k]!r}, now {recipe[k]!r}"
              for k in RECIPE_KEYS if checkpoint["recipe"][k] != recipe[k]]
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


def fit(model: nn.Module, loss_fn: nn.Module, train: Digits, test: Digits | None = None, *,
        epochs: int, batch_size: int = 128, lr: float = 1e-3, lr_decay: float = 0.9,
        max_shift: int = 2, seed: int = 0, run_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None, resume: bool = False, eval_every: int = 1,
        max_steps: int | None = None, compile: bool = False, progress: bool = True) -> History:
    """Train ``model`` in place with Adam (``lr``, times ``lr_decay`` after each epoch).

    Each epoch draws a fresh order of ``train`` and shifts every image by up to ``max_shift``
    pixels (training images only), both from one generator seeded with ``seed``. After each
    epoch (and every ``checkpoint_every`` steps) a checkpoint goes to ``run_dir/checkpoint.pt``;
    ``resume=True`` continues from it exactly, also mid-epoch, and ``epochs`` may then be larger
    than first planned. ``max_steps`` stops after that many steps in all (checkpointing first).
    ``test`` is evaluated every ``eval_every`` epochs and after the last. ``compile`` applies
    :func:`compile_model`. On the CPU, :func:`keep_freed_memory` is switched on. Shows one tqdm
    bar and prints one line per epoch when ``progress``. Returns the :class:`History`, also
    stored in every checkpoint.
    """
    _check_fit_arguments(epochs, batch_size, lr, lr_decay, max_shift, checkpoint_every,
                         eval_every, max_steps)
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()
    path = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    if resume and path is None:
        raise ValueError("resume=True needs the run_dir that holds the checkpoint")
    if path is not None and not resume and path.exists():
        raise FileExistsError(f"{path} already exists; pass resume=True to continue that run "
                              f"or choose another run_dir")
    recipe = dict(batch_size=batch_size, lr=lr, lr_decay=lr_decay, max_shift=max_shift,
                  seed=seed, train_size=len(train), epochs=epochs, data=train.source)
    optimizer = adam(model, lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    generator = torch.Generator().manual_seed(seed)
    history, epoch, step, batch = History(), 0, 0, 0
    sums = dict(loss=0.0, correct=0, seen=0, seconds=0.0)       # running sums of the epoch
    epoch_start_rng = generator.get_state()
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
        if epochs < epoch + (batch > 0):
            raise ValueError(f"checkpoint {path} is already {epoch} epochs and {batch} batches "
                             f"in; ask for at least {epoch + (batch > 0)} epochs")
    if compile:
        compile_model(model)

    def save() -> None:
        if path is not None:
            save_checkpoint(dict(
                model=getattr(model, "model_name", None), config=getattr(model, "config", None),
                model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                loss_state=loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {},
                torch_rng=torch.get_rng_state(), generator_rng=generator.get_state(),
                epoch_start_rng=epoch_start_rng, history=asdict(history), recipe=recipe,
                epoch=epoch, step=step, batch=batch, sums=sums), path)

    n_batches = math.ceil(len(train) / batch_size)
    model.train()
    while epoch < epochs:
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
            optimizer.zero_grad(set_to_none=True)
            output = model(images, labels)
            loss = loss_fn(output, images, labels)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item() * len(labels)
            sums["correct"] += (output.predictions == labels).sum().item()
            sums["seen"] += len(labels)
            batch, step = batch + 1, step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}",
                            acc=f"{sums['correct'] / sums['seen']:.4f}", refresh=False)
            stop = max_steps is not None and step >= max_steps
            if batch < n_batches and (stop or (checkpoint_every and step % checkpoint_every == 0)):
                sums["seconds"] = time.perf_counter() - started
                save()                      # mid-epoch; the end of an epoch is saved below
            if stop and batch < n_batches:
                bar.close()
                return history
        bar.close()
        last = epoch + 1 == epochs
        test_accuracy = None
        if test is not None and ((epoch + 1) % eval_every == 0 or last):
            test_accuracy = evaluate(model, test).accuracy
        history.append(epoch=epoch + 1, loss=sums["loss"] / sums["seen"],
                       train_accuracy=sums["correct"] / sums["seen"], test_accuracy=test_accuracy,
                       lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - started)
        scheduler.step()
        epoch, batch = epoch + 1, 0
        sums = dict(loss=0.0, correct=0, seen=0, seconds=0.0)
        save()
        if progress:
            tested = f", test {test_accuracy:.2%}" if test_accuracy is not None else ""
            print(f"epoch {epoch}/{epochs}: loss {history.loss[-1]:.4f}, "
                  f"train {history.train_accuracy[-1]:.2%}{tested}, lr {history.lr[-1]:.2e}, "
                  f"{history.seconds[-1]:.1f} s")
        if max_steps is not None and step >= max_steps:
            break
    return history


def export_run(model: nn.Module, history: History, recipe: dict, test: Digits,
               directory: str | os.PathLike, trained_on: str) -> Path:
    """Export ``model`` in float16 with its recipe, its per-epoch history, the device it was
    trained on (``trained_on``, e.g. ``runtime.describe_device(device)``) and the test accuracy of
    the exported (float16-rounded) weights; returns the JSON path."""
    rounded = rebuild(model.model_name, model.config,
                      {k: v.half() if v.is_floating_point() else v
                       for k, v in model.state_dict().items()})
    accuracy = evaluate(rounded, test).accuracy
    metrics = {"test_accuracy": accuracy, "test_size": len(test), "test_data": test.source,
               "epochs": len(history), "train_seconds": round(sum(history.seconds), 1),
               "trained_on": trained_on, "history": asdict(history)}
    return export(model, directory, recipe=recipe, metrics=metrics)


def main(argv: list[str] | None = None) -> History:
    parser = argparse.ArgumentParser(prog="python -m capsutil.train",
                                     description="Train a registered model on MNIST.")
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--run-dir", required=True, help="where checkpoint.pt is written")
    parser.add_argument("--data-root", default=None, help="MNIST root (default $CAPSUTIL_DATA)")
    parser.add_argument("--config", type=json.loads, default={}, metavar="JSON",
                        help='model constructor arguments, e.g. \'{"A": 64, "B": 8, "C": 16, "D": 16}\'')
    parser.add_argument("--resume", action="store_true", help="continue run-dir's checkpoint")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-decay", type=float, default=0.9, help="factor per epoch")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS")
    parser.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--eager", action="store_true", help="do not use torch.compile")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="after training, export float16 weights and their JSON to DIR")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = runtime.setup(seed=args.seed)
    train, test = load_mnist("train", args.data_root), load_mnist("test", args.data_root)
    model = build_model(args.model, **args.config).to(device)
    loss_fn = build_loss(args.model).to(device)
    history = fit(model, loss_fn, train, test, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, lr_decay=args.lr_decay, seed=args.seed, run_dir=args.run_dir,
                  checkpoint_every=args.checkpoint_every, resume=args.resume,
                  eval_every=args.eval_every, max_steps=args.max_steps, compile=not args.eager)
    checkpoint = load_checkpoint(Path(args.run_dir) / CHECKPOINT_NAME)
    runtime.provenance(n_train=len(train), n_test=len(test), device=device,
                       epochs=checkpoint["step"] / math.ceil(len(train) / args.batch_size),
                       seconds=sum(history.seconds) + checkpoint["sums"]["seconds"],
                       data=train.source)
    if args.export is not None:
        json_path = export_run(model, history, checkpoint["recipe"], test, args.export,
                               trained_on=runtime.describe_device(device))
        print(f"exported {json_path.with_suffix('.pt').name} and {json_path.name} to {args.export}")
    return history


if __name__ == "__main__":
    main(sys.argv[1:])
