"""Trained models shipped with the book, loaded with an integrity check (``capsutil.pretrained``).

``pretrained("capsnet")`` reads ``capsutil/weights/capsnet.json``, checks that the sha256 of
``capsnet.safetensors`` matches the one recorded there, and returns the model in eval mode. The
files are written by ``python -m capsutil.train capsnet ... --export capsutil/weights`` (see
:func:`capsutil.checkpoints.export`). The record cannot switch the check off: it must give the
sha256, and its file must be a file of the weights folder.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from capsutil.checkpoints import load_exported
from capsutil.models import MODELS

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _check_record(record, record_path: Path, directory: Path) -> dict:
    """Raise ``ValueError`` unless ``record`` names a file of ``directory`` and its sha256."""
    if not isinstance(record, dict) or not {"file", "sha256"} <= record.keys():
        raise ValueError(f"weights record {record_path} is corrupt: it names no file and sha256")
    file, sha256 = record["file"], record["sha256"]
    if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"weights record {record_path} is corrupt: expected the sha256 of its "
                         f"weights as 64 lowercase hex digits, got {sha256!r} (the check cannot "
                         f"be switched off)")
    inside = (isinstance(file, str) and file not in ("", ".", "..") and Path(file).name == file
              and (directory / file).resolve().parent == directory.resolve())
    if not inside:
        raise ValueError(f"weights record {record_path} is corrupt: expected its file to be a "
                         f"file name inside {directory}, got {file!r}")
    return record


def info(name: str = "capsnet", weights_dir: str | os.PathLike | None = None) -> dict:
    """The record beside the shipped weights: file, sha256, config, training recipe, metrics."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    record_path = directory / f"{name}.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"no trained weights for {name!r}: {record_path.name} is not in "
                                f"{directory}; train and export them with `python -m "
                                f"capsutil.train {name} --epochs N --run-dir DIR --export {directory}`")
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"weights record {record_path} is corrupt: {err}") from err
    return _check_record(record, record_path, directory)


def pretrained(name: str = "capsnet", weights_dir: str | os.PathLike | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """The trained model ``name`` in eval mode, after checking its file's sha256.

    ``weights_dir`` defaults to the package's ``weights/`` folder. Raises ``FileNotFoundError``
    when the weights are missing and ``ValueError`` when they are corrupt or were changed, when
    the record does not give their sha256 or points outside the folder, or when ``device`` is
    not available here (e.g. ``"cuda"`` without a GPU).
    """
    record = info(name, weights_dir)
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    model = load_exported(directory / record["file"], expected_sha256=record["sha256"],
                          device=device)
    if model.model_name != name:
        raise ValueError(f"{record['file']} holds a {model.model_name!r} model, not {name!r}")
    return model
