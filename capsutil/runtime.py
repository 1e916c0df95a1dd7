"""Run-time conventions shared by every chapter: seeding, device choice, quick mode, provenance.

Quick mode (``CAPSUTIL_QUICK=1``) shrinks data and steps so the whole book re-executes on a
2-core CPU in minutes; it never changes which code runs.
"""
from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

QUICK_ENV = "CAPSUTIL_QUICK"


def is_quick() -> bool:
    """True when ``CAPSUTIL_QUICK`` is set to 1/true/yes (the test configuration sets it)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def mode() -> str:
    """``"quick"`` or ``"full"``: the name notebooks print and branch on."""
    return "quick" if is_quick() else "full"


def pick(full, quick):
    """Return ``quick`` in quick mode and ``full`` otherwise, e.g. ``epochs = pick(30, 1)``."""
    return quick if is_quick() else full


def pick_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """A short human name for ``device``, e.g. ``cuda (NVIDIA H100)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    return device.type


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0) -> torch.device:
    """Seed every generator, pick the device, print one line with device and mode; return the device."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"expected an integer seed, got {seed!r}")
    seed_everything(seed)
    device = pick_device()
    print(f"capsutil: device {describe_device(device)} | mode {mode()} | seed {seed}")
    return device


def provenance(*, n_train: int, n_test: int, device: torch.device | str, epochs: float,
               seconds: float, data: str) -> str:
    """Print and return the one-line record every training chapter shows under its results.

    ``device`` is the device that trained, or for a recorded run the description saved with it
    (a string such as an exported model's ``metrics["trained_on"]``), printed as it is.
    """
    where = device if isinstance(device, str) else describe_device(device)
    line = (f"provenance: mode {mode()} | data {data} | train {n_train:,} | test {n_test:,} | "
            f"device {where} | epochs {epochs:g} | wall time {seconds:,.1f} s")
    print(line)
    return line
