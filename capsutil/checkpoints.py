"""Checkpoints and exported weights, for any model in :data:`capsutil.models.MODELS`.

Two kinds of file:

* a **training checkpoint** (``save_checkpoint`` / ``load_checkpoint``): everything needed to
  continue a run exactly (model, optimiser, scheduler, position in the data, generator state,
  history), written atomically so an interrupted write never leaves a half file in its place;
* **exported weights** (``export`` / ``load_exported``): the model's parameters only (float16 by
  default), with a JSON file beside it recording the file's sha256, the model's configuration,
  the training recipe and its results. :func:`capsutil.pretrained` loads these.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

from capsutil.models import build_model, count_parameters

CHECKPOINT_FORMAT = "capsutil-checkpoint/2"
CHECKPOINT_MAGIC = CHECKPOINT_FORMAT.encode("ascii") + b"\n"
WEIGHTS_FORMAT = "capsutil-weights/1"


def atomic_write(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``
    and fsync the folder.

    The rename is atomic, so ``path`` always holds either the previous complete file or the new
    complete file, never a partial one; the temporary file is removed if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                                      # mkstemp creates it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)                                          # make the rename durable
    finally:
        os.close(folder)
    return path


def torch_bytes(obj) -> bytes:
    """``torch.save(obj)`` into memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(torch_bytes(obj), path)


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write a training checkpoint (a dict of state, see :mod:`capsutil.train`) atomically.

    The file is a header line, the sha256 of the payload, and the payload (``torch.save`` of
    the state), so that a flipped bit or a cut-off file is found on load.
    """
    payload = torch_bytes({"format": CHECKPOINT_FORMAT, **state})
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return atomic_write(CHECKPOINT_MAGIC + digest + b"\n" + payload, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a training checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` naming the file when it
    is truncated, corrupt (its checksum does not match) or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"checkpoint {path} cannot be read: {err}") from err
    header = len(CHECKPOINT_MAGIC) + 65                           # magic, 64 hex digits, newline
    if not data.startswith(CHECKPOINT_MAGIC) or len(data) < header:
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file")
    expected, payload = data[len(CHECKPOINT_MAGIC):header - 1], data[header:]
    if hashlib.sha256(payload).hexdigest().encode("ascii") != expected:
        raise ValueError(f"checkpoint {path} is corrupt (checksum mismatch)")
    return _unpickle(io.BytesIO(payload), path, "checkpoint", CHECKPOINT_FORMAT, map_location)


def _unpickle(source, path: Path, what: str, fmt: str, map_location) -> dict:
    try:
        obj = torch.load(source, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError) as err:
        raise ValueError(f"{what} {path} is truncated or corrupt: {err}") from err
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{what} {path} is not a {fmt} file (found {found!r})")
    return obj


def _load(path: Path, what: str, fmt: str, map_location) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    return _unpickle(path, path, what, fmt, map_location)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rebuild(name: str, config: dict, state_dict: dict, device=None) -> nn.Module:
    """The registered model ``name`` with ``config``, loaded with ``state_dict`` (cast to float32)."""
    model = build_model(name, **config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state_dict.items()})
    return model.to(device) if device is not None else model


def export(model: nn.Module, directory: str | os.PathLike, *, recipe: dict,
           metrics: dict | None = None, half: bool = True) -> Path:
    """Write ``<name>.pt`` (weights only, float16 when ``half``) and ``<name>.json`` beside it.

    The JSON records the file name, its sha256 and size, the model's name, configuration and
    parameter count, the weights' dtype, the training ``recipe`` and ``metrics`` (e.g. the test
    accuracy measured with the exported weights). Returns the path of the JSON file.
    """
    name = model.model_name
    directory = Path(directory)
    dtype = torch.float16 if half else torch.float32
    weights = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().clone()
               for k, v in model.state_dict().items()}
    weights_path = atomic_save({"format": WEIGHTS_FORMAT, "model": name, "config": model.config,
                                "state_dict": weights}, directory / f"{name}.pt")
    record = {"model": name, "file": weights_path.name, "sha256": sha256_of(weights_path),
              "bytes": weights_path.stat().st_size, "dtype": str(dtype).removeprefix("torch."),
              "parameters": count_parameters(model), "config": model.config,
              "recipe": recipe, "metrics": metrics or {}, "torch": torch.__version__}
    json_path = directory / f"{name}.json"
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, json_path)
    return json_path


def load_exported(path: str | os.PathLike, expected_sha256: str | None = None,
                  device=None) -> nn.Module:
    """The model stored by :func:`export`, in float32 and eval mode.

    With ``expected_sha256`` the file's digest is checked first; a mismatch raises
    ``ValueError`` naming the file and both digests.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise ValueError(f"weights file {path} is corrupt or was changed: its sha256 is "
                             f"{actual}, expected {expected_sha256}")
    stored = _load(path, "weights file", WEIGHTS_FORMAT, "cpu")
    return rebuild(stored["model"], stored["config"], stored["state_dict"], device).eval()
