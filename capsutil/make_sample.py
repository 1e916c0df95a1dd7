"""Make the real-MNIST sample shipped in ``capsutil/_sample`` from the official files.

    python -m capsutil.make_sample --raw ../shared/data/MNIST/raw

Class-balanced: the first 500 training and 100 test images of each digit in file order,
kept in file order. Deterministic, so the same sources always give the same bytes. The md5 of
every source file is written beside the sample in ``SOURCES.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from capsutil.data import SAMPLE_FILE, SPLITS, read_idx

PER_CLASS = {"train": 500, "test": 100}
OUT_DIR = Path(__file__).resolve().parent / "_sample"


def balanced_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class, in file order."""
    chosen = [np.flatnonzero(labels == digit)[:per_class] for digit in range(10)]
    return np.sort(np.concatenate(chosen))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="folder with the four idx files")
    args = parser.parse_args()
    arrays, sources = {}, {}
    for split, (image_name, label_name, n) in SPLITS.items():
        images = read_idx(args.raw / image_name, (n, 28, 28))
        labels = read_idx(args.raw / label_name, (n,))
        keep = balanced_indices(labels, PER_CLASS[split])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
        sources.update({name: md5(args.raw / name) for name in (image_name, label_name)})
    np.savez_compressed(OUT_DIR / SAMPLE_FILE, **arrays)
    counts = {split: PER_CLASS[split] * 10 for split in SPLITS}
    (OUT_DIR / "SOURCES.json").write_text(json.dumps(
        {"per_class": PER_CLASS, "sizes": counts, "md5": sources}, indent=2) + "\n")
    print(f"wrote {OUT_DIR / SAMPLE_FILE} ({(OUT_DIR / SAMPLE_FILE).stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
