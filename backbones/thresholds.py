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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.core import LayerMerges, MergePolicy
from dymu_lightning.files import write_text_atomic

SCHEMA_VERSION = 1


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
    schema_version: int = SCHEMA_VERSION

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a killed writer leaves the previous file intact)."""
        return write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ThresholdsFile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no thresholds file at {path}")
        data = json.loads(path.read_text())
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        return cls(**data)

    def check_matches(self, backbone: Backbone, model: nn.Module) -> None:
        """Raise ValueError unless these thresholds were calibrated for ``backbone`` with this depth."""
        layers = backbone.num_layers(model)
        if backbone.name != self.backbone or layers != self.num_layers:
            raise ValueError(
                f"these thresholds were calibrated for backbone '{self.backbone}' ({self.num_layers} layers); "
                f"they cannot drive backbone '{backbone.name}' ({layers} layers)"
            )

    def check_fits(self, backbone: Backbone, model: nn.Module, image_size: int, num_blocks: int | None) -> None:
        """Raise ValueError unless these thresholds fit a run of ``backbone`` on ``image_size`` px images
        whose features are read after ``num_blocks`` blocks (None: all, with the final norm).

        A threshold is a similarity of one encoder's keys at one token grid and one depth: the same
        numbers on another grid or depth merge a different share of the tokens, silently."""
        self.check_matches(backbone, model)
        if self.image_size != image_size:
            raise ValueError(
                f"calibrated at {self.image_size} px, but this run feeds {image_size} px images; "
                f"set model.image_size={self.image_size} or recalibrate"
            )
        if self.num_blocks != num_blocks:
            raise ValueError(
                f"calibrated with num_blocks={self.num_blocks}, but this run reads features after "
                f"num_blocks={num_blocks}"
            )

    def policy(self, **caps: int | None) -> MergePolicy:
        """A threshold-mode policy; ``caps`` may set ``max_merges`` and ``min_tokens``."""
        return MergePolicy(thresholds=list(self.thresholds), **caps)
