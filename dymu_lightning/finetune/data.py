"""Labelled shards for fine-tuning: shuffled global batches for training, ordered ones for validation.

Training batches are built like the calibration's: a global batch is a fixed set of images (here a
seeded permutation of the training set per epoch), and rank ``r`` of ``W`` takes the ``r``-th equal
slice of it. The same global batches therefore reach the model whatever the number of processes, and
with gradients averaged over ranks a 2-process run takes the same steps as a 1-process one. The last
partial batch of an epoch is dropped, so every rank steps the same number of times.

Resume: the loader is stateful (Lightning saves its ``state_dict`` in the checkpoint), so a run resumed
from a mid-epoch checkpoint continues with the next batch of the same permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from dymu_lightning.data import GlobalBatchShards, read_index
from dymu_lightning.data.source import labels_from_keys, prepare_shards


class LabelledImages(Dataset):
    """Map-style view of labelled shards: item ``i`` is ``{"pixels", "label", "index"}``."""

    def __init__(
        self,
        shards: Path,
        transform: Callable[[Image.Image], Tensor],
        label_pattern: str,
        max_images: int | None = None,
        where: str = "data.train_shards",
    ) -> None:
        self.shards = GlobalBatchShards(read_index(shards), 1, transform=transform, strict=True, max_samples=max_images)
        keys = [self.shards.key(i) for i in range(self.shards.num_samples)]
        self.labels = labels_from_keys(keys, label_pattern, f"{where} {shards}")

    def __len__(self) -> int:
        return self.shards.num_samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        pixels = self.shards.transform(self.shards.image(i))
        return {"pixels": pixels, "label": self.labels[i], "index": i}


class EpochBatches(Sampler[list[int]]):
    """Local batches of one rank: epoch ``e`` is a permutation seeded by ``(seed, e)``, cut into global
    batches of ``global_batch_size``; this rank takes its slice of each. Lightning calls
    :meth:`set_epoch` at the start of every epoch; ``start`` (set on resume) skips the batches
    already trained on."""

    def __init__(self, num_samples: int, global_batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} processes")
        self.num_batches = num_samples // global_batch_size
        if self.num_batches == 0:
            raise ValueError(f"{num_samples} training images make no full global batch of {global_batch_size}")
        self.global_batch_size, self.rank, self.world_size, self.seed = global_batch_size, rank, world_size, seed
        self.num_samples = num_samples
        self.epoch = 0
        self.start = 0
        # Lightning sets the epoch on ``loader.sampler`` and ``loader.batch_sampler.sampler`` only.
        self.sampler = _EpochSetter(self)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def order(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0  # a resumed position applies to one pass only
        order = self.order(self.epoch)
        local = self.global_batch_size // self.world_size
        for batch in range(start, self.num_batches):
            first = batch * self.global_batch_size + self.rank * local
            yield order[first : first + local].tolist()


class _EpochSetter:
    def __init__(self, batches: EpochBatches) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints and restores on resume.

    The position is the epoch Lightning last set on the sampler and ``batches_done()``, the batches of
    it the model has trained on (from the trainer's progress counters). It is read when a checkpoint
    is written, after a batch was trained on but before the loader's prefetched batches are, so the
    sampler's own count of batches handed out would run ahead."""

    def __init__(self, dataset: Dataset, batches: EpochBatches, batches_done: Callable[[], int], **kwargs: Any):
        super().__init__(dataset, batch_sampler=batches, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.batch_sampler.epoch, self.batches_done()
        if done >= self.batch_sampler.num_batches:
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.epoch = int(state["epoch"])
        self.batch_sampler.start = int(state["batches_done"])


class LabelledBatches(IterableDataset):
    """Validation batches: :class:`GlobalBatchShards` (ordered, split over ranks, padded so that every
    rank takes the same number of steps) with each row's label added (``-1`` on padding rows)."""

    def __init__(self, batches: GlobalBatchShards, labels: Tensor) -> None:
        self.batches, self.labels = batches, labels

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches:
            index = batch["index"]
            batch["label"] = torch.where(index >= 0, self.labels[index.clamp(min=0)], -1)
            yield batch


class FinetuneDataModule(L.LightningDataModule):
    """Training and validation data of a finetune recipe (see ``FinetuneDataConfig``)."""

    def __init__(self, cfg: Any, transform: Callable[[Image.Image], Tensor], seed: int) -> None:
        super().__init__()
        self.cfg, self.transform, self.seed = cfg, transform, seed
        self.train: LabelledImages | None = None

    def prepare_data(self) -> None:
        prepare_shards(self.cfg.train_shards, self.cfg.train_images, self.cfg.shard_size)
        prepare_shards(self.cfg.val_shards, self.cfg.val_images, self.cfg.shard_size)

    def train_images(self) -> LabelledImages:
        if self.train is None:
            self.train = LabelledImages(
                Path(self.cfg.train_shards).expanduser(),
                self.transform,
                self.cfg.label_pattern,
                self.cfg.max_train_images,
            )
        return self.train

    def val_images(self) -> LabelledImages:
        return LabelledImages(
            Path(self.cfg.val_shards).expanduser(),
            self.transform,
            self.cfg.label_pattern,
            self.cfg.max_val_images,
            "data.val_shards",
        )

    def train_dataloader(self) -> ResumableLoader:
        trainer = self.trainer
        dataset = self.train_images()
        batches = EpochBatches(
            len(dataset), self.cfg.global_batch_size, trainer.global_rank, trainer.world_size, self.seed
        )

        def batches_done() -> int:
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed

        return ResumableLoader(dataset, batches, batches_done, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        return self.ordered_loader(trainer.global_rank, trainer.world_size)

    def ordered_loader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Validation images in sample order, this rank's slice of each global batch."""
        images = self.val_images()
        batches = GlobalBatchShards(
            images.shards.index,
            self.cfg.val_batch_size,
            rank=rank,
            world_size=world_size,
            transform=self.transform,
            strict=True,
            max_samples=self.cfg.max_val_images,
        )
        return DataLoader(LabelledBatches(batches, images.labels), batch_size=None, num_workers=self.cfg.num_workers)
