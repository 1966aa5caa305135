"""DyMU thresholds found again on an adapted encoder (``reduction.recalibrate``).

Thresholds are similarities of the encoder's own keys. LoRA and BitFit change the keys, so the
thresholds calibrated on the stock encoder no longer give the counts they were calibrated for: in
the Fashion-MNIST study, DyMU-mid fell from 21.9 to 4.2 tokens per image after LoRA. Recalibrating
repeats the calibration on the adapted encoder, with the original file's per-layer ``r`` and global
batch size, over the training images (labels unused): per batch, each layer merges the batch's
``B * r`` best edges and records the best edge left (DyMU Eq. 4); the threshold is the mean over
batches. The result is an ordinary thresholds file for the adapted encoder.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dymu_lightning.backbones import Backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile, batch_thresholds
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.calibration import ThresholdStats, TokenStats


def recalibrate(
    backbone: Backbone,
    encoder: nn.Module,
    images: Dataset,
    original: ThresholdsFile,
    num_blocks: int | None,
) -> ThresholdsFile:
    """``original``'s schedule calibrated again on ``encoder`` over ``images`` (items with ``"pixels"``
    ``[3, H, W]``), in batches of ``original.global_batch_size`` in sample order."""
    parameter = next(encoder.parameters())
    stats = ThresholdStats(original.num_layers)
    batches = DataLoader(images, batch_size=original.global_batch_size, shuffle=False)
    for batch in batches:
        pixels = batch["pixels"].to(parameter.device, parameter.dtype)
        for layer, threshold in enumerate(batch_thresholds(backbone, encoder, pixels, original.r)):
            if math.isfinite(threshold):
                stats.add(layer, threshold)
    found = stats.mean()
    policy = MergePolicy(thresholds=list(found))
    tokens = TokenStats(original.tokens["full"])
    with torch.inference_mode():
        for batch in batches:
            pixels = batch["pixels"].to(parameter.device, parameter.dtype)
            tokens.add(backbone.merged_forward(encoder, pixels, policy, num_blocks=num_blocks).lengths)
    return dataclasses.replace(
        original,
        thresholds=found,
        images_seen=len(images),  # type: ignore[arg-type]
        world_size=1,
        tokens=tokens.summary(),
        partial=False,
        extra={"recalibrated_from": original.origin, "original_tokens": original.tokens},
    )


def recalibrated_path(out_dir: Path) -> Path:
    """Where a finetune run writes the thresholds of its adapted encoder."""
    return out_dir / "thresholds_recalibrated.json"
