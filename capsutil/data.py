"""MNIST for the book: the official files when present (or downloadable), else a shipped sample.

Images are kept as uint8 tensors in memory, shape (N, 1, 28, 28); loaders turn batches into
float32 in [0, 1]. The training loader shifts each image by up to 2 pixels (zero padding),
as in Sabour et al. (2017); test loaders never do.

Data root: the ``root`` argument, else ``CAPSUTIL_DATA``, else ``./data``. Files are looked up
in torchvision's layout, ``<root>/MNIST/raw/<name>`` (optionally ``.gz``).
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

DATA_ENV = "CAPSUTIL_DATA"
OFFLINE_ENV = "CAPSUTIL_OFFLINE"
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
SAMPLE_FILE = "mnist_sample.npz"
VALIDATION_FRACTION = 1 / 12      # 5,000 of the 60,000 official training images
IDX_UBYTE_MAGIC = {1: 2049, 3: 2051}  # idx magic number by number of dimensions


@dataclass(frozen=True)
class Digits:
    """A split of MNIST: ``images`` uint8 (N, 1, 28, 28), ``labels`` int64 (N,), and ``source``."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "Digits":
        """The first ``n`` examples (all of them if ``n`` is larger)."""
        return Digits(self.images[:n], self.labels[:n], self.source)

    def select(self, index: torch.Tensor) -> "Digits":
        """The examples at the positions ``index`` (int64 (M,)), in that order."""
        return Digits(self.images[index], self.labels[index], self.source)


@dataclass(frozen=True)
class ValidationSplit:
    """A training set split in two: ``train`` to fit on and ``val`` to choose with.

    ``val_indices`` (int64 (V,), sorted) are the validation images' positions in the original
    training set; every other position is in ``train``, in file order.
    """

    train: Digits
    val: Digits
    val_indices: torch.Tensor

    def record(self) -> dict:
        """What an exported model records of its split: the rule, sizes and an index hash."""
        digest = hashlib.sha256(self.val_indices.numpy().astype("<i8").tobytes()).hexdigest()
        return {"rule": "stratified: the last images of each class in file order",
                "train_size": len(self.train), "val_size": len(self.val),
                "val_indices_sha256": digest}


def default_val_size(n: int) -> int:
    """The validation size for a training set of ``n`` images: 5,000 of MNIST's 60,000, and
    the same fraction (1/12) of a smaller set such as the shipped sample."""
    return round(n * VALIDATION_FRACTION)


def stratified_tail(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Positions (int64 (size,), sorted) of the last images of each class in file order.

    Each class gives its share of ``size`` in proportion to its count (largest remainders
    round), so the validation set has the class mix of the whole. No randomness: the same
    labels always give the same positions.
    """
    counts = torch.bincount(labels)                                       # (K,)
    quota = counts.double() * size / len(labels)                          # (K,) exact shares
    take = quota.floor().long()
    order = torch.argsort(quota - take.double(), descending=True, stable=True)
    take[order[:size - int(take.sum())]] += 1                              # largest remainders
    chosen = [torch.nonzero(labels == k).flatten()[counts[k] - take[k]:]
              for k in range(len(counts))]
    return torch.sort(torch.cat(chosen)).values


def split_validation(digits: Digits, val_size: int | None = None) -> ValidationSplit:
    """Hold out ``val_size`` images of ``digits`` (default :func:`default_val_size`) for
    validation, chosen by :func:`stratified_tail`; the rest, in file order, is for training.

    Full MNIST gives 55,000 / 5,000; the shipped 5,000-image sample 4,583 / 417.
    """
    if val_size is None:
        val_size = default_val_size(len(digits))
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < len(digits):
        raise ValueError(f"expected a validation size between 1 and {len(digits) - 1} "
                         f"(the training set has {len(digits):,} images), got {val_size!r}")
    val_indices = stratified_tail(digits.labels, val_size)
    keep = torch.ones(len(digits), dtype=torch.bool)
    keep[val_indices] = False
    train_indices = torch.nonzero(keep).flatten()                         # (N - V,)
    return ValidationSplit(digits.select(train_indices), digits.select(val_indices), val_indices)


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root``, else ``$CAPSUTIL_DATA``, else ``./data``."""
    if root is None:
        root = os.environ.get(DATA_ENV) or "data"
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"expected the data root as a path or string, got {type(root).__name__}")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"data root {str(root)!r} is a file, expected a directory")
    return path


def read_idx(path: Path, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Read one idx-ubyte file (plain or gzip) and check it has ``expected_shape``.

    Raises ``ValueError`` naming the file when it is truncated, corrupt or of another shape.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises these on a damaged archive
        raise ValueError(f"cannot read MNIST file {path.name}: {err}") from err
    ndim = len(expected_shape)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"MNIST file {path.name} is truncated: {len(raw)} bytes, no full header")
    magic, *dims = np.frombuffer(raw[:header], dtype=">u4").tolist()
    if magic != IDX_UBYTE_MAGIC[ndim] or tuple(dims) != expected_shape:
        raise ValueError(f"MNIST file {path.name} is corrupt: header says magic {magic}, "
                         f"shape {tuple(dims)}; expected {IDX_UBYTE_MAGIC[ndim]}, {expected_shape}")
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(expected_shape)):
        raise ValueError(f"MNIST file {path.name} is truncated: {body.size} data bytes, "
                         f"expected {int(np.prod(expected_shape))}")
    return body.reshape(expected_shape)


