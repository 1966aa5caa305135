"""`python -m dymu_lightning demo`: DToMe on the real DINOv2 ViT-S/14 over real photos.

Finds per-layer thresholds on the photos themselves (one batch, the paper's batch-level top-k rule),
then runs each photo alone at those thresholds and prints how many tokens it keeps. Flat photos keep
few tokens, busy ones many: that is DToMe's point.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dymu_lightning.assets.paths import photos
from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy


def run_demo(r: int = 12, images: Path | None = None) -> int:
    """The ``demo`` command."""
    main(r, images)
    return 0


def main(r: int = 12, image_dir: Path | None = None) -> dict[str, int]:
    backbone = get_backbone("dinov2_vits14_offline")
    model = backbone.load()
    paths = sorted(image_dir.glob("*")) if image_dir else sorted(photos("skimage").values())
    names = [path.stem for path in paths]
    images = [Image.open(path).convert("RGB") for path in paths]
    pixels = backbone.preprocess(model, images)
    torch.manual_seed(0)

    thresholds = batch_thresholds(backbone, model, pixels, r)
    policy = MergePolicy(thresholds=thresholds)
    counts: dict[str, int] = {}
    with torch.inference_mode():
        for name, image_pixels in zip(names, pixels, strict=True):
            merged = backbone.merged_forward(model, image_pixels[None], policy)
            counts[name] = int(merged.lengths[0])

    full = backbone.embed(model, pixels[:1]).shape[1]
    print(f"DToMe on {backbone.name} ({backbone.num_layers(model)} layers, {full} tokens per image)")
    print(f"thresholds from {len(images)} photos at r={r}: " + " ".join(f"{t:.3f}" for t in thresholds))
    for name, count in sorted(counts.items(), key=lambda item: item[1]):
        print(f"  {name:<20} {count:4d} tokens  {'#' * round(40 * count / full)}")
    values = torch.tensor(list(counts.values()), dtype=torch.float64)
    print(
        f"mean {values.mean():.1f} ± {values.std():.1f} tokens (min {int(values.min())}, "
        f"max {int(values.max())}) of {full}; "
        f"a fixed r={r} would keep {full - r * len(thresholds)} for every image"
    )
    return counts
