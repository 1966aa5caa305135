"""Calibration over images at native resolution (``data.crops=native``), for towers that take
images of any size (Qwen2-VL, Qwen2.5-VL).

Each image is resized by the tower's own rule (:meth:`native_size`: sides to multiples of a cell,
area within ``[min_pixels, max_pixels]``), so the images of one global batch have different cell
counts. Batching is that of :class:`~dymu_lightning.data.loader.GlobalBatchShards` (the same sets of
images whatever the number of processes); only ``pixels`` differs: a list of ``[3, H_i, W_i]``
tensors instead of one stacked tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dymu_lightning.data.loader import GlobalBatchShards, Transform
from dymu_lightning.data.shards import ShardIndex


class GlobalBatchNative(GlobalBatchShards):
    """:class:`GlobalBatchShards` whose rows keep their own size: ``pixels`` is a list of ``b``
    tensors ``[3, H_i, W_i]``. Dummy rows (padding past the data, undecodable images) are zeros of
    ``dummy_shape``, flagged ``valid = False`` as there, so they take no part in the ranking.

    Args:
        index, global_batch_size, rank, world_size, start_step, strict, max_samples: as in
            :class:`GlobalBatchShards`.
        transform: one RGB image -> ``[3, H, W]`` at its native size.
        dummy_shape: ``(3, H, W)`` of dummy rows (any size the tower takes).
    """

    def __init__(
        self,
        index: ShardIndex | Path | str,
        global_batch_size: int,
        *,
        transform: Transform,
        dummy_shape: tuple[int, int, int],
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        strict: bool = False,
        max_samples: int | None = None,
    ) -> None:
        super().__init__(
            index,
            global_batch_size,
            rank=rank,
            world_size=world_size,
            transform=transform,
            start_step=start_step,
            strict=strict,
            max_samples=max_samples,
        )
        self.dummy_shape = tuple(dummy_shape)

    def _pixels(self, rows: list[torch.Tensor | None], indices: list[int]) -> list[torch.Tensor]:
        """``b`` tensors ``[3, H_i, W_i]``, each at its own size; zeros of ``dummy_shape`` for missing rows."""
        return [row if row is not None else torch.zeros(self.dummy_shape) for row in rows]
