"""Run-time conventions shared by every chapter: seeding, device choice, quick mode, provenance,
and the knobs that make training fast here (the allocator, compilation).

Quick mode (``CAPSUTIL_QUICK=1``) shrinks data and steps so the whole book re-executes on a
2-core CPU in minutes; it never changes which code runs.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import random

import numpy as np
import torch
from torch import nn

QUICK_ENV = "CAPSUTIL_QUICK"

PRINT_WIDTH = 80                     # the book's column: printed records fold to it


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
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''}, {platform.machine()})"
    return device.type


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sharp_inline_figures() -> bool:
    """In Jupyter, store inline figures at twice their pixel size (``retina``), so that they stay
    sharp when the book's column shows them; False outside an IPython kernel."""
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    set_matplotlib_formats("retina")
    return True


def setup(seed: int = 0) -> torch.device:
    """Seed every generator, pick the device, make inline figures sharp
    (:func:`sharp_inline_figures`), print one line with device and mode; return the device."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"expected an integer seed, got {seed!r}")
    seed_everything(seed)
    sharp_inline_figures()
    device = pick_device()
    print(f"capsutil: device {describe_device(device)} | mode {mode()} | seed {seed}")
    return device


def provenance(*, n_train: int, n_test: int, device: torch.device | str, epochs: float,
               seconds: float, data: str, n_val: int | None = None) -> str:
    """Print and return the one-line record every training chapter shows under its results.

    ``device`` is the device that trained, or for a recorded run the description saved with it
    (a string such as an exported model's ``metrics["trained_on"]``), printed as it is. The
    record is returned as one line and printed folded (:func:`fold`) to the book's column.
    """
    where = device if isinstance(device, str) else describe_device(device)
    val = f"val {n_val:,} | " if n_val is not None else ""
    line = (f"provenance: mode {mode()} | data {data} | train {n_train:,} | {val}test {n_test:,} | "
            f"device {where} | epochs {epochs:g} | wall time {seconds:,.1f} s")
    print(fold(line))
    return line


def fold(line: str, width: int = PRINT_WIDTH, separator: str = " | ") -> str:
    """``line`` broken before its ``separator``s into lines of at most ``width`` characters
    where the parts allow it; continuation lines start with two spaces and the separator."""
    parts = line.split(separator)
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + len(separator) + len(part) <= width:
            lines[-1] += separator + part
        else:
            lines.append("  " + separator.lstrip() + part)
    return "\n".join(lines)


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
