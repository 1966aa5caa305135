"""Deterministic global batches over indexed shards, split across ranks and DataLoader workers.

Calibration ranks token-pair edges over a *global* batch, the union of all ranks' local batches, so a
global batch must be the same set of images whatever the number of processes. Batching is therefore
done here, at the sample level, from the global sample order of the size index:

- step ``s`` is global samples ``[s*G, (s+1)*G)``; rank ``r`` of ``W`` takes ``[s*G + r*b, s*G + (r+1)*b)``
  with ``b = G / W``;
- every rank yields ``ceil(N / G)`` batches of exactly ``b`` rows, so collectives inside a step never hang;
  rows past the end of the data, and undecodable images, are zero dummies flagged ``valid = False``;
- worker ``w`` of ``n`` yields steps ``start_step + w, start_step + w + n, ...``, which the DataLoader's
  round-robin puts back in step order.

Use it with ``DataLoader(dataset, batch_size=None, num_workers=...)``: the dataset yields whole batches.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from dymu_lightning.data.shards import ShardIndex, read_index

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Tensor]


def num_steps(total: int, global_batch_size: int) -> int:
    """Global steps needed to cover ``total`` samples once, the last one possibly partial."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    return math.ceil(total / global_batch_size)


def local_slice(step: int, global_batch_size: int, rank: int, world_size: int) -> range:
    """Global sample indices of rank ``rank``'s rows in step ``step`` (before clipping to the data)."""
    local = global_batch_size // world_size
    first = step * global_batch_size + rank * local
    return range(first, first + local)


