"""Calibrated thresholds: finding them on one batch, and the thresholds.json file that carries them.

thresholds.json (schema version 1) is what a calibration run writes and what inference loads. Its
keys are documented in docs/calibration.md. Loading it onto a backbone other than the one it was
calibrated for is an error: thresholds are similarities of one encoder's keys and mean nothing for
another.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.core import LayerMerges, MergePolicy
from dymu_lightning.files import write_text_atomic

SCHEMA_VERSION = 1


class PartialCalibrationWarning(UserWarning):
    """Thresholds of a calibration that stopped before it had seen all its images."""


def _blocks(num_blocks: int | None) -> str:
    return "null (all)" if num_blocks is None else str(num_blocks)


def batch_thresholds(backbone: Backbone, model: nn.Module, pixels: Tensor, r: int | list[int]) -> list[float]:
    """Per-layer thresholds found on one batch.

    Runs ``pixels`` (``[B, 3, H, W]``) in ``batch_topk`` mode: every layer merges the batch's ``B * r``
    best edges, and its threshold is the best edge left unmerged, clamped at 0 (DyMU, Eq. 4). Layers
    with r = 0 never merge and get ``inf``.
    """
    found = [math.inf] * backbone.num_layers(model)

    def record(merges: LayerMerges) -> None:
        found[merges.layer] = float(merges.batch_threshold)

    with torch.inference_mode():
        backbone.merged_forward(model, pixels, MergePolicy(mode="batch_topk", r=r, on_layer=record))
    return found


@dataclass
class ThresholdsFile:
    """The contents of thresholds.json.

    Attributes:
        backbone: registry name of the backbone the thresholds belong to.
        num_layers: blocks in that backbone (the length of ``thresholds`` and ``r``).
        image_size: input side in pixels during calibration.
        thresholds: per layer; None where the layer never merges.
        r: target merges per image, per layer.
        schedule: how ``r`` was derived (kind, r or tokens_left, merging layers).
        images_seen: real images that contributed.
        global_batch_size: images per global step.
        world_size: processes that shared each global batch.
        tokens: tokens per image at the encoder output on the calibration data (mean, std, min,
            max, images, full = tokens without merging).
        source: where the weights came from (hub id, directory, or "random").
        num_blocks: blocks the features are read after (None = all, with the final norm).
        extra: anything else the writer wants to keep (steps, skipped images, timings).
        partial: the run stopped before it had seen all its images (``trainer.max_steps``); the
            thresholds are those of the images seen so far. Rerun the same command to finish it.
        inputs: what the encoder was fed: None (files older than this key too) for whole images
            resized to ``image_size``; ``{"kind": "anyres_crops", "processor", "crop_size",
            "image_grid_pinpoints"}`` for the crops an AnyRes processor makes (``data.crops=anyres``),
            each crop one image (``images_seen`` and ``tokens`` count crops); ``{"kind":
            "video_frames", "processor", "frame_size", "num_frames"}`` for the frames a video
            processor makes of videos (``data.crops=frames``; ``num_frames`` null: all frames kept),
            each frame one image; ``{"kind": "native", "min_pixels", "max_pixels"}`` for images each at
            the tower's native size within those area bounds (``data.crops=native``; ``tokens`` counts each
            image's kept tokens, ``tokens.full`` the most an image can have, ``extra.full_tokens`` each
            image's own count before merging).
    """

    backbone: str
    num_layers: int
    image_size: int
    thresholds: list[float | None]
    r: list[int]
    schedule: dict[str, Any]
    images_seen: int
    global_batch_size: int
    world_size: int
    tokens: dict[str, Any]
    source: str = ""
    num_blocks: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    partial: bool = False
    inputs: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    # The file this was loaded from (not saved): errors name it.
    origin: str = field(default="", repr=False, compare=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a killed writer leaves the previous file intact)."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ThresholdsFile:
        """Read and validate ``path``: every error is a ValueError that names the file and the key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no thresholds file at {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a valid thresholds file (not JSON: {error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a valid thresholds file (a JSON {type(data).__name__}, not an object)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        known = set(cls.__dataclass_fields__) - {"origin"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        _validate(path, data)
        return cls(**data, origin=str(path))

    def to_json(self) -> dict[str, Any]:
        """What thresholds.json holds."""
        data = asdict(self)
        del data["origin"]
        # +inf (a layer that never merges, as batch_thresholds gives it) is written as null, its meaning
        # in the file: JSON has no infinity, and load refuses Python's "Infinity".
        data["thresholds"] = [None if t is not None and t == math.inf else t for t in data["thresholds"]]
        return data

    def check_matches(self, backbone: Backbone, model: nn.Module) -> None:
        """Raise ValueError unless these thresholds were calibrated for ``backbone`` with this depth."""
        layers = backbone.num_layers(model)
        if backbone.name != self.backbone or layers != self.num_layers:
            where = f"{self.origin}: " if self.origin else ""
            raise ValueError(
                f"{where}these thresholds were calibrated for backbone '{self.backbone}' ({self.num_layers} layers); "
                f"they cannot drive backbone '{backbone.name}' ({layers} layers)"
            )

    def check_fits(self, backbone: Backbone, model: nn.Module, image_size: int, num_blocks: int | None) -> None:
        """Raise ValueError unless these thresholds fit a run of ``backbone`` on ``image_size`` px images
        whose features are read after ``num_blocks`` blocks (None: all, with the final norm).

        A threshold is a similarity of one encoder's keys at one token grid and one depth: the same
        numbers on another grid or depth merge a different share of the tokens, silently."""
        self.check_matches(backbone, model)
        where = f"{self.origin}: " if self.origin else ""
        if self.image_size != image_size:
            raise ValueError(
                f"{where}calibrated at {self.image_size} px, but this run feeds {image_size} px images; "
                f"set model.image_size={self.image_size} or recalibrate at {image_size} px"
            )
        # Merging happens in the blocks: features after all blocks, with or without the final norm
        # (num_blocks null or num_layers), come from the same merges.
        layers = backbone.num_layers(model)
        if (self.num_blocks or self.num_layers) != (num_blocks or layers):
            raise ValueError(
                f"{where}calibrated with num_blocks={_blocks(self.num_blocks)}, but this run reads features "
                f"after num_blocks={_blocks(num_blocks)}; recalibrate with model.num_blocks={_blocks(num_blocks)}"
            )
        if self.partial:
            warnings.warn(
                f"{where}a partial calibration ({self.images_seen} images, stopped by trainer.max_steps); "
                "rerun its command to finish it",
                PartialCalibrationWarning,
                stacklevel=3,
            )

    def check_inputs(self, model_name: str, crop_size: int, pinpoints: list[list[int]], video: bool = False) -> None:
        """For an AnyRes model (``model_name``) feeding its tower crops of ``crop_size`` px cut on
        ``pinpoints`` (and, with ``video``, video frames of ``crop_size`` px): raise ValueError for
        thresholds calibrated on other inputs at another size or on another grid, and warn
        (UserWarning) for whole images or video frames at the crop size: they rank edges of other
        statistics than tiles (zoomed-in views), so the image crops merge with thresholds made for
        something else. Video-frame thresholds are those of this model's videos."""
        where = f"{self.origin}: " if self.origin else ""
        redo = "recalibrate with data.crops=anyres data.processor=<the model's save_pretrained folder>"
        if self.inputs is not None and self.inputs["kind"] == "video_frames":
            size = self.inputs["frame_size"]
            if size != crop_size:
                raise ValueError(
                    f"{where}calibrated on video frames of {size} px, but this {model_name} feeds its vision "
                    f"tower crops{' and frames' if video else ''} of {crop_size} px; recalibrate with "
                    "data.crops=frames data.processor=<the model's save_pretrained folder>"
                )
            if video:
                why = (f"calibrated on video frames: right for this {model_name}'s videos, but the AnyRes crops of "
                       f"its images merge with the same thresholds; for images, {redo}")  # fmt: skip
            else:
                why = f"calibrated on video frames, not on the AnyRes crops this {model_name} feeds; {redo}"
            warnings.warn(where + why, UserWarning, stacklevel=3)
            return
        if self.inputs is None:
            if self.image_size != crop_size:
                raise ValueError(
                    f"{where}calibrated on whole images at {self.image_size} px, but this {model_name} feeds its "
                    f"vision tower AnyRes crops of {crop_size} px; {redo}"
                )
            warnings.warn(f"{where}calibrated on whole images, not on the AnyRes crops this {model_name} feeds; {redo}",
                          UserWarning, stacklevel=3)  # fmt: skip
            return
        if self.inputs["kind"] != "anyres_crops":
            raise ValueError(
                f"{where}calibrated on images at their native sizes, but this {model_name} feeds its vision tower "
                f"AnyRes crops of {crop_size} px; {redo}"
            )
        found = (self.inputs["crop_size"], [list(p) for p in self.inputs["image_grid_pinpoints"]])
        if found != (crop_size, [list(p) for p in pinpoints]):
            raise ValueError(
                f"{where}calibrated on AnyRes crops of {found[0]} px on grid pinpoints {found[1]}, but this "
                f"{model_name} cuts crops of {crop_size} px on {[list(p) for p in pinpoints]}; {redo}"
            )

    def check_native(self, model_name: str) -> None:
        """For a model (``model_name``) whose tower takes images at their native sizes (Qwen2-VL,
        Qwen2.5-VL): raise ValueError for thresholds calibrated on AnyRes crops, and warn (UserWarning)
        for square images resized to ``image_size``, whose edges are ranked at one size only."""
        where = f"{self.origin}: " if self.origin else ""
        redo = "recalibrate with data.crops=native"
        kind = None if self.inputs is None else self.inputs["kind"]
        if kind == "anyres_crops":
            raise ValueError(
                f"{where}calibrated on AnyRes crops, but this {model_name} feeds its vision tower whole images "
                f"at their native sizes; {redo}"
            )
        if kind is None:
            warnings.warn(
                f"{where}calibrated on square images of {self.image_size} px, not at the native sizes this "
                f"{model_name} feeds its vision tower; {redo}",
                UserWarning,
                stacklevel=4,  # the caller of apply_dymu
            )

    def policy(self, **caps: int | None) -> MergePolicy:
        """A threshold-mode policy; ``caps`` may set ``max_merges`` and ``min_tokens``."""
        return MergePolicy(thresholds=list(self.thresholds), **caps)


# ----- validation of a loaded file ---------------------------------------------------------------------
_REQUIRED = ("backbone", "num_layers", "image_size", "thresholds", "r", "schedule", "images_seen",
             "global_batch_size", "world_size", "tokens")  # fmt: skip
# What the encoder was fed, by thresholds.json's inputs kind (null: whole images)
_INPUTS_KEYS = {
    "anyres_crops": {"kind", "processor", "crop_size", "image_grid_pinpoints"},
    "video_frames": {"kind", "processor", "frame_size", "num_frames"},
    "native": {"kind", "min_pixels", "max_pixels"},
}
# A threshold is a cosine similarity, clamped at 0 by calibration; the slack admits rounding in
# low-precision encoders (a similarity of a vector with itself may round to just above 1).
_THRESHOLD_SLACK = 1e-2


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(path: Path, data: dict[str, Any]) -> None:
    """Raise ValueError naming ``path`` and the key for the first value of the wrong type or range."""

    def fail(key: str, expected: str, value: Any) -> None:
        raise ValueError(f"{path}: '{key}' must be {expected}, got {json.dumps(value)}")

    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ValueError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)}")
    for key in ("backbone", "source"):
        if key in data and not isinstance(data[key], str):
            fail(key, "a string", data[key])
    for key, least in (("num_layers", 1), ("image_size", 1), ("images_seen", 0), ("global_batch_size", 1),
                       ("world_size", 1)):  # fmt: skip
        if not _is_int(data[key]) or data[key] < least:
            fail(key, f"an integer >= {least}", data[key])
    layers = data["num_layers"]
    for key in ("schedule", "tokens", "extra"):
        if key in data and not isinstance(data[key], dict):
            fail(key, "an object", data[key])
    inputs = data.get("inputs")
    if inputs is not None:
        kinds = {key: sorted(keys) for key, keys in _INPUTS_KEYS.items()}
        kind = inputs.get("kind") if isinstance(inputs, dict) else None
        if kind not in _INPUTS_KEYS or set(inputs) != _INPUTS_KEYS[kind]:
            fail("inputs", f"null (whole images) or an object with the keys of its kind {kinds}", inputs)
        if kind == "video_frames":
            frames = inputs["num_frames"]
            if not _is_int(inputs["frame_size"]) or inputs["frame_size"] < 1:
                fail("inputs.frame_size", "an integer >= 1", inputs["frame_size"])
            if frames is not None and (not _is_int(frames) or frames < 1):
                fail("inputs.num_frames", "null (every frame kept) or an integer >= 1", frames)
    if "partial" in data and not isinstance(data["partial"], bool):
        fail("partial", "true or false", data["partial"])
    blocks = data.get("num_blocks")
    if blocks is not None and (not _is_int(blocks) or not 1 <= blocks <= layers):
        fail("num_blocks", f"null or an integer in 1..{layers} (num_layers)", blocks)
    for key in ("thresholds", "r"):
        if not isinstance(data[key], list) or len(data[key]) != layers:
            fail(key, f"a list of {layers} values (num_layers)", data[key])
    for i, r in enumerate(data["r"]):
        if not _is_int(r) or r < 0:
            fail(f"r[{i}]", "an integer >= 0", r)
    for i, threshold in enumerate(data["thresholds"]):
        if threshold is None:
            continue
        number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not number or not 0 <= threshold <= 1 + _THRESHOLD_SLACK:
            fail(f"thresholds[{i}]", "null or a number in [0, 1] (a cosine similarity)", threshold)
