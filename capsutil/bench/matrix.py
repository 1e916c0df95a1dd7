"""Training speed and peak memory of matrix capsules: ``python -m capsutil.bench matrix``.

For the small configuration (A=64, B=8, C=D=16) and the paper's (A=B=C=D=32), one training step
as in ``capsutil.train.fit``: forward with EM routing (``--iterations``, 3 by default), spread
loss, backward and an Adam update, at ``--batch-size`` (32) in float32, on the padded geometry
the book trains (``--conv1-padding`` 1). The capsule layers run as in training: compiled where
the model lists compiled parts (``MatrixCapsNet`` lists none, so they run eager, and the printed
line says so; ``--eager`` forces it). Each configuration runs in a fresh Python process. Prints
one line per configuration: the median throughput in images/s over the timed steps, and the
training step's own peak memory: the most tensor memory alive at once during one more step
(parameters, Adam's state, activations and gradients), read from PyTorch's profiler memory
timeline. The process's peak resident set size follows in brackets; it also holds PyTorch's
libraries and the compilation, and changes with the installed PyTorch build.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from capsutil.losses import SpreadLoss
from capsutil.models import MATRIX_SIZES, MatrixCapsNet
from capsutil.runtime import compile_model, compile_works, keep_freed_memory
from capsutil.train import adam


def tensor_peak_bytes(step) -> int:
    """The most tensor memory alive at once while ``step()`` runs (all categories of the
    profiler's memory timeline: parameters, optimizer state, activations, gradients...)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(
        torch.device("cpu"))                                  # (times, categories) in bytes
    return max(sum(row) for row in sizes)


def measure(config: str, batch_size: int, iterations: int, steps: int, warmup: int,
            compiled: bool, conv1_padding: int = 1) -> dict:
    """Time ``steps`` training steps after ``warmup`` ones, in this process, then measure the
    tensor memory of one more step."""
    keep_freed_memory()
    torch.manual_seed(0)
    model = MatrixCapsNet(**MATRIX_SIZES[config], iterations=iterations,
                          conv1_padding=conv1_padding)
    compiled = compiled and compile_model(model)
    loss_fn, optimizer = SpreadLoss(), adam(model, 1e-3)
    images = torch.rand(batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images, labels), images, labels).backward()
        optimizer.step()

    seconds = []
    for k in range(warmup + steps):
        start = time.perf_counter()
        step()
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux
    return dict(config=config, images_per_second=batch_size / statistics.median(seconds),
                tensor_peak_gb=tensor_peak_bytes(step) / 1e9, rss_peak_gb=peak_kib * 1024 / 1e9,
                compiled=compiled)


def _in_fresh_process(config: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "capsutil.bench", "matrix", "--one", config,
               "--batch-size", str(args.batch_size), "--iterations", str(args.iterations),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--conv1-padding", str(args.conv1_padding)]
    command += ["--eager"] if args.eager else []
    command += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {config} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capsutil.bench matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(MATRIX_SIZES),
                        default=["small", "paper"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3, help="EM-routing iterations")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--eager", action="store_true", help="do not compile the capsule layers")
    parser.add_argument("--conv1-padding", type=int, default=1,
                        help="Conv1's padding (1: the book's network; 0: the unpadded one)")
    parser.add_argument("--one", choices=sorted(MATRIX_SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.one:                              # the child process: measure, print one JSON line
        compiled = not args.eager and compile_works("cpu")
        print(json.dumps(measure(args.one, args.batch_size, args.iterations, args.steps,
                                 args.warmup, compiled, args.conv1_padding)))
        return
    print(f"batch {args.batch_size} | {args.iterations} routing iterations | conv1_padding "
          f"{args.conv1_padding} | float32 | "
          f"{args.threads or torch.get_num_threads()} threads | {args.steps} timed steps | "
          f"load average {os.getloadavg()[0]:.2f}")
    for config in args.configs:
        result = _in_fresh_process(config, args)
        sizes = ", ".join(f"{k}={v}" for k, v in MATRIX_SIZES[config].items())
        print(f"{config} ({sizes}), capsule layers "
              f"{'compiled' if result['compiled'] else 'eager'}: "
              f"{result['images_per_second']:.1f} images/s, training step's peak tensor memory "
              f"{result['tensor_peak_gb']:.2f} GB (process peak RSS {result['rss_peak_gb']:.2f} GB)")
