"""Where a task's images come from: a folder of shards, written from a folder of images on first use.

Calibration, evaluation and fine-tuning all name their data the same way (``data.shards`` and
``data.images`` in a recipe); this module turns that into a folder of shards.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from dymu_lightning.assets.paths import PHOTO_SETS, photos_dir, require
from dymu_lightning.data import fashion_mnist
from dymu_lightning.data.shards import INDEX_NAME, write_shards

ASSET_PREFIX = "assets:"  # data.images=assets:skimage names a bundled photo set (docs/assets.md)


def resolve_images(images: str) -> Path:
    """A folder of images; ``assets:skimage`` and ``assets:mvtb`` name the photos bundled with
    scikit-image and mvtb-data, ``fashion_mnist:train:N`` / ``fashion_mnist:test:N`` the first N images
    of a Fashion-MNIST split (see docs/assets.md)."""
    if images.startswith(fashion_mnist.SOURCE_PREFIX):
        return fashion_mnist.fashion_mnist_images(*fashion_mnist.parse_source(images))
    name = images.removeprefix(ASSET_PREFIX)
    if images.startswith(ASSET_PREFIX) and name in PHOTO_SETS:
        return require(photos_dir(name), f"data.images={images}")
    path = Path(images).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.images: no folder at {path}")
    return path


def check_shards(shards: str | Path, images: str | None = None, key: str = "data.shards") -> Path:
    """The shard folder ``shards`` as a path; a one-line error, naming ``key``, for what cannot be a
    shard folder: a pattern, a file, or (``images`` None) a folder that does not exist."""
    path = Path(shards).expanduser()
    if not path.exists() and any(c in str(shards) for c in "*?[{"):
        folder = next(p for p in path.parents if not any(c in str(p) for c in "*?[{"))
        raise ValueError(
            f"{key}={shards} is a pattern and matches no folder; {key} names the folder that holds the .tar "
            f"shards (here probably {key}={folder})"
        )
    if path.is_file():
        hint = f" (here probably {key}={path.parent})" if path.suffix == ".tar" else ""
        raise ValueError(f"{key}={shards} is a file; {key} names the folder that holds the .tar shards{hint}")
    if not path.exists() and images is None:
        raise FileNotFoundError(
            f"{key}={shards}: no such folder; write shards there with `dymu shards IMAGES_DIR {path}`, or set "
            "data.images to write them on the first run"
        )
    return path


def prepare_shards(shards: str | Path, images: str | None = None, shard_size: int = 1000, videos: bool = False) -> Path:
    """The shard folder ``shards``, written first from the folder ``images`` if it holds no shards yet
    (``images`` None: the shards must already exist; ``videos``: ``images`` holds videos, see
    :func:`~dymu_lightning.data.shards.video_sources`). Read it with :func:`~dymu_lightning.data.read_index`."""
    shards = check_shards(shards, images)
    has_shards = (shards / INDEX_NAME).is_file() or (shards.is_dir() and any(shards.glob("*.tar")))
    if images is not None and not has_shards:
        write_shards(resolve_images(images), shards, shard_size=shard_size, videos=videos)
    return shards


def labels_from_keys(keys: list[str], pattern: str, where: str) -> Tensor:
    """``[n]`` long: the integer in the first group of ``pattern`` matched at the start of each key."""
    compiled = re.compile(pattern)
    labels = []
    for key in keys:
        match = compiled.match(key)
        if match is None:
            raise ValueError(f"{where}: sample key {key!r} does not match probe.label_pattern {pattern!r}")
        labels.append(int(match.group(1)))
    return torch.tensor(labels, dtype=torch.long)
