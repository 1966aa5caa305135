"""DyMU on the small real LLaVA: real DINOv2-S tower, real SmolLM2-135M (see dymu_lightning/assets/small_llava.py)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dymu_lightning.assets import fetch as assets
from dymu_lightning.assets.paths import small_llava_dir
from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import apply_dymu, last_prefill, remove_dymu
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    directory = small_llava_dir()
    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    photos = assets.sample_images()
    # a page of text and a blank patch of sky: the busiest and the flattest image we ship
    camera = Image.open(photos["camera"]).convert("RGB")
    images = [Image.open(photos["text"]).convert("RGB"), camera.crop((0, 0, 120, 120))]
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is in this picture?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(images=images, text=[prompt, prompt], return_tensors="pt", padding=True)
    # DyMU-mid-like thresholds found on a few photos (r = 35 over the 11 blocks the LLaVA reads)
    tower, backbone = model.model.vision_tower, get_backbone("hf_dinov2")
    names = ("astronaut", "coffee", "chelsea", "grass", "page", "rocket")
    calibration = processor.image_processor([Image.open(photos[n]).convert("RGB") for n in names], return_tensors="pt")
    found = batch_thresholds(backbone, tower, calibration["pixel_values"], r=[35] * 11 + [0])
    return model, processor, inputs, MergePolicy(thresholds=found)


def test_the_small_llava_is_what_the_docs_say(real):
    model, processor, inputs, _ = real
    assert type(model.model.language_model).__name__ == "LlamaModel"
    assert model.config.text_config.num_hidden_layers == 30 and model.config.text_config.num_key_value_heads == 3
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * 576


def test_infinite_thresholds_equal_the_stock_model(real):
    model, _, inputs, _ = real
    with torch.no_grad():
        stock = model(**inputs, logits_to_keep=4).logits
        apply_dymu(model, MergePolicy(thresholds=[math.inf] * 12))
        ours = model(**inputs, logits_to_keep=4).logits
        remove_dymu(model)
    torch.testing.assert_close(ours, stock, rtol=0, atol=2e-3)
    assert torch.equal(ours.argmax(-1), stock.argmax(-1))


def test_dymu_mid_generates_the_same_tokens_with_either_cache(real):
    model, _, inputs, policy = real
    out = {}
    with torch.no_grad():
        before = model(**inputs, logits_to_keep=1).logits
        for cache in ("compact", "expanded"):
            apply_dymu(model, policy, cache=cache)
            out[cache] = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            counts = last_prefill(model)
        remove_dymu(model)
        after = model(**inputs, logits_to_keep=1).logits
    assert torch.equal(out["compact"], out["expanded"])
    text_rows, sky_rows = counts["visual_rows"].tolist()
    assert sky_rows < 60 < 150 < text_rows < 576  # the blank sky collapses, the page of text does not
    assert torch.equal(after, before)
