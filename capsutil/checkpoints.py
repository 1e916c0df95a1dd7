"""Checkpoints and exported weights, for any model in :data:`capsutil.models.MODELS`.

Two kinds of file:

* a **training checkpoint** (``save_checkpoint`` / ``load_checkpoint``): everything needed to
  continue a run exactly (model, optimiser, scheduler, position in the data, generator state,
  history). The file is a header line, the sha256 of the payload, and the payload; it is
  written atomically (an interrupted write never leaves a half file in its place), read back
  and verified before it replaces the previous checkpoint, which is kept beside it as
  ``<name>.prev.pt`` until the next save;
* **exported weights** (``export`` / ``load_exported``): the model's parameters only (float16 by
  default) in a ``<name>.safetensors`` file, which holds tensors and text and nothing that
  runs when it is read (a checkpoint's ``torch.save`` payload is a pickle), with a JSON file
  beside it recording the file's sha256, the model's configuration, the training recipe and
  its results. :func:`capsutil.pretrained` loads these.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from capsutil.models import build_model, count_parameters

CHECKPOINT_FORMAT = "capsutil-checkpoint/2"
CHECKPOINT_MAGIC = CHECKPOINT_FORMAT.encode("ascii") + b"\n"
DIGEST_HEX_DIGITS = 64
WEIGHTS_FORMAT = "capsutil-weights/2"
WEIGHTS_SUFFIX = ".safetensors"


LOCK_NAME = "run.lock"


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


class RunDirectoryInUse(RuntimeError):
    """Another process holds the lock of a run directory."""


# ----------------------------------------------------------------------------------------------
# Atomic, durable writes
# ----------------------------------------------------------------------------------------------

def _write_temporary(data: bytes, path: Path) -> Path:
    """``data`` in a new temporary file ``.<name>.<random>.tmp`` beside ``path``, fsynced.

    The temporary file is removed if writing fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                                      # mkstemp creates it 0600
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _fsync_directory(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> Path:
    """Rename the temporary file ``tmp`` over ``path`` (removing ``tmp`` if that fails) and
    fsync the folder."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``
    and fsync the folder.

    The rename is atomic, so ``path`` always holds either the previous complete file or the new
    complete file, never a partial one; the temporary file is removed if writing fails.
    """
    path = Path(path)
    return _commit(_write_temporary(data, path), path)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files that writes of ``path`` (and of its previous checkpoint) left behind
    when the process was killed mid-write: ``.<name>.<random>.tmp`` beside it."""
    path = Path(path)
    names = (path.name, previous_checkpoint(path).name)
    return sorted(p for name in names for p in path.parent.glob(f".{name}.*.tmp") if p.is_file())


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------

def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint that ``path`` held before the last
    save: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _checkpoint_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return CHECKPOINT_MAGIC + digest + b"\n" + payload


def _verified_payload(data: bytes, path: Path) -> bytes:
    """The ``torch.save`` payload of the checkpoint bytes ``data`` read from ``path``, after
    checking the header and the checksum; raises :class:`CorruptCheckpoint` naming the file."""
    header = len(CHECKPOINT_MAGIC) + DIGEST_HEX_DIGITS + 1        # magic, digest, newline
    if len(data) < header and CHECKPOINT_MAGIC.startswith(data[:len(CHECKPOINT_MAGIC)]):
        raise CorruptCheckpoint(f"checkpoint {path} is truncated ({len(data)} bytes, shorter "
                                f"than its header)")
    if not data.startswith(CHECKPOINT_MAGIC):
        raise CorruptCheckpoint(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file")
    expected, payload = data[len(CHECKPOINT_MAGIC):header - 1], data[header:]
    if data[header - 1:header] != b"\n" or hashlib.sha256(payload).hexdigest().encode() != expected:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt (checksum mismatch)")
    return payload


def _is_intact(path: Path) -> bool:
    """True when ``path`` is a readable checkpoint whose checksum matches."""
    try:
        _verified_payload(path.read_bytes(), path)
    except (OSError, CorruptCheckpoint):
        return False
    return True


def _previous_good(path: Path) -> str:
    """Where the last good state of ``path`` is, in words, for an error message."""
    previous = previous_checkpoint(path)
    if previous.is_file() and _is_intact(previous):
        return f"the previous good checkpoint is {previous}"
    return "there is no previous good checkpoint"


def _keep_previous(path: Path) -> None:
    """Keep the current ``path`` as :func:`previous_checkpoint`, atomically: a hard link, or a
    copy on a file system without hard links. ``path`` itself stays in place."""
    previous = previous_checkpoint(path)
    staged = previous.with_name(f".{previous.name}.link.tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:
        shutil.copyfile(path, staged)
    _commit(staged, previous)


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a training checkpoint (a dict of state, see :mod:`capsutil.train`) atomically.

    The file is a header line, the sha256 of the payload, and the payload (``torch.save`` of
    the state), so that a flipped bit or a cut-off file is found on load. The new file is
    written beside ``path``, fsynced, read back and verified; only then does the checkpoint
    ``path`` held so far become :func:`previous_checkpoint` (``checkpoint.prev.pt``) and the
    new file take its place. A failure anywhere leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = _write_temporary(_checkpoint_bytes(state), path)
    try:
        try:
            _verified_payload(tmp.read_bytes(), tmp)
        except CorruptCheckpoint as err:
            raise CorruptCheckpoint(f"checkpoint {path} was left as it was: the new file "
                                    f"written for it did not verify ({err})") from None
        if path.is_file():
            _keep_previous(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _commit(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a training checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` when it is missing, and :class:`CorruptCheckpoint` (a
    ``ValueError``) naming the file when it cannot be read, is truncated, corrupt (its checksum
    does not match) or not a checkpoint; that message also says where the previous good
    checkpoint is, e.g. ``checkpoint runs/a/checkpoint.pt is corrupt (checksum mismatch); the
    previous good checkpoint is runs/a/checkpoint.prev.pt``.
    """
    path = Path(path)
    if not path.exists():
        previous = previous_checkpoint(path)
        hint = f"; {_previous_good(path)}" if previous.is_file() else ""
        raise FileNotFoundError(f"checkpoint {path} not found{hint}")
    try:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CorruptCheckpoint(f"checkpoint {path} cannot be read: {err}") from err
        payload = _verified_payload(data, path)
        return _unpickle(io.BytesIO(payload), path, map_location)
    except CorruptCheckpoint as err:
        raise CorruptCheckpoint(f"{err}; {_previous_good(path)}") from err.__cause__


def _unpickle(source, path: Path, map_location) -> dict:
    try:
        obj = torch.load(source, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError) as err:
        raise CorruptCheckpoint(f"checkpoint {path} is truncated or corrupt: {err}") from err
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CorruptCheckpoint(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file "
                                f"(found {found!r})")
    return obj


# ----------------------------------------------------------------------------------------------
# Run directories: one writer at a time, writable and with room before any work
# ----------------------------------------------------------------------------------------------

def _try_lock(fd: int) -> bool:
    """Lock the open file ``fd`` for this process without waiting; False when another process
    holds it. The system drops the lock when the process ends, however it ends."""
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _lock(run_dir: Path) -> int:
    """Open and lock ``run_dir/run.lock`` and write this process's id into it; return the open
    file. Raises ``ValueError`` when the folder cannot be written and :class:`RunDirectoryInUse`
    when another process holds the lock."""
    lock_path = run_dir / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(f"run directory {run_dir} is not writable: {err}") from err
    if not _try_lock(fd):
        try:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        except OSError:                                  # Windows: the holder's locked byte
            holder = "unknown"
        os.close(fd)
        raise RunDirectoryInUse(f"run directory {run_dir} is in use by another run (process "
                                f"{holder}); wait for it to end or choose another run directory")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        raise ValueError(f"run directory {run_dir} is not writable: {err}") from err
    return fd


def _check_room(run_dir: Path, file_sizes: dict[str, int]) -> None:
    """Raise ``ValueError`` unless ``run_dir`` has room for the files ``file_sizes`` names (name
    -> expected bytes): three of each at the peak of a save (the previous, the current and the
    new one), less what the folder already holds of them."""
    held = sum(p.stat().st_size for name in file_sizes
               for p in (run_dir / name, previous_checkpoint(run_dir / name)) if p.is_file())
    needed = 3 * sum(file_sizes.values()) - held
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise ValueError(f"run directory {run_dir} has {free / 2**20:,.1f} MiB free; its "
                         f"checkpoints need about {needed / 2**20:,.1f} MiB more")


@contextlib.contextmanager
def claimed_run_directory(run_dir: str | os.PathLike, file_sizes: dict[str, int]) -> Iterator[Path]:
    """Use ``run_dir`` for one run: create it, check it is writable and has room for the files
    ``file_sizes`` names (name -> expected bytes, see :func:`_check_room`), lock it against other
    runs (``run.lock``, released on exit and by the system if the process dies) and remove the
    temporary files an interrupted save of those files left behind.

    Raises ``ValueError`` naming the folder when it is a file, cannot be created or written, or
    is short of space, and :class:`RunDirectoryInUse` when another run holds it.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file, expected a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"run directory {run_dir} cannot be created: {err}") from err
    fd = _lock(run_dir)
    try:
        _check_room(run_dir, file_sizes)
        for name in file_sizes:
            for stale in stale_temporaries(run_dir / name):
                stale.unlink()
        yield run_dir
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Exported weights
# ----------------------------------------------------------------------------------------------

def usable_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a ``torch.device`` after checking this PyTorch can use it (None stays None).

    Raises ``ValueError`` for a name torch does not know, and for ``"cuda"`` or ``"mps"`` where
    no such device is available, instead of torch's error deep inside ``Module.to``.
    """
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"expected a device such as 'cpu' or 'cuda', got {device!r}") from err
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"device {str(device)!r} is not available: this PyTorch sees "
                         f"{torch.cuda.device_count()} CUDA GPU(s); use device='cpu' or "
                         f"capsutil.pick_device()")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise ValueError("device 'mps' is not available on this machine; use device='cpu' or "
                         "capsutil.pick_device()")
    return device