class GlobalBatchShards(IterableDataset):
    """Local batches of one rank: every rank yields the same number of steps with fixed shapes.

    Each item is a dict:

    - ``pixels``: ``[b, 3, H, W]``, ``transform`` applied to each RGB image; dummy rows are zeros.
    - ``valid``: ``[b]`` bool, True for rows holding a real, decoded image.
    - ``index``: ``[b]`` long, the row's global sample index; ``-1`` for padding past the end of the
      data. A row skipped as undecodable keeps its index with ``valid = False``, so the main process
      can audit skips even when they happened in DataLoader workers.
    - ``step``: int, the global step.

    Dummy rows take the shape and dtype of the real rows of their batch. A batch with no real row (a
    rank's slice lies past the end of the data, or all its images are corrupt) uses ``image_shape``
    when given (default float dtype), else the transform's output for the first decodable sample of
    the dataset, computed once per process. Given ``image_shape`` is also checked against every real row.

    Args:
        index: a :class:`ShardIndex`, or a path accepted by :func:`read_index`.
        global_batch_size: ``G``, samples per step over all ranks; divisible by ``world_size``.
        rank, world_size: this process among the ranks (take them from the trainer, not the environment).
        transform: one RGB ``PIL.Image`` -> ``[3, H, W]`` tensor; every image must give the same shape.
        start_step: first step to yield (resume): earlier steps are skipped without being read.
        strict: raise on an undecodable image instead of skipping it.
        max_samples: use only the first N samples of the index (shrunken runs).
        image_shape: ``(3, H, W)`` of the transform's output, to build all-dummy batches without a probe.

    ``skipped`` lists ``(shard path, key, reason)`` of images skipped by this process in the current
    pass; with DataLoader workers each worker has its own list (use ``index`` with ``~valid`` instead).
    """

    what = "image"  # what a sample is, in log lines

    def __init__(
        self,
        index: ShardIndex | Path | str,
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        transform: Transform,
        start_step: int = 0,
        strict: bool = False,
        max_samples: int | None = None,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.index = index if isinstance(index, ShardIndex) else read_index(Path(index))
        _check_split(global_batch_size, rank, world_size)
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.num_samples = self.index.total if max_samples is None else min(self.index.total, max_samples)
        if self.num_samples == 0:
            raise ValueError(f"no samples in the shard index at {self.index.root}")
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = global_batch_size // world_size
        self.num_steps = num_steps(self.num_samples, global_batch_size)
        if not 0 <= start_step <= self.num_steps:
            raise ValueError(f"start_step must be in 0..{self.num_steps} ({self.num_steps} steps), got {start_step}")
        self.start_step = start_step
        self.transform = transform
        self.strict = strict
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.skipped: list[tuple[str, str, str]] = []
        self._files = _OpenFiles()
        self._template: Tensor | None = None

    def __len__(self) -> int:
        """Steps this dataset yields: ``num_steps - start_step``, the same on every rank."""
        return self.num_steps - self.start_step

    def steps(self, worker: int = 0, num_workers: int = 1) -> range:
        """Steps yielded by DataLoader worker ``worker`` of ``num_workers``: every ``num_workers``-th one,
        counted from ``start_step`` so that the loader's round-robin starts with worker 0."""
        return range(self.start_step + worker, self.num_steps, num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.skipped = []
        for step in self.steps(worker, workers):
            yield self.batch(step)

    def batch(self, step: int) -> dict[str, Any]:
        """The local batch of this rank at ``step`` (see the class docstring for the fields)."""
        rows: list[Tensor | None] = []
        indices: list[int] = []
        for i in local_slice(step, self.global_batch_size, self.rank, self.world_size):
            if i < self.num_samples:
                indices.append(i)
                rows.append(self._load(i))
            else:
                indices.append(-1)
                rows.append(None)
        valid = torch.tensor([row is not None for row in rows], dtype=torch.bool)
        pixels = self._pixels(rows, indices)
        return {"pixels": pixels, "valid": valid, "index": torch.tensor(indices, dtype=torch.long), "step": step}

    def _pixels(self, rows: list[Tensor | None], indices: list[int]) -> Tensor | list[Tensor]:
        """``[b, 3, H, W]``: the rows stacked, zeros shaped like a real row in place of each missing one."""
        template = self._check_shapes(rows, indices)
        return torch.stack([row if row is not None else torch.zeros_like(template) for row in rows])

    def key(self, i: int) -> str:
        """The sample key of global sample ``i`` (its file stem when the shards were written here)."""
        return self._location(i)[1]

    def image(self, i: int) -> Image.Image:
        """The decoded RGB image of global sample ``i``; ValueError naming the shard if it is undecodable."""
        image = self._decode(i)
        if isinstance(image, str):
            path, key, _, _ = self._location(i)
            raise ValueError(f"cannot decode sample {key!r} (global index {i}) in shard {path}: {image}")
        return image

    def close(self) -> None:
        """Close the shard files this process holds open (they reopen on demand)."""
        self._files.close()

    # -- samples ------------------------------------------------------------------------------------------------------

    def _location(self, i: int) -> tuple[Path, str, int, int]:
        shard, position = self.index.locate(i)
        info = self.index.shards[shard]
        return self.index.shard_path(shard), info.keys[position], info.offsets[position], info.sizes[position]

    def _decode(self, i: int) -> Image.Image | str:
        """The RGB image of sample ``i``, or why it cannot be decoded."""
        path, key, offset, size = self._location(i)
        data = self._files.read(path, offset, size)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")  # convert() forces the (lazy) decode, so errors surface here
        except Exception as error:  # PIL raises many types on bad bytes; nothing but PIL runs in here
            return f"{type(error).__name__}: {error}"

    def _load(self, i: int) -> Tensor | None:
        """``[3, H, W]`` for sample ``i``, or None when it is undecodable and skipped."""
        image = self._decode(i)
        if isinstance(image, str):
            return self._skip(i, image)
        pixels = self.transform(image)
        if not isinstance(pixels, Tensor) or pixels.dim() != 3:
            raise TypeError(f"transform must return a [3, H, W] tensor, got {getattr(pixels, 'shape', type(pixels))}")
        return pixels

    def _skip(self, i: int, reason: str) -> None:
        """Sample ``i`` is undecodable (``reason``): raise under ``strict``, else log and record it."""
        path, key, _, _ = self._location(i)
        if self.strict:
            raise ValueError(f"cannot decode sample {key!r} (global index {i}) in shard {path}: {reason}")
        log.warning("skipping undecodable %s %r (global index %d) in shard %s: %s", self.what, key, i, path, reason)
        self.skipped.append((str(path), key, reason))

    def _check_shapes(self, rows: list[Tensor | None], indices: list[int]) -> Tensor:
        """A real row to shape dummies after (or the fallback template); every real row must match it."""
        real = [(row, i) for row, i in zip(rows, indices, strict=True) if row is not None]
        template = real[0][0] if real else self._fallback_template()
        expected = self.image_shape or tuple(template.shape)
        for row, i in real:
            if tuple(row.shape) != expected:
                raise ValueError(
                    f"sample {i} transformed to shape {tuple(row.shape)}, expected {expected}: the transform "
                    "must give every image the same shape"
                )
        return template

    def _fallback_template(self) -> Tensor:
        """Zeros shaped like a real row, for batches without one (built once per process)."""
        if self._template is None:
            if self.image_shape is not None:
                self._template = torch.zeros(self.image_shape)
            else:
                self._template = torch.zeros_like(self._probe())
        return self._template

    def _probe(self) -> Tensor:
        for i in range(self.num_samples):
            image = self._decode(i)
            if not isinstance(image, str):
                return self.transform(image)
        raise ValueError(f"no decodable image among the {self.num_samples} samples at {self.index.root}")

    def __getstate__(self) -> dict[str, Any]:
        # Open files do not pickle (DataLoader workers under spawn); each process opens its own.
        state = self.__dict__.copy()
        state["_files"] = _OpenFiles()
        return state


def _check_split(global_batch_size: int, rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % world_size:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}: every rank "
            f"takes an equal slice of each global batch; use a multiple of {world_size}"
        )


class _OpenFiles:
    """Shard files opened by one process, reused across reads; at most ``limit`` stay open (least
    recently used closed first), so thousands of shards never exhaust file descriptors."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._pid = os.getpid()
        self._files: OrderedDict[Path, BinaryIO] = OrderedDict()

    def read(self, path: Path, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:
            # A forked worker inherited its parent's handles, whose file positions it would share:
            # forget them (the child's copies close when collected) and open its own.
            self._files = OrderedDict()
            self._pid = os.getpid()
        stream = self._files.pop(path, None)
        if stream is None:
            stream = open(path, "rb")  # noqa: SIM115 (kept open across reads on purpose)
        self._files[path] = stream
        while len(self._files) > self.limit:
            self._files.popitem(last=False)[1].close()
        stream.seek(offset)
        data = stream.read(size)
        if len(data) != size:
            raise OSError(
                f"shard {path} ends before byte {offset + size}: the file is truncated or not the indexed one"
            )
        return data

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()
