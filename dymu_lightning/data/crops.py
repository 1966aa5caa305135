"""Calibration over the crops an AnyRes model's own processor makes (``data.crops=anyres``).

LLaVA-NeXT and LLaVA-OneVision feed their vision tower a base crop (the whole image, resized) and
AnyRes tiles (zoomed-in views), not whole images resized to the tower's side. DyMU merges each crop
alone at inference, so the thresholds are calibrated on those same crops: every crop is one image of
the global ranking (:class:`~dymu_lightning.data.parts.GlobalBatchParts`).

The crops of an image are counted up front from its size, read from the file header, with the
processor's own grid pinpoints and crop side.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from dymu_lightning.data.parts import GlobalBatchParts
from dymu_lightning.data.shards import ShardIndex

CROPS_KINDS = ("whole", "anyres", "frames", "native")


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


class GlobalBatchCrops(GlobalBatchParts):
    """:class:`GlobalBatchParts` whose parts are the processor's crops of the images, in image order
    (base crop first, then the tiles).

    Args:
        index, global_batch_size, rank, world_size, start_step, strict, max_samples: as in
            :class:`GlobalBatchParts` (``max_samples`` limits the images).
        image_processor: the AnyRes model's image processor (``AutoImageProcessor.from_pretrained``).
    """

    unit = "crops"

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
        self.image_processor = image_processor
        self.side = crop_side(image_processor)
        self.pinpoints = image_processor.image_grid_pinpoints
        super().__init__(
            index,
            global_batch_size,
            transform=partial(first_crop, image_processor),  # a partial pickles (DataLoader workers)
            rank=rank,
            world_size=world_size,
            start_step=start_step,
            strict=strict,
            max_samples=max_samples,
        )

    def _count(self, sample: int) -> int:
        """Crops of image ``sample``, from its header size; 1 for an unreadable header."""
        path, _, offset, size = self._sample_location(sample)
        try:
            with Image.open(io.BytesIO(self._files.read(path, offset, size))) as opened:
                width, height = opened.size
        except Exception:  # PIL raises many types on bad bytes; the image is skipped at load time
            return 1
        return image_size_to_num_patches((height, width), self.pinpoints, self.side)

    def _parts(self, decoded: Image.Image) -> Tensor:
        return image_crops(self.image_processor, decoded)

    def _cut_by(self) -> str:
        return f"its size (image_grid_pinpoints {self.pinpoints}, crops of {self.side} px)"