def rebuild(name: str, config: dict, state_dict: dict, device=None) -> nn.Module:
    """The registered model ``name`` with ``config``, loaded with ``state_dict`` (cast to float32)."""
    model = build_model(name, **config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state_dict.items()})
    return model.to(device) if device is not None else model


def export(model: nn.Module, directory: str | os.PathLike, *, recipe: dict,
           metrics: dict | None = None, half: bool = True) -> Path:
    """Write ``<name>.safetensors`` (weights only, float16 when ``half``) and ``<name>.json``.

    The safetensors file also carries the format, the model's name and configuration as text
    metadata. The JSON records the file name, its sha256 and size, the model's name,
    configuration and parameter count, the weights' dtype, the training ``recipe`` and
    ``metrics`` (e.g. the test accuracy measured with the exported weights). Both are written
    atomically. Returns the path of the JSON file.
    """
    name = model.model_name
    directory = Path(directory)
    dtype = torch.float16 if half else torch.float32
    weights = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    data = safetensors.torch.save(weights, metadata={
        "format": WEIGHTS_FORMAT, "model": name, "config": json.dumps(model.config)})
    weights_path = atomic_write(data, directory / f"{name}{WEIGHTS_SUFFIX}")
    record = {"model": name, "file": weights_path.name, "sha256": hashlib.sha256(data).hexdigest(),
              "bytes": len(data), "dtype": str(dtype).removeprefix("torch."),
              "parameters": count_parameters(model), "config": model.config,
              "recipe": recipe, "metrics": metrics or {}, "torch": torch.__version__}
    return atomic_write((json.dumps(record, indent=2) + "\n").encode(), directory / f"{name}.json")


