"""The small real LLaVA-OneVision (``dymu small_onevision``): loadable, OneVision's layout, the real tower."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dymu_lightning.assets.fetch import is_complete
from dymu_lightning.assets.paths import dinov2_small_dir, photos_dir, small_onevision_dir
from dymu_lightning.assets.small_onevision import PINPOINTS
from dymu_lightning.backbones.hf_llava_next import crops_per_image, image_lengths

pytestmark = pytest.mark.skipif(
    not is_complete(small_onevision_dir()) or not photos_dir("skimage").is_dir(),
    reason="needs the small OneVision: run `python -m dymu_lightning small_onevision` (not part of `make assets`)",
)


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    folder = small_onevision_dir()
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()
    return model, AutoProcessor.from_pretrained(folder)


def test_the_processor_writes_the_models_number_of_placeholders(loaded):
    """OneVision's layout at 336 px crops: for a 451 x 300 photo, a base crop and 2 x 1 tiles; the
    processor's placeholders are the cells the model's own pack_image_features lays out."""
    model, processor = loaded
    assert model.config.image_grid_pinpoints == PINPOINTS and model.config.vision_aspect_ratio == "anyres_max_9"
    image = Image.open(photos_dir("skimage") / "chelsea.png").convert("RGB")
    inputs = processor(text="<image>\nWhat is this?", images=image, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 3, 336, 336)
    crops = crops_per_image(model, inputs["image_sizes"], inputs["batch_num_images"])
    cells = image_lengths(model, crops, inputs["image_sizes"])
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert crops == [3] and placeholders == cells[0] == 1464


def test_the_tower_is_dinov2_at_336_px(loaded):
    """The resampled position embeddings are exactly what DINOv2 interpolates for a 336 px input."""
    from transformers import Dinov2Model

    model, _ = loaded
    original = Dinov2Model.from_pretrained(dinov2_small_dir()).eval()
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.model.vision_tower(pixels).last_hidden_state, original(pixels).last_hidden_state)
    provenance = json.loads((small_onevision_dir() / "dymu_provenance.json").read_text())
    assert provenance["projector"].startswith("random, torch.manual_seed(0) (untrained")
