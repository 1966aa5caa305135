"""Where a task's images come from: a folder of shards, written from a folder of images on first use.

Calibration, evaluation and fine-tuning all name their data the same way (``data.shards`` and
``data.images`` in a recipe); this module turns that into a folder of shards.
"""

from __future__ import annotations

from pathlib import Path

from dymu_lightning.assets.paths import PHOTO_SETS, photos_dir, require
from dymu_lightning.data.shards import INDEX_NAME, write_shards

ASSET_PREFIX = "assets:"  # data.images=assets:skimage names a bundled photo set (docs/assets.md)


def resolve_images(images: str) -> Path:
    """A folder of images; ``assets:skimage`` and ``assets:mvtb`` name the photos bundled with
    scikit-image and mvtb-data (see docs/assets.md)."""
    name = images.removeprefix(ASSET_PREFIX)
    if images.startswith(ASSET_PREFIX) and name in PHOTO_SETS:
        return require(photos_dir(name), f"data.images={images}")
    path = Path(images).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.images: no folder at {path}")
    return path


def prepare_shards(shards: str | Path, images: str | None = None, shard_size: int = 1000) -> Path:
    """The shard folder ``shards``, written first from the folder ``images`` if it has no index yet
    (``images`` None: the shards must already exist). Read it with :func:`~dymu_lightning.data.read_index`."""
    shards = Path(shards).expanduser()
    if images is not None and not (shards / INDEX_NAME).is_file():
        write_shards(resolve_images(images), shards, shard_size=shard_size)
    return shards
