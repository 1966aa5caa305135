"""Calibration over the frames a video model's own video processor makes (``data.crops=frames``).

LLaVA-OneVision feeds its vision tower every sampled frame of a video, resized to the tower's side,
and DyMU merges each frame alone. The thresholds for videos are therefore calibrated on those same
frames: every frame is one image of the global ranking
(:class:`~dymu_lightning.data.parts.GlobalBatchParts`).

**Videos in shards.** No video decoder is needed: a video sample holds its decoded frames as one
``<key>.npy`` member, a uint8 array ``[frames, height, width, 3]`` (RGB), written by
``python -m dymu_lightning shards SRC OUT --videos`` from ``.npy`` files or folders of frame images
(:func:`~dymu_lightning.data.shards.write_shards`). The frames of a video are counted up front from
the array's header, through the video processor's own sampling (``do_sample_frames`` with
``num_frames``; all frames otherwise), and then sampled and resized by the processor itself.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from dymu_lightning.data.crops import crop_side
from dymu_lightning.data.parts import GlobalBatchParts
from dymu_lightning.data.shards import FRAMES_EXT, ShardIndex, frames_header

_WRITE_HINT = "video shards hold each video as a .npy member: write them with `dymu shards SRC OUT --videos`"


def frames_sampling(video_processor: Any, source: str) -> int | None:
    """Frames the processor samples from every video (``num_frames``), or None when it keeps them all.
    ValueError for sampling by frame rate: a shard holds frames, not their rate."""
    if not getattr(video_processor, "do_sample_frames", False):
        return None
    num_frames = getattr(video_processor, "num_frames", None)
    if num_frames is None:
        raise ValueError(
            f"{source}: {type(video_processor).__name__} samples frames by frame rate (fps), which video shards "
            "do not record; set its num_frames, or do_sample_frames=false to keep every frame"
        )
    return int(num_frames)


def frames_inputs(video_processor: Any, source: str) -> dict[str, Any]:
    """What thresholds.json records of frames made by this video processor (``inputs``)."""
    return {
        "kind": "video_frames",
        "processor": source,
        "frame_size": crop_side(video_processor),
        "num_frames": frames_sampling(video_processor, source),
    }


def video_frames(video_processor: Any, frames: np.ndarray) -> Tensor:
    """``[frames', 3, S, S]``: the processor's frames of one video ``[frames, H, W, 3]`` (sampled, if it
    samples, and resized and normalised as at inference)."""
    # channels_last said, not inferred: a frame 3 px high would otherwise pass for channels first
    out = video_processor(videos=[frames], input_data_format="channels_last", return_tensors="pt")
    return out["pixel_values_videos"][0]


def first_frame(video_processor: Any, frames: np.ndarray) -> Tensor:
    """``[3, S, S]``: the first frame the processor keeps (the template of dummy rows)."""
    return video_frames(video_processor, frames)[0]


class GlobalBatchFrames(GlobalBatchParts):
    """:class:`GlobalBatchParts` whose parts are the frames the video processor makes of each video.

    Args:
        index, global_batch_size, rank, world_size, start_step, strict, max_samples: as in
            :class:`GlobalBatchParts` (``max_samples`` limits the videos).
        video_processor: the model's video processor (``AutoVideoProcessor.from_pretrained``).

    Raises:
        ValueError: a sample holds no frames (no ``.npy`` member), or holds fewer frames than the
            processor samples (it refuses such a video at inference too); the message names it.
    """

    what = "video"
    unit = "frames"

    def __init__(
        self,
        index: ShardIndex | Path | str,
        global_batch_size: int,
        *,
        video_processor: Any,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        strict: bool = False,
        max_samples: int | None = None,
    ) -> None:
        self.video_processor = video_processor
        self.num_frames = frames_sampling(video_processor, type(video_processor).__name__)
        super().__init__(
            index,
            global_batch_size,
            transform=partial(first_frame, video_processor),  # a partial pickles (DataLoader workers)
            rank=rank,
            world_size=world_size,
            start_step=start_step,
            strict=strict,
            max_samples=max_samples,
        )

    def _count(self, sample: int) -> int:
        """Frames the processor keeps of video ``sample``; 1 for an unreadable header."""
        path, key, offset, size = self._sample_location(sample)
        shard, position = self.index.locate(sample)
        ext = self.index.shards[shard].exts[position]
        if ext.rsplit(".", 1)[-1] != FRAMES_EXT:
            raise ValueError(
                f"sample {key!r} (global index {sample}) in shard {path} holds no video frames (its member is "
                f".{ext}); {_WRITE_HINT}"
            )
        try:
            total = frames_header(self._files.read(path, offset, min(size, 1 << 16)))[0]
        except Exception:  # numpy raises several types on a bad header; skipped (or strict) at load time
            return 1
        if self.num_frames is None:
            return total
        if total < self.num_frames:
            raise ValueError(
                f"sample {key!r} (global index {sample}) in shard {path} has {total} frames, fewer than the "
                f"{self.num_frames} the video processor samples (num_frames)"
            )
        return self.num_frames

    def _decode(self, i: int) -> np.ndarray | str:
        """The frames ``[frames, H, W, 3]`` of the video part ``i`` belongs to, or why they cannot be read."""
        path, _, offset, size = self._location(i)
        data = self._files.read(path, offset, size)
        try:
            frames_header(data)
            return np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as error:  # numpy raises several types on bad bytes; nothing else runs in here
            return f"{type(error).__name__}: {error}"

    def _parts(self, decoded: np.ndarray) -> Tensor:
        return video_frames(self.video_processor, decoded)

    def _cut_by(self) -> str:
        sampled = f"num_frames={self.num_frames}" if self.num_frames is not None else "every frame kept"
        return f"its header ({sampled})"
