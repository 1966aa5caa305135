"""Global batches over the parts a model's own processor cuts each sample into: an image's AnyRes
crops (:mod:`~dymu_lightning.data.crops`), a video's frames (:mod:`~dymu_lightning.data.frames`).

DyMU merges each part alone at inference (a crop or a frame is one image for the vision tower), so
calibration ranks parts: every part is one row of the global ranking. Batching stays that of
:class:`~dymu_lightning.data.loader.GlobalBatchShards`, over a numbering of parts instead of samples,
so global batches are the same sets of parts whatever the number of processes.

The parts of a sample are counted up front (every rank must run the same number of steps) from what
its header says (an image's size, a video's frame count); the parts the processor then makes are
checked against that count.
"""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path
from typing import Any

from torch import Tensor

from dymu_lightning.data.loader import GlobalBatchShards, Transform
from dymu_lightning.data.shards import ShardIndex


class GlobalBatchParts(GlobalBatchShards):
    """:class:`GlobalBatchShards` whose rows are the parts of the samples, in sample order.

    ``pixels`` rows are parts ``[3, S, S]``; ``index`` is the part's global index; an undecodable
    sample counts one part, which is skipped (``valid = False``) like an undecodable image.
    ``max_samples`` limits the samples (images, videos), not the parts. Subclasses say how many parts
    a sample has (:meth:`_count`) and cut them (:meth:`_parts`).

    Args:
        index, global_batch_size, rank, world_size, start_step, strict, max_samples: as in
            :class:`GlobalBatchShards` (``start_step`` counts steps of parts).
        transform: a decoded sample -> its first part ``[3, S, S]`` (the template of dummy rows).
    """

    unit = "parts"  # what a part is, in messages (crops, frames)

    def __init__(
        self,
        index: ShardIndex | Path | str,
        global_batch_size: int,
        *,
        transform: Transform,
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
            strict=strict,
            max_samples=max_samples,
        )
        self.num_wholes = self.num_samples  # images or videos
        self.part_counts = [self._count(i) for i in range(self.num_wholes)]
        self.part_starts = [0, *itertools.accumulate(self.part_counts)]
        self.num_samples = self.part_starts[-1]
        self.num_steps = -(-self.num_samples // global_batch_size)
        if not 0 <= start_step <= self.num_steps:
            raise ValueError(f"start_step must be in 0..{self.num_steps} ({self.num_steps} steps), got {start_step}")
        self.start_step = start_step
        self._cached: tuple[int, Tensor | None] | None = None  # the last sample's parts: they come in a row

    def _count(self, sample: int) -> int:
        """Parts of sample ``sample`` (1 for an unreadable one, skipped at load time)."""
        raise NotImplementedError

    def _parts(self, decoded: Any) -> Tensor:
        """``[parts, 3, S, S]``: the processor's parts of one decoded sample."""
        raise NotImplementedError

    def _cut_by(self) -> str:
        """How the parts were counted, for the error when the processor cuts another number."""
        raise NotImplementedError

    def _sample_location(self, sample: int) -> tuple[Path, str, int, int]:
        """(shard, key, offset, size) of whole sample ``sample`` (not of a part)."""
        return super()._location(sample)

    def part_of(self, i: int) -> tuple[int, int]:
        """(sample, part within it) of global part ``i``."""
        sample = bisect.bisect_right(self.part_starts, i) - 1  # the last sample whose first part is <= i
        return sample, i - self.part_starts[sample]

    def part(self, i: int) -> Tensor | None:
        """``[3, S, S]``: global part ``i``; None when its sample is undecodable (and skipped)."""
        return self._load(i)

    def _location(self, i: int) -> tuple[Path, str, int, int]:
        return super()._location(self.part_of(i)[0])

    def _load(self, i: int) -> Tensor | None:
        sample, part = self.part_of(i)
        if self._cached is None or self._cached[0] != sample:
            decoded = self._decode(i)  # through _location: the sample part i is cut from
            parts = self._skip(i, decoded) if isinstance(decoded, str) else self._parts(decoded)
            if parts is not None and parts.shape[0] != self.part_counts[sample]:
                raise ValueError(
                    f"sample {self.key(i)!r}: the processor made {parts.shape[0]} {self.unit}, but "
                    f"{self._cut_by()} gives {self.part_counts[sample]}"
                )
            self._cached = (sample, parts)
        parts = self._cached[1]
        return None if parts is None else parts[part]
