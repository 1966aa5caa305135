"""Fashion-MNIST as image files: the labelled set the probe and fine-tuning studies read.

``python -m dymu_lightning assets`` fetches the four IDX files (docs/assets.md); this module turns the
first N images of a split into 28x28 PNG files named ``{label}_{index:05d}.png``, so that the label
leads the file name and survives sharding as the sample key (``label_pattern: ^(\\d+)_``).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch

from dymu_lightning.assets.paths import cache_dir, fashion_mnist_idx_dir, require
from dymu_lightning.files import install_dir_atomically, make_staging_dir

SPLITS = {"train": "train", "test": "t10k"}  # split -> IDX file prefix
SOURCE_PREFIX = "fashion_mnist:"  # data.images=fashion_mnist:train:N names the first N training images


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzipped): ``[n]`` labels or ``[n, rows, cols]`` images, uint8."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def fashion_mnist_images(split: str, count: int, force: bool = False) -> Path:
    """The folder of the first ``count`` images of the ``train`` or ``test`` split, written once into
    the asset cache."""
    prefix = SPLITS.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    target = cache_dir() / "images" / f"fashion-mnist-{split}-{count}"
    if target.is_dir() and not force:
        return target
    from PIL import Image

    source = require(fashion_mnist_idx_dir(), "Fashion-MNIST")
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
    if not 1 <= count <= len(labels):
        raise ValueError(f"Fashion-MNIST {split} has {len(labels)} images; count={count} is out of range")
    staging = make_staging_dir(target)
    try:
        for i in range(count):
            Image.fromarray(images[i].numpy()).save(staging / f"{int(labels[i])}_{i:05d}.png")
        install_dir_atomically(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def parse_source(images: str) -> tuple[str, int]:
    """``fashion_mnist:SPLIT:N`` -> (split, N), or a ValueError naming the expected form."""
    parts = images.split(":")
    if len(parts) != 3 or parts[1] not in SPLITS or not parts[2].isdigit() or int(parts[2]) < 1:
        raise ValueError(f"{images!r}: expected fashion_mnist:train:N or fashion_mnist:test:N")
    return parts[1], int(parts[2])
