"""Loading real checkpoints: from a local save_pretrained directory (the hub code path), and the error
when a hub id cannot be reached."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf

from dymu_lightning.backbones import get_backbone

HF_BACKBONES = ["hf_clip", "hf_siglip", "hf_dinov2"]


@pytest.mark.parametrize("name", HF_BACKBONES)
def test_hf_backbone_loads_a_save_pretrained_directory(name, tmp_path):
    backbone = get_backbone(name)
    torch.manual_seed(0)
    model = backbone.build(backbone.tiny_configs()[0].config)
    model.save_pretrained(tmp_path)
    processor = backbone.default_processor(model.config.image_size)
    processor.save_pretrained(tmp_path)
    loaded = backbone.load(tmp_path)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.stock_features(loaded, pixels), backbone.stock_features(model, pixels))
    # the saved preprocessing is the one applied
    image = Image.new("RGB", (100, 80), (200, 30, 30))
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(backbone.preprocess(loaded, [image]), expected)


def test_timm_backbone_loads_a_save_for_hf_directory(tmp_path):
    backbone = get_backbone("timm_vit")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2)
    save_for_hf(model, str(tmp_path), model_args={"depth": 2}, safe_serialization=True)
    loaded = backbone.load(tmp_path)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(backbone.stock_features(loaded, pixels), model.eval().forward_features(pixels))


@pytest.mark.parametrize("name", HF_BACKBONES)
def test_unreachable_hub_id_names_the_backbone_and_the_fix(name):
    expected = rf"backbone '{name}' could not load 'someone/not-here'.*local save_pretrained directory"
    with pytest.raises(OSError, match=expected):
        get_backbone(name).load("someone/not-here")


def test_offline_weights_not_materialised_say_how(monkeypatch, tmp_path):
    monkeypatch.setenv("DYMU_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python -m dymu_lightning assets"):
        get_backbone("dinov2_vits14_offline").load()
