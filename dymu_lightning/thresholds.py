"""Thresholds from a single batch: the calibration rule without the distributed job around it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.core import LayerMerges, MergePolicy


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
