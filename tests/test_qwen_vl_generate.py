"""``apply_dymu`` / ``remove_dymu`` and ``generate()`` on a whole tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL
(backbones/hf_qwen_vl_generate.py). Float64, the batch of tests/test_qwen_vl_lm.py: two prompts, one
left-padded, three images of different sizes (two in the first prompt)."""

from __future__ import annotations

import math

import pytest
import torch
from test_qwen_vl_lm import FAMILIES, IMAGE, build, prompts

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import apply_dymu, is_dymu, last_prefill, remove_dymu
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.core import MergePolicy

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_TOKENS = 4


def inputs(model) -> dict[str, torch.Tensor]:
    """The prompts as Qwen's processor gives them: patches, grid, token types."""
    input_ids, attention_mask, images = prompts()
    patches, grid = get_backbone("hf_qwen2_vl").patchify(model.model.visual, images)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": patches,
        "image_grid_thw": grid,
        "mm_token_type_ids": (input_ids == IMAGE).int(),
    }


def generate(model, **options) -> torch.Tensor:
    """``[B * returned, N + new]`` greedy (or beam) sequences, at least :data:`NEW_TOKENS` new ones
    (the tiny model's eos is token 0: min_new_tokens keeps every run the same length)."""
    with torch.no_grad():
        return model.generate(
            **inputs(model),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            **options,
        )


def infinite(model) -> MergePolicy:
    return MergePolicy(thresholds=[math.inf] * len(model.model.visual.blocks))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("cache", ["expanded", "compact"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_at_infinite_thresholds_is_the_stock_model(family, cache, num_beams):
    model = build(family)
    stock = generate(model, num_beams=num_beams)
    apply_dymu(model, infinite(model), cache=cache)
    ours = generate(model, num_beams=num_beams)
    assert ours.shape == (2, 24 + NEW_TOKENS)
    assert torch.equal(ours, stock)
    accounting = last_prefill(model)  # nothing merged: a row per cell, one per valid text position
    images = [15, 4] * num_beams + [12] * num_beams  # each beam prefills its own copy of the prompt
    assert accounting["visual_rows"].tolist() == accounting["visual_positions"].tolist() == images
    assert accounting["rows"].tolist() == [24] * num_beams + [15] * num_beams
    remove_dymu(model)
    assert not is_dymu(model)
    assert torch.equal(generate(model, num_beams=num_beams), stock)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_merged_generate_compact_equals_expanded(family, num_beams):
    model = build(family)
    policy = MergePolicy(mode="fixed_r", r=2)
    out = {}
    for cache in ("expanded", "compact"):
        apply_dymu(model, policy, cache=cache)
        with torch.no_grad():
            out[cache] = model.generate(
                **inputs(model),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                num_beams=num_beams,
                output_scores=True,
                return_dict_in_generate=True,
            )
        layers = len(model.model.visual.blocks)
        merged = [15 - 2 * layers, 1] * num_beams + [12 - 2 * layers] * num_beams  # r = 2 cells a block
        assert last_prefill(model)["visual_rows"].tolist() == merged
        remove_dymu(model)
    assert torch.equal(out["compact"].sequences, out["expanded"].sequences)
    for compact, expanded in zip(out["compact"].scores, out["expanded"].scores, strict=True):
        torch.testing.assert_close(compact, expanded, rtol=0, atol=1e-8)


def test_beams_copy_each_prompt_with_its_own_images():
    """Beam search copies the patches and grid rows prompt by prompt ([A, B] of one prompt becomes
    [A, B, A, B]): each copy of a prompt then gives what the prompt alone gives."""
    model = build()
    apply_dymu(model, MergePolicy(mode="fixed_r", r=2), cache="compact")
    batch = inputs(model)
    _, expanded = model._expand_inputs_for_generation(expand_size=2, **batch)
    grid = batch["image_grid_thw"]
    assert expanded["image_grid_thw"].tolist() == grid[[0, 1, 0, 1, 2, 2]].tolist()
    patches = grid.prod(1).tolist()  # 60, 16, 48 patches
    a, b, c = batch["pixel_values"].split(patches)
    assert torch.equal(expanded["pixel_values"], torch.cat([a, b, a, b, c, c]))


def test_training_and_a_missing_grid_are_clear_errors():
    model = build()
    apply_dymu(model, infinite(model))
    batch = inputs(model)
    with pytest.raises(ValueError, match=r"needs pixel_values_videos and video_grid_thw together"):
        model(**batch, pixel_values_videos=batch["pixel_values"])
    with pytest.raises(NotImplementedError, match=r"DyMU computes no training loss"):
        model(**batch, labels=batch["input_ids"])


def test_compact_decoding_without_position_ids_continues_at_the_stock_positions():
    """A prefill and two decoding forwards called by hand. The stock model is given generate()'s
    positions (text position + the recorded rope_deltas, on every axis); the compact cache's decoding
    given none continues one past the largest position so far, which is the same place."""
    model = build("qwen2_5_vl")
    batch = inputs(model)
    steps = torch.tensor([[5], [7]]), torch.tensor([[9], [3]])

    def run(positions: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            logits, store, mask = [out.logits[:, -1]], out.cache, batch["attention_mask"]
            for token in steps:
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                text = mask.cumsum(1)[:, -1:] - 1 + model.model.rope_deltas  # [B, 1]
                given = {"position_ids": text[None].expand(3, -1, -1)} if positions else {}
                out = model(input_ids=token, attention_mask=mask, cache=store, **given)
                logits.append(out.logits[:, -1])
        return logits

    stock = run(positions=True)
    apply_dymu(model, infinite(model), cache="compact")
    for ours, theirs in zip(run(positions=False), stock, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-8)


def test_apply_from_a_thresholds_file_checks_the_tower(tmp_path):
    """A thresholds file drives a Qwen tower of its backbone and depth; another backbone's is refused
    with both sides named. (No image size to check: Qwen's images keep their own sizes.)"""
    model = build()
    layers = len(model.model.visual.blocks)
    fields = {
        "backbone": "hf_qwen2_vl",
        "num_layers": layers,
        "image_size": 448,
        "thresholds": [0.5] * layers,
        "r": [2] * layers,
        "schedule": {"kind": "constant"},
        "images_seen": 4,
        "global_batch_size": 4,
        "world_size": 1,
        "tokens": {},
    }
    apply_dymu(model, ThresholdsFile(**fields).save(tmp_path / "thresholds.json"), cache="compact", max_merges=3)
    state = model._dymu_llava
    assert state.backbone.name == "hf_qwen2_vl" and state.cache == "compact"
    assert state.policy.thresholds == [0.5] * layers and state.policy.max_merges == 3
    remove_dymu(model)
    other = ThresholdsFile(**{**fields, "backbone": "hf_qwen2_5_vl"})
    with pytest.raises(ValueError, match=r"calibrated for backbone 'hf_qwen2_5_vl' .* cannot drive backbone"):
        apply_dymu(model, other, backbone="hf_qwen2_vl")
    with pytest.raises(
        ValueError,
        match=r"backbone 'hf_qwen2_5_vl' does not adapt this Qwen2VLForConditionalGeneration's vision tower",
    ):
        apply_dymu(model, other)
    assert not is_dymu(model)
