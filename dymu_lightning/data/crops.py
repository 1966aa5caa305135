"""Calibration over the crops an AnyRes model's own processor makes (``data.crops=anyres``).

LLaVA-NeXT and LLaVA-OneVision feed their vision tower a base crop (the whole image, resized) and
AnyRes tiles (zoomed-in views), not whole images resized to the tower's side. DyMU merges each crop
alone at inference, so the thresholds are calibrated on those same crops: every crop is one image of
the global ranking. Batching stays that of :class:`~dymu_lightning.data.loader.GlobalBatchShards`,
over a numbering of crops instead of images, so global batches are the same sets of crops whatever
the number of processes.

The crops of an image are counted up front (every rank must run the same number of steps) from its
size, read from the file header, with the processor's own grid pinpoints and crop side; the crops the
processor then makes are checked against that count.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from dymu_lightning.data.loader import GlobalBatchShards
from dymu_lightning.data.shards import ShardIndex

CROPS_KINDS = ("whole", "anyres", "native")


def crop_side(image_processor: Any) -> int:
    """The side in pixels of every crop the processor makes (LLaVA-NeXT: ``crop_size``; OneVision: ``size``)."""
    for name in ("crop_size", "size"):
        size = getattr(image_processor, name, None)
        size = dict(size) if size is not None else {}
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"{type(image_processor).__name__}: crops of {size} are not square")
            return int(size["height"])
    raise ValueError(f"{type(image_processor).__name__} has no crop side (crop_size or size with height and width)")


def anyres_inputs(image_processor: Any, source: str) -> dict[str, Any]:
    """What thresholds.json records of crops made by this processor (``inputs``)."""
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if not pinpoints:
        raise ValueError(
            f"{source}: {type(image_processor).__name__} has no image_grid_pinpoints (not an AnyRes processor)"
        )
    return {
        "kind": "anyres_crops",
        "processor": source,
        "crop_size": crop_side(image_processor),
        "image_grid_pinpoints": [list(map(int, p)) for p in pinpoints],
    }


def image_crops(image_processor: Any, image: Image.Image) -> Tensor:
    """``[crops, 3, S, S]``: the processor's crops of one image (base crop first, then the tiles)."""
    out = image_processor(images=[image], return_tensors="pt")
    pixels = out["pixel_values"]
    return pixels[0] if pixels.dim() == 5 else pixels  # one image: no padding to a batch's max crops


def first_crop(image_processor: Any, image: Image.Image) -> Tensor:
    """``[3, S, S]``: the base crop (the shape every crop has; the template of dummy rows)."""
    return image_crops(image_processor, image)[0]


class GlobalBatchCrops(GlobalBatchShards):
    """:class:`GlobalBatchShards` whose samples are the processor's crops of the images, in image order.

    ``pixels`` rows are crops ``[3, S, S]``; ``index`` is the crop's global index; an undecodable image
    counts one crop, which is skipped (``valid = False``) like an undecodable image. ``max_samples``
    limits the images, not the crops.

    Args:
        index, global_batch_size, rank, world_size, start_step, strict, max_samples: as in
            :class:`GlobalBatchShards` (``start_step`` counts steps of crops).
        image_processor: the AnyRes model's image processor (``AutoImageProcessor.from_pretrained``).
    """

    def __init__(
        self,
        index: ShardIndex | Path | str,
        global_batch_size: int,
        *,
        image_processor: Any,
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
            transform=partial(first_crop, image_processor),  # a partial pickles (DataLoader workers)
            strict=strict,
            max_samples=max_samples,
        )
        self.image_processor = image_processor
        self.side = crop_side(image_processor)
        self.pinpoints = image_processor.image_grid_pinpoints
        self.num_images = self.num_samples
        self.crop_counts = [self._count(i) for i in range(self.num_images)]
        self.crop_starts = [0]
        for count in self.crop_counts:
            self.crop_starts.append(self.crop_starts[-1] + count)
        self.num_samples = self.crop_starts[-1]
        self.num_steps = -(-self.num_samples // global_batch_size)
        if not 0 <= start_step <= self.num_steps:
            raise ValueError(f"start_step must be in 0..{self.num_steps} ({self.num_steps} steps), got {start_step}")
        self.start_step = start_step
        self._cached: tuple[int, Tensor | None] | None = None  # the last image's crops: its tiles come in a row

    def _count(self, image: int) -> int:
        """Crops of image ``image``, from its header size; 1 for an unreadable header."""
        path, _, offset, size = super()._location(image)
        try:
            with Image.open(io.BytesIO(self._files.read(path, offset, size))) as opened:
                width, height = opened.size
        except Exception:  # PIL raises many types on bad bytes; the image is skipped at load time
            return 1
        return image_size_to_num_patches((height, width), self.pinpoints, self.side)

    def crop_of(self, i: int) -> tuple[int, int]:
        """(image, crop within it) of global crop ``i``."""
        low, high = 0, self.num_images
        while high - low > 1:  # the last image whose first crop is <= i
            middle = (low + high) // 2
            low, high = (middle, high) if self.crop_starts[middle] <= i else (low, middle)
        return low, i - self.crop_starts[low]

    def crop(self, i: int) -> Tensor | None:
        """``[3, S, S]``: global crop ``i``; None when its image is undecodable (and skipped)."""
        return self._load(i)

    def _location(self, i: int) -> tuple[Path, str, int, int]:
        return super()._location(self.crop_of(i)[0])

    def _load(self, i: int) -> Tensor | None:
        image, crop = self.crop_of(i)
        if self._cached is None or self._cached[0] != image:
            decoded = self._decode(i)  # through _location: the image crop i is cut from
            # An undecodable image goes through the parent, which logs, records or raises (strict).
            crops = super()._load(i) if isinstance(decoded, str) else image_crops(self.image_processor, decoded)
            if crops is not None and crops.shape[0] != self.crop_counts[image]:
                raise ValueError(
                    f"sample {self.key(i)!r}: the processor made {crops.shape[0]} crops, but its size gives "
                    f"{self.crop_counts[image]} (image_grid_pinpoints {self.pinpoints}, crops of {self.side} px)"
                )
            self._cached = (image, crops)
        crops = self._cached[1]
        return None if crops is None else crops[crop]
