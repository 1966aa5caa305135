"""Calibration data: webdataset shards, split into global batches across processes.

``prepare_data`` (local rank 0 of each node, before any process reads) writes shards from a folder
of images on first use. ``val_dataloader`` runs inside each process once the process group exists,
so it knows its rank and world size from the trainer, not from environment variables that Lightning's
own launcher does not set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from dymu_lightning.config.schema import DataConfig
from dymu_lightning.data import GlobalBatchShards, read_index
from dymu_lightning.data.crops import GlobalBatchCrops
from dymu_lightning.data.frames import GlobalBatchFrames
from dymu_lightning.data.native import GlobalBatchNative
from dymu_lightning.data.source import prepare_shards


class ShardsDataModule(L.LightningDataModule):
    """Global batches of images from webdataset shards.

    Args:
        shards: folder of shards with their index.json.
        images: folder to write shards from if ``shards`` has none yet (or None).
        global_batch_size: images per global step, over all processes.
        transform: one PIL image -> ``[3, H, W]`` (the backbone's preprocessing).
        start_step: global steps already done (resume).
        max_images, num_workers, strict, shard_size: see ``DataConfig``.
        image_processor: an AnyRes image processor: the samples are its crops of the images
            (``data.crops=anyres``, :class:`GlobalBatchCrops`), or with ``frames`` a video processor: the
            samples are its frames of the videos (``data.crops=frames``, :class:`GlobalBatchFrames`);
            None: whole images through ``transform``.
        frames: ``image_processor`` is a video processor and the shards hold videos.
        native_dummy: ``(3, H, W)`` of dummy rows when ``transform`` sizes each image natively
            (``data.crops=native``, :class:`GlobalBatchNative`: rows of different sizes); None otherwise.
    """

    def __init__(
        self,
        shards: str,
        images: str | None,
        global_batch_size: int,
        transform: Callable[[Image.Image], Tensor],
        start_step: int = 0,
        max_images: int | None = None,
        num_workers: int = 0,
        strict: bool = False,
        shard_size: int = 1000,
        image_processor: Any = None,
        frames: bool = False,
        native_dummy: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.shards = Path(shards).expanduser()
        self.images = images
        self.global_batch_size = global_batch_size
        self.transform = transform
        self.start_step = start_step
        self.max_images = max_images
        self.num_workers = num_workers
        self.strict = strict
        self.shard_size = shard_size
        self.image_processor = image_processor
        self.frames = frames
        self.native_dummy = native_dummy
        self.dataset: GlobalBatchShards | None = None

    @classmethod
    def from_config(
        cls,
        data: DataConfig,
        transform: Callable[[Image.Image], Tensor],
        start_step: int = 0,
        image_processor: Any = None,
        native_dummy: tuple[int, int, int] | None = None,
    ) -> ShardsDataModule:
        """The DataModule a recipe's ``data`` section describes."""
        return cls(
            data.shards,
            data.images,
            data.global_batch_size,
            transform,
            start_step=start_step,
            max_images=data.max_images,
            num_workers=data.num_workers,
            strict=data.strict,
            shard_size=data.shard_size,
            image_processor=image_processor,
            frames=data.crops == "frames",
            native_dummy=native_dummy,
        )

    def prepare_data(self) -> None:
        prepare_shards(self.shards, self.images, self.shard_size, videos=self.frames)

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if self.image_processor is not None:
            processor = {"video_processor" if self.frames else "image_processor": self.image_processor}
            self.dataset = (GlobalBatchFrames if self.frames else GlobalBatchCrops)(
                read_index(self.shards),
                self.global_batch_size,
                **processor,
                rank=rank,
                world_size=world,
                start_step=self.start_step,
                strict=self.strict,
                max_samples=self.max_images,
            )
            return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
        if self.native_dummy is not None:
            self.dataset = GlobalBatchNative(
                read_index(self.shards),
                self.global_batch_size,
                transform=self.transform,
                dummy_shape=self.native_dummy,
                rank=rank,
                world_size=world,
                start_step=self.start_step,
                strict=self.strict,
                max_samples=self.max_images,
            )
            return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
        self.dataset = GlobalBatchShards(
            read_index(self.shards),
            global_batch_size=self.global_batch_size,
            rank=rank,
            world_size=world,
            transform=self.transform,
            start_step=self.start_step,
            strict=self.strict,
            max_samples=self.max_images,
        )
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
