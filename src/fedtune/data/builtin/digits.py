"""Handwritten digits, the image modality's offline datasets: MNIST and UCI optdigits.

The local copy of MNIST is the official *test* set only (10,000 images; no train file could
be had offline), so fedtune splits it 8,000 / 2,000 by a fixed permutation, the same for
every run seed. With Hub access ``mnist`` is ``ylecun/mnist`` (60,000 / 10,000). optdigits
(8 x 8, grey levels 0..16) has its official 3,823 / 1,797 split and no Hub copy.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np

from fedtune.data.sources import BuiltinDataset, TaskData, image_rows, register
from fedtune.errors import UsageError

DIGITS = [str(d) for d in range(10)]
MNIST_FILES = ("images_small/mnist_test/t10k-images-idx3-ubyte.gz", "images_small/mnist_test/t10k-labels-idx1-ubyte.gz")
MNIST_TRAIN = 8000


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic (0, 0, dtype 0x08 = uint8, ndim), the sizes, the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise UsageError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_local(root: Path) -> TaskData:
    images, labels = (read_idx(root / name) for name in MNIST_FILES)
    order = np.random.default_rng(0).permutation(len(labels))  # fixed: one split for every run seed
    train, test = order[:MNIST_TRAIN], order[MNIST_TRAIN:]
    return TaskData(
        "mnist", "classification", "accuracy",
        image_rows(list(images[train]), labels[train].tolist()), image_rows(list(images[test]), labels[test].tolist()),
        label_names=DIGITS, natural_key="label", source=str(root / "images_small" / "mnist_test"),
    )  # fmt: skip


def _mnist_hub() -> TaskData:
    ds = datasets.load_dataset("ylecun/mnist")
    parts = {s: image_rows(list(ds[s]["image"]), list(ds[s]["label"])) for s in ("train", "test")}
    return TaskData(
        "mnist", "classification", "accuracy", parts["train"], parts["test"],
        label_names=DIGITS, natural_key="label", source="hub:ylecun/mnist",
    )  # fmt: skip


def _optdigits_split(path: Path) -> datasets.Dataset:
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    pixels = (table[:, :64].reshape(-1, 8, 8) * 255 // 16).astype(np.uint8)  # grey levels 0..16 -> 0..255
    return image_rows(list(pixels), table[:, 64].tolist())


def _optdigits_local(root: Path) -> TaskData:
    folder = root / "images_small" / "optdigits"
    return TaskData(
        "optdigits", "classification", "accuracy",
        _optdigits_split(folder / "optdigits.tra"), _optdigits_split(folder / "optdigits.tes"),
        label_names=DIGITS, natural_key="label", source=str(folder),
    )  # fmt: skip


def _optdigits_hub() -> TaskData:
    raise UsageError("optdigits has no Hub copy: set data_dir= (or FEDTUNE_DATA_DIR) to a folder with images_small/optdigits/")


register("mnist", BuiltinDataset("MNIST handwritten digits (local: the 10k test set split 8k/2k; Hub: ylecun/mnist)", _mnist_local, _mnist_hub, MNIST_FILES))
register(
    "optdigits",
    BuiltinDataset(
        "UCI optdigits, 8x8 handwritten digits (3,823 / 1,797)", _optdigits_local, _optdigits_hub,
        ("images_small/optdigits/optdigits.tra", "images_small/optdigits/optdigits.tes"),
    ),
)  # fmt: skip
