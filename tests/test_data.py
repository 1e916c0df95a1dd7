import gzip
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from capsutil import data

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAS_FULL_MNIST = (SHARED_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


@pytest.fixture
def no_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    return tmp_path / "empty"


@pytest.mark.parametrize("split, n", [("train", 5000), ("test", 1000)])
def test_fallback_gives_the_shipped_sample_and_says_so(no_data_root, capsys, split, n):
    digits = data.load_mnist(split, root=no_data_root)
    assert "using the shipped sample" in capsys.readouterr().out
    assert digits.images.shape == (n, 1, 28, 28) and digits.images.dtype == torch.uint8
    assert digits.labels.shape == (n,) and digits.labels.dtype == torch.int64
    assert torch.bincount(digits.labels, minlength=10).tolist() == [n // 10] * 10
    assert digits.source == "MNIST sample shipped with capsutil"


def test_shipped_sample_is_small_and_records_the_md5_of_its_sources():
    folder = Path(data.__file__).parent / "_sample"
    assert (folder / data.SAMPLE_FILE).stat().st_size < 5 * 2**20
    sources = json.loads((folder / "SOURCES.json").read_text())
    assert sources["md5"]["train-images-idx3-ubyte"] == "6bbc9ace898e44ae57da46a324031adb"
    assert sources["md5"]["t10k-images-idx3-ubyte"] == "2646ac647ad5339dbf082846283269ea"
    assert sources["sizes"] == {"train": 5000, "test": 1000}


@pytest.mark.skipif(not HAS_FULL_MNIST, reason="the full MNIST files are not beside the repo")
def test_full_mnist_from_capsutil_data_environment_variable(monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(SHARED_DATA))
    train, test = data.load_mnist("train"), data.load_mnist("test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.images.shape == (60_000, 1, 28, 28) and train.source == "MNIST"
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.skipif(not HAS_FULL_MNIST, reason="the full MNIST files are not beside the repo")
def test_shipped_sample_equals_the_official_images_it_was_taken_from():
    official = data.load_official("test", SHARED_DATA)
    sample = data.load_sample("test")
    first_sevens = torch.nonzero(official.labels == 7).squeeze(1)[:100]
    assert torch.equal(sample.images[sample.labels == 7], official.images[first_sevens])


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_root(tmp_path):
    """A data root whose test split has valid headers for 10,000 images (gzip-compressed)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (10_000, 28, 28))
    _write_idx(raw / "t10k-images-idx3-ubyte", images, 2051)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10_000) % 10, 2049)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with open(raw / name, "rb") as src, gzip.open(raw / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw / name)
    return tmp_path


def test_reads_gzip_files_in_torchvision_layout(tiny_root):
    digits = data.load_mnist("test", root=tiny_root, download=False)
    assert digits.images.shape == (10_000, 1, 28, 28)
    assert digits.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_truncated_file_raises_an_error_naming_it(tiny_root):
    path = tiny_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    content = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(content[: len(content) // 2]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is truncated"):
        data.load_mnist("test", root=tiny_root)


def test_corrupt_header_raises_an_error_naming_the_file(tiny_root):
    path = tiny_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[3] = 0xFF  # break the magic number
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is corrupt"):
        data.load_mnist("test", root=tiny_root)


def test_damaged_gzip_raises_an_error_naming_the_file(tiny_root):
    path = tiny_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"not a gzip archive at all")
    with pytest.raises(ValueError, match="cannot read MNIST file t10k-images-idx3-ubyte.gz"):
        data.load_mnist("test", root=tiny_root)


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        data.load_mnist("validation")


def test_root_that_is_a_file_raises(tmp_path):
    file_root = tmp_path / "not_a_folder"
    file_root.write_text("")
    with pytest.raises(ValueError, match="is a file, expected a directory"):
        data.load_mnist("train", root=file_root)


def test_root_of_the_wrong_type_raises():
    with pytest.raises(ValueError, match="as a path or string, got int"):
        data.load_mnist("train", root=3)


def test_random_shift_moves_each_image_by_at_most_two_pixels_with_zero_padding():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 14, 14] = 1.0
    shifted = data.random_shift(image.repeat(500, 1, 1, 1), max_shift=2)
    assert shifted.shape == (500, 1, 28, 28)
    positions = torch.nonzero(shifted[:, 0])[:, 1:] - 14          # (500, 2) offsets
    assert positions.abs().max() == 2 and len(positions) == 500   # each image keeps its pixel
    assert len(torch.unique(positions, dim=0)) == 25              # every offset occurs
    border = torch.ones(1, 1, 28, 28)
    assert data.random_shift(border.repeat(200, 1, 1, 1)).eq(0).any()  # zeros come in


def test_training_loader_shifts_and_shuffles_but_test_loader_does_not(no_data_root):
    digits = data.load_sample("test")
    images, labels = next(iter(data.make_loader(digits, train=False, batch_size=64)))
    assert images.dtype == torch.float32 and images.shape == (64, 1, 28, 28)
    assert torch.equal(images, digits.images[:64].float() / 255)
    assert torch.equal(labels, digits.labels[:64])
    torch.manual_seed(0)
    images, labels = next(iter(data.make_loader(digits, train=True, batch_size=256)))
    assert not torch.equal(labels, digits.labels[:256])
    originals = digits.images.float() / 255
    matches = [(originals == image).all(dim=(1, 2, 3)).any().item() for image in images]
    assert sum(matches) < len(matches)  # most were moved (a zero shift occurs 1 time in 25)


def test_loader_rejects_a_non_positive_batch_size():
    with pytest.raises(ValueError, match="positive batch size"):
        data.make_loader(data.load_sample("test"), train=False, batch_size=0)


def _check_split(digits: data.Digits, split: data.ValidationSplit, val_size: int) -> None:
    """Sizes, disjointness, and the class mix of the whole set in the validation set."""
    assert (len(split.train), len(split.val)) == (len(digits) - val_size, val_size)
    val = set(split.val_indices.tolist())
    assert len(val) == val_size
    train_positions = [i for i in range(len(digits)) if i not in val]
    assert torch.equal(split.train.images, digits.images[train_positions])
    assert torch.equal(split.val.labels, digits.labels[split.val_indices])
    shares = torch.bincount(split.val.labels, minlength=10) / val_size
    whole = torch.bincount(digits.labels, minlength=10) / len(digits)
    assert (shares - whole).abs().max() < 1.5 / val_size * 10


def test_validation_split_of_the_sample_is_proportional_disjoint_and_stratified():
    sample = data.load_sample("train")
    split = data.split_validation(sample)
    _check_split(sample, split, 417)                            # 1/12 of 5,000, as 5,000/60,000
    assert torch.bincount(split.val.labels).tolist() == [42] * 7 + [41] * 3
    again = data.split_validation(sample)
    assert again.record() == split.record()                     # deterministic
    assert split.record()["val_indices_sha256"] != data.split_validation(sample, 400).record()[
        "val_indices_sha256"]


@pytest.mark.skipif(not HAS_FULL_MNIST, reason="the full MNIST files are not beside the repo")
def test_validation_split_of_full_mnist_is_55000_and_5000():
    train = data.load_mnist("train", root=SHARED_DATA)
    split = data.split_validation(train)
    _check_split(train, split, 5000)
    assert split.val_indices.min() > 50_000                     # the last images of each class


def test_stratified_tail_takes_the_last_of_each_class_in_file_order():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2, 2])
    assert data.stratified_tail(labels, 5).tolist() == [4, 5, 6, 7, 9]


@pytest.mark.parametrize("val_size", [0, 5000, -3, 2.5, True])
def test_validation_split_rejects_impossible_sizes(val_size):
    with pytest.raises(ValueError, match="expected a validation size between 1 and 4999"):
        data.split_validation(data.load_sample("train"), val_size)


@pytest.mark.parametrize("value", ["1", "True", "TRUE", "true", "on", "Yes", " yes "])
def test_any_usual_spelling_of_offline_forbids_downloads(no_data_root, capsys, monkeypatch,
                                                         value):
    monkeypatch.setenv(data.OFFLINE_ENV, value)
    monkeypatch.setitem(sys.modules, "torchvision", None)       # importing it would fail loudly
    data.load_mnist("test", root=no_data_root)
    assert "(downloads are off (CAPSUTIL_OFFLINE is set))" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "", "off", "no"])
def test_other_values_of_offline_allow_downloads(monkeypatch, value):
    monkeypatch.setenv(data.OFFLINE_ENV, value)
    assert not data.offline()


def test_a_failed_download_says_why_in_the_fallback_line(no_data_root, capsys, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    datasets = SimpleNamespace(MNIST=unreachable)
    monkeypatch.setenv(data.OFFLINE_ENV, "0")
    monkeypatch.setitem(sys.modules, "torchvision", SimpleNamespace(datasets=datasets))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    data.load_mnist("test", root=no_data_root)
    assert ("not downloaded (the download failed: OSError: network is unreachable); using the "
            "shipped sample" in capsys.readouterr().out)


def test_labels_outside_0_to_9_raise_an_error_naming_the_file(tiny_root):
    path = tiny_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[8 + 5] = 10                                         # the sixth label, after the header
    content[8 + 9] = 255
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is corrupt: labels must be "
                                         "digits 0-9, found 2 above 9 \\(largest 255\\)"):
        data.load_mnist("test", root=tiny_root, download=False)
