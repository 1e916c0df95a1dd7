"""Training speed of CapsNet against its two convolutions alone: ``python -m capsutil.bench capsnet``.

Both sides run the same kind of training step at the same batch size, dtype (float32) and
threads: forward, loss, backward and an Adam update (the same optimiser as training). The full
side is :class:`capsutil.models.CapsNet` with :class:`capsutil.losses.CapsNetLoss`; the baseline
is Conv1 + the primary-capsule convolution with a trivial loss (mean of squares), the part of
CapsNet that no capsule code can make faster. As in training, the capsule layers are compiled
(``--eager`` turns that off; the convolutions run the same oneDNN kernels either way) and
freed memory is kept for reuse, which helps both sides (``--system-malloc`` turns that off).
The two sides are timed in alternating rounds, so a change in machine load hits both; the
ratio is the median of the per-round ratios and is printed on the last line.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from capsutil.losses import CapsNetLoss
from capsutil.models import CapsNet
from capsutil.runtime import compile_model, compile_works, keep_freed_memory
from capsutil.train import adam


class ConvsOnly(nn.Module):
    """CapsNet's Conv1 (with ReLU) and primary-capsule convolution, nothing else."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 256, 9)
        self.primary = nn.Conv2d(256, 256, 9, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.primary(torch.relu(self.conv1(images)))         # (B, 256, 6, 6)


def _capsnet_step(batch_size: int, compiled: bool):
    model, loss_fn = CapsNet(), CapsNetLoss()
    if compiled:
        compile_model(model)
    optimizer = adam(model, 1e-3)
    images = torch.rand(batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images, labels), images, labels).backward()
        optimizer.step()
    return step


def _convs_step(batch_size: int):
    model = ConvsOnly()
    optimizer = adam(model, 1e-3)
    images = torch.rand(batch_size, 1, 28, 28)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(images).square().mean().backward()
        optimizer.step()
    return step


def _seconds_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capsutil.bench capsnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--eager", action="store_true",
                        help="do not compile CapsNet's capsule layers (as training with --eager)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (no keep_freed_memory)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kept = False if args.system_malloc else keep_freed_memory()
    torch.manual_seed(0)
    compiled = not args.eager and compile_works("cpu")
    sides = {"capsnet": _capsnet_step(args.batch_size, compiled),
             "convs": _convs_step(args.batch_size)}
    for step in sides.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            times[name].append(_seconds_per_step(sides[name], args.steps))
    throughput = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    ratio = statistics.median(c / f for f, c in zip(times["capsnet"], times["convs"]))
    print(f"batch {args.batch_size} | float32 | {torch.get_num_threads()} threads | capsule layers "
          f"{'compiled' if compiled else 'eager'} | freed memory "
          f"{'kept' if kept else 'returned'} | {args.rounds} rounds x {args.steps} steps | "
          f"load average {os.getloadavg()[0]:.2f} (other processes slow the memory-bound "
          f"capsule layers more than the convolutions)")
    for name, label in (("capsnet", "full CapsNet (forward, losses, backward, Adam)"),
                        ("convs", "its two convolutions alone (forward, backward, Adam)")):
        print(f"{label}: {throughput[name]:.1f} images/s")
    print(f"ratio full/convs throughput: {ratio:.3f}")
