"""Training speed and peak memory of matrix capsules: ``python -m capsutil.bench matrix``.

For the small configuration (A=64, B=8, C=D=16) and the paper's (A=B=C=D=32), one training step
as in ``capsutil.train.fit``: forward with EM routing (``--iterations``, 3 by default), spread
loss, backward and an Adam update, at ``--batch-size`` (32) in float32, with the capsule layers
compiled as in training (``--eager`` turns that off). Each configuration runs in a fresh Python
process, so its peak memory is its own: the process's peak resident set size (the most memory
it ever held, including PyTorch itself and the compilation). Prints one line per configuration:
median throughput in images/s over the timed steps, and the peak memory.
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

from capsutil.losses import SpreadLoss
from capsutil.models import MATRIX_SIZES, MatrixCapsNet
from capsutil.runtime import compile_model, compile_works, keep_freed_memory
from capsutil.train import adam


def measure(config: str, batch_size: int, iterations: int, steps: int, warmup: int,
            compiled: bool) -> dict:
    """Time ``steps`` training steps after ``warmup`` ones, in this process."""
    keep_freed_memory()
    torch.manual_seed(0)
    model = MatrixCapsNet(**MATRIX_SIZES[config], iterations=iterations)
    compiled = compiled and compile_model(model)
    loss_fn, optimizer = SpreadLoss(), adam(model, 1e-3)
    images = torch.rand(batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (batch_size,))
    seconds = []
    for k in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images, labels), images, labels).backward()
        optimizer.step()
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux
    return dict(config=config, images_per_second=batch_size / statistics.median(seconds),
                peak_gb=peak_kib * 1024 / 1e9, compiled=compiled)


def _in_fresh_process(config: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "capsutil.bench", "matrix", "--one", config,
               "--batch-size", str(args.batch_size), "--iterations", str(args.iterations),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
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
    parser.add_argument("--one", choices=sorted(MATRIX_SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.one:                              # the child process: measure, print one JSON line
        compiled = not args.eager and compile_works("cpu")
        print(json.dumps(measure(args.one, args.batch_size, args.iterations, args.steps,
                                 args.warmup, compiled)))
        return
    print(f"batch {args.batch_size} | {args.iterations} routing iterations | float32 | "
          f"{args.threads or torch.get_num_threads()} threads | {args.steps} timed steps | "
          f"load average {os.getloadavg()[0]:.2f}")
    for config in args.configs:
        result = _in_fresh_process(config, args)
        sizes = ", ".join(f"{k}={v}" for k, v in MATRIX_SIZES[config].items())
        print(f"{config} ({sizes}), capsule layers "
              f"{'compiled' if result['compiled'] else 'eager'}: "
              f"{result['images_per_second']:.1f} images/s, peak memory {result['peak_gb']:.2f} GB")