def read_weights(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the text metadata of the safetensors bytes ``data`` read from ``path``.

    Raises ``ValueError`` naming the file when the bytes are not a complete safetensors file
    with a capsutil weights header.
    """
    try:
        tensors = safetensors.torch.load(data)
        header_size = int.from_bytes(data[:8], "little")           # then the JSON header
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (safetensors.SafetensorError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"weights file {path} is truncated or corrupt: {err}") from err
    if metadata.get("format") != WEIGHTS_FORMAT or not {"model", "config"} <= metadata.keys():
        raise ValueError(f"weights file {path} is not a {WEIGHTS_FORMAT} file "
                         f"(found format {metadata.get('format')!r})")
    return tensors, metadata


def load_exported(path: str | os.PathLike, expected_sha256: str | None = None,
                  device: torch.device | str | None = None) -> nn.Module:
    """The model stored by :func:`export`, in float32 and eval mode, on ``device``.

    With ``expected_sha256`` the file's digest is checked first; a mismatch raises
    ``ValueError`` naming the file and both digests. The file is read once, so the bytes
    checked are the bytes loaded. A ``device`` this machine lacks raises ``ValueError``.
    """
    path = Path(path)
    device = usable_device(device)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix != WEIGHTS_SUFFIX:
        raise ValueError(f"weights file {path} is not a {WEIGHTS_SUFFIX} file; export the "
                         f"model again with capsutil.checkpoints.export")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"weights file {path} cannot be read: {err}") from err
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ValueError(f"weights file {path} is corrupt or was changed: its sha256 is "
                             f"{actual}, expected {expected_sha256}")
    tensors, metadata = read_weights(data, path)
    try:
        config = json.loads(metadata["config"])
        return rebuild(metadata["model"], config, tensors, device).eval()
    except (json.JSONDecodeError, TypeError, KeyError, RuntimeError) as err:
        raise ValueError(f"weights file {path} does not fit the model it names "
                         f"({metadata['model']!r}): {err}") from err