def _find(raw_dir: Path, name: str) -> Path | None:
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def offline() -> bool:
    """True when ``CAPSUTIL_OFFLINE`` is 1/true/yes/on (any case): no downloads."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _download(root: Path) -> str | None:
    """Fetch MNIST into ``root`` through torchvision; None when it worked, else the reason."""
    if offline():
        return f"downloads are off ({OFFLINE_ENV} is set)"
    try:
        from torchvision.datasets import MNIST
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as err:  # no torchvision, no network, or a mirror down: fall back
        return f"the download failed: {type(err).__name__}: {err}"
    return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")


def load_official(split: str, root: Path) -> Digits | None:
    """The official split from ``root/MNIST/raw``, or None when its files are absent."""
    image_name, label_name, n = SPLITS[split]
    raw_dir = root / "MNIST" / "raw"
    image_path, label_path = _find(raw_dir, image_name), _find(raw_dir, label_name)
    if image_path is None or label_path is None:
        return None
    images = read_idx(image_path, (n, 28, 28))
    labels = read_idx(label_path, (n,))
    if labels.max() > 9:
        raise ValueError(f"MNIST file {label_path.name} is corrupt: labels must be digits 0-9, "
                         f"found {int((labels > 9).sum())} above 9 (largest {int(labels.max())})")
    return Digits(torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 28, 28) -> (N, 1, 28, 28)
                  torch.from_numpy(labels.astype(np.int64)), "MNIST")


def load_sample(split: str = "train") -> Digits:
    """The small, class-balanced real-MNIST sample shipped inside the package."""
    _check_split(split)
    with resources.files("capsutil").joinpath("_sample", SAMPLE_FILE).open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    return Digits(torch.from_numpy(images).unsqueeze(1),  # (N, 28, 28) -> (N, 1, 28, 28)
                  torch.from_numpy(labels.astype(np.int64)), "MNIST sample shipped with capsutil")


def load_mnist(split: str = "train", root: str | os.PathLike | None = None,
               download: bool = True) -> Digits:
    """MNIST ``split`` ("train" or "test") as uint8 images (N, 1, 28, 28) and int64 labels (N,).

    Looks in the data root, downloads there through torchvision when allowed (``download``
    and ``CAPSUTIL_OFFLINE`` unset) and possible, and otherwise falls back to the shipped
    sample, saying so and why in one line.
    """
    _check_split(split)
    path = resolve_root(root)
    digits = load_official(split, path)
    reason = "download=False"
    if digits is None and download:
        reason = _download(path)
        if reason is None:
            digits = load_official(split, path)
            reason = "the download gave no files"
    if digits is None:
        sample = load_sample(split)
        print(f"capsutil.data: MNIST files not found in {path / 'MNIST' / 'raw'} and not "
              f"downloaded ({reason}); using the shipped sample ({len(sample):,} {split} "
              f"images). For all of MNIST, put the four official files there or set "
              f"{DATA_ENV} to the folder that holds MNIST/raw.")
        return sample
    return digits


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1], same shape."""
    return images.float().div_(255.0)


def random_shift(images: torch.Tensor, max_shift: int = 2,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by its own random offset in [-max_shift, max_shift] pixels, zero padding.

    images: (N, C, H, W) -> (N, C, H, W).
    """
    n, _, h, w = images.shape
    m = max_shift
    padded = F.pad(images, (m, m, m, m))                                  # (N, C, H+2m, W+2m)
    offsets = torch.randint(0, 2 * m + 1, (2, n), generator=generator, device=images.device)
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)     # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)     # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]          # (N, 1, 1)
    shifted = padded[batch, :, rows[:, :, None], cols[:, None, :]]        # (N, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous()                       # (N, C, H, W)


class _Collate:
    """Stack (image, label) pairs into float images in [0, 1]; shift them when ``augment``."""

    def __init__(self, augment: bool, max_shift: int = 2):
        self.augment, self.max_shift = augment, max_shift

    def __call__(self, batch):
        images = to_float(torch.stack([image for image, _ in batch]))     # (B, 1, 28, 28)
        labels = torch.stack([label for _, label in batch])               # (B,)
        if self.augment:
            images = random_shift(images, self.max_shift)
        return images, labels


def make_loader(digits: Digits, *, train: bool, batch_size: int = 128,
                device: torch.device | str | None = None, num_workers: int = 0) -> DataLoader:
    """A DataLoader of (float images (B, 1, 28, 28) in [0, 1], labels (B,)).

    ``train=True`` shuffles and applies the 2-pixel random shift; ``train=False`` does neither.
    Pins memory when the target device is CUDA.
    """
    if batch_size < 1:
        raise ValueError(f"expected a positive batch size, got {batch_size}")
    pin = torch.device(device).type == "cuda" if device is not None else False
    return DataLoader(TensorDataset(digits.images, digits.labels), batch_size=batch_size,
                      shuffle=train, collate_fn=_Collate(augment=train), pin_memory=pin,
                      num_workers=num_workers)
