"""Small builders shared by tests that need one concrete model rather than the whole registry."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dymu_lightning.backbones import get_backbone

# A 3-block timm ViT: 64 patches of 8 px + CLS at 64 px.
TINY_TIMM_ARCH = {
    "model_name": "vit_base_patch16_224",
    "embed_dim": 48,
    "depth": 3,
    "num_heads": 3,
    "img_size": 64,
    "patch_size": 8,
}


def tiny_timm(batch: int, seed: int = 0):
    """A 3-block timm ViT (64 patches + CLS) and ``batch`` images, half smooth, half noisy."""
    backbone = get_backbone("timm_vit")
    torch.manual_seed(seed)
    model = backbone.build(TINY_TIMM_ARCH)
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(batch, 3, 2, 2, generator=generator), size=64, mode="bilinear")
    noisy = torch.randn(batch, 3, 64, 64, generator=generator)
    pixels = torch.where(torch.arange(batch)[:, None, None, None] % 2 == 0, smooth, noisy)
    return backbone, model, pixels
