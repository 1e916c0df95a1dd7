"""Trained models shipped with the book, loaded with an integrity check (``capsutil.pretrained``).

``pretrained("capsnet")`` reads ``capsutil/weights/capsnet.json``, checks that the sha256 of
``capsnet.pt`` matches the one recorded there, and returns the model in eval mode. The files are
written by ``python -m capsutil.train capsnet ... --export capsutil/weights`` (see
:func:`capsutil.checkpoints.export`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from capsutil.checkpoints import load_exported
from capsutil.models import MODELS

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


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
    if not isinstance(record, dict) or not {"file", "sha256"} <= record.keys():
        raise ValueError(f"weights record {record_path} is corrupt: it names no file and sha256")
    return record


def pretrained(name: str = "capsnet", weights_dir: str | os.PathLike | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """The trained model ``name`` in eval mode, after checking its file's sha256.

    ``weights_dir`` defaults to the package's ``weights/`` folder. Raises ``FileNotFoundError``
    when the weights are missing and ``ValueError`` when they are corrupt or were changed.
    """
    record = info(name, weights_dir)
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    model = load_exported(directory / record["file"], expected_sha256=record["sha256"],
                          device=device)
    if model.model_name != name:
        raise ValueError(f"{record['file']} holds a {model.model_name!r} model, not {name!r}")
    return model
