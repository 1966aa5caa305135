"""LLaVA rows when an image's first patch merges into a later token (a tower without a CLS token,
e.g. SigLIP): every image's merged tokens must land on its own rows (a regression: the rows were
offset by the first patch's group and ran past the buffer).
Rows are numbered by first position, so the check goes through the group map."""

from __future__ import annotations

import torch
from tests_support import IMAGE_TOKEN, TINY
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from dymu_lightning.backbones.hf_llava import apply_dymu, dymu_inputs
from dymu_lightning.core import MergePolicy

SIGLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def test_merged_tokens_land_on_their_images_rows_when_the_first_patch_merges():
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**SIGLIP).to_dict(),
        text_config=LlamaConfig(**TINY).to_dict(),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=16,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).double().eval()
    apply_dymu(model, MergePolicy(mode="fixed_r", r=3))
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    image = [IMAGE_TOKEN] * 16
    input_ids = torch.tensor([[1, 2, *image, 3, *image, 4]])
    with torch.no_grad():
        inputs = dymu_inputs(model, input_ids, pixels)
        merged = inputs.merged
        assert (merged.group[:, 0] != 0).any(), "the case under test: a first patch merged into a later token"
        for index, first in enumerate((2, 19)):
            count = int(merged.lengths[index])
            rows = inputs.layout.expand[0, first : first + 16]  # [16] each patch's row
            # rows are numbered in sequence order (by first position), so compare through the group map:
            # every patch's row holds its own group's projected token, and the image owns `count` rows
            projected = model.model.multi_modal_projector(merged.tokens[index, :count])
            torch.testing.assert_close(inputs.rows[0, rows], projected[merged.group[index]], rtol=0, atol=1e-12)
            assert rows.unique().numel() == count
