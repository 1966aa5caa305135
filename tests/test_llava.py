"""DyMU end to end in HF LLaVA: DToMe in the tower, VTU in the language model, generate() with both caches."""

from __future__ import annotations

import math

import pytest
import torch
from tests_support import (
    FAMILIES,
    IMAGE_TOKEN,
    PATCHES,
    TINY,
    generate,
    greedy_reference,
    merging_policy,
    prompt_batch,
    tiny_llava,
)
from transformers import Cache

from dymu_lightning.backbones.hf_llava import (
    EXPAND_TESTED_WITH,
    apply_dymu,
    check_expand_hook,
    dymu_inputs,
    is_dymu,
    last_prefill,
    next_token_logits,
    remove_dymu,
)
from dymu_lightning.backbones.hf_llm import HFCompactCache
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.core import MergePolicy


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_infinite_thresholds_equal_the_stock_model(family):
    model = tiny_llava(family)
    batch = prompt_batch()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        stock = model(**batch, position_ids=positions).logits
        stock_tokens = generate(model, batch, 5)
        apply_dymu(model, MergePolicy(thresholds=[math.inf] * 3))
        ours = model(**batch, position_ids=positions).logits
        for cache in ("compact", "expanded"):
            apply_dymu(model, MergePolicy(thresholds=[math.inf] * 3), cache=cache)
            assert torch.equal(generate(model, batch, 5), stock_tokens), cache
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], stock[valid], rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("cache", ["compact", "expanded"])
def test_greedy_generate_equals_the_naive_reference(family, cache):
    model = tiny_llava(family)
    batch = prompt_batch()
    apply_dymu(model, merging_policy(model), cache=cache)
    with torch.no_grad():
        inputs = dymu_inputs(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        reference = greedy_reference(model, batch, steps=6)
        out = generate(model, batch, 6)
    assert inputs.visual_rows.lt(PATCHES).all()  # every image merged something
    assert torch.equal(out[:, batch["input_ids"].shape[1] :], reference)


def test_images_of_different_complexity_get_different_row_counts():
    model = tiny_llava()
    batch = prompt_batch()
    apply_dymu(model, merging_policy(model), cache="compact")
    with torch.no_grad():
        inputs = dymu_inputs(model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        out = generate(model, batch, 4, return_dict_in_generate=True)
    smooth_first, noisy, smooth_second = inputs.visual_rows.tolist()
    assert smooth_first < noisy and smooth_second < noisy
    # a row per text token (padding included: sample 1 has 18 pads + 3 tokens) plus each image's rows
    assert inputs.layout.num_rows == max(5 + smooth_first + noisy, 21 + smooth_second)
    assert inputs.layout.counts().sum(1).tolist() == batch["attention_mask"].sum(1).tolist()
    # every placeholder sees the projection of the merged token its patch went into, every text
    # position its own embedding (checked position by position, in Python)
    at_positions = inputs.layout.to_positions(inputs.rows)
    merged, projector = inputs.merged, model.model.multi_modal_projector
    embeddings = model.get_input_embeddings()(batch["input_ids"])
    image = 0
    for b, ids in enumerate(batch["input_ids"].tolist()):
        placeholders = [i for i, token in enumerate(ids) if token == IMAGE_TOKEN]
        for i in range(len(ids)):
            if ids[i] != IMAGE_TOKEN:
                assert torch.equal(at_positions[b, i], embeddings[b, i])
        for start in placeholders[::PATCHES]:
            for patch in range(PATCHES):
                token = merged.tokens[image, merged.group[image, patch]]
                torch.testing.assert_close(at_positions[b, start + patch], projector(token), rtol=0, atol=1e-12)
            image += 1
    # the compact cache holds a value per row and a key per position, and one of each per generated
    # token (the last token is not fed back)
    cache = out.cache
    assert isinstance(cache, HFCompactCache)
    assert cache.layers[0].values.shape[2] == inputs.layout.num_rows + 3
    assert cache.layers[0].keys.shape[2] == cache.seq_length == batch["input_ids"].shape[1] + 3


def test_compact_and_expanded_caches_hold_what_they_should():
    model = tiny_llava()
    batch = prompt_batch()
    sizes = {}
    for cache in ("compact", "expanded"):
        apply_dymu(model, merging_policy(model), cache=cache)
        with torch.no_grad():
            out = generate(model, batch, 2, return_dict_in_generate=True)
        sizes[cache] = out.cache
    length = batch["input_ids"].shape[1] + 1
    expanded_keys = sizes["expanded"].layers[0].keys  # [B, Hkv, N, d], the stock layout
    assert expanded_keys.shape == (2, TINY["num_key_value_heads"], length, 8)
    compact = sizes["compact"]
    # keys: the stock ones, rotated at their positions (the same up to rounding: RoPE written differently)
    torch.testing.assert_close(compact.layers[0].keys, expanded_keys, rtol=0, atol=1e-12)
    assert compact.layers[0].values.shape[:3] == (2, TINY["num_key_value_heads"], compact.layout.num_rows)
    assert compact.layout.num_rows < length


def test_removing_dymu_restores_the_stock_model_exactly():
    model = tiny_llava()
    batch = prompt_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(**batch).logits
        apply_dymu(model, merging_policy(model))
        merged = model(**batch).logits
        assert is_dymu(model)
        remove_dymu(model)
        after = model(**batch).logits
    assert not is_dymu(model) and "forward" not in vars(model) and "_expand_inputs_for_generation" not in vars(model)
    assert torch.equal(after, before)
    assert not torch.allclose(merged, before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="DyMU is not applied"):
        remove_dymu(model)


@pytest.mark.parametrize("cache", ["compact", "expanded"])
def test_beam_search_with_infinite_thresholds_equals_the_stock_model(cache):
    """Beams copy each sample; sample 0 has two images, which must stay a pair in every copy."""
    model = tiny_llava()
    batch = prompt_batch()
    with torch.no_grad():
        stock = generate(model, batch, 4, num_beams=2, num_return_sequences=2)
        apply_dymu(model, MergePolicy(thresholds=[math.inf] * 3), cache=cache)
        ours = generate(model, batch, 4, num_beams=2, num_return_sequences=2)
    assert ours.shape[0] == 4 and torch.equal(ours, stock)


@pytest.mark.parametrize("cache", ["compact", "expanded"])
def test_beam_search_with_merging_is_independent_of_batch_mates(cache):
    model = tiny_llava()
    batch = prompt_batch()
    apply_dymu(model, merging_policy(model), cache=cache)
    pad = int((batch["attention_mask"][1] == 0).sum())
    alone = [
        {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1]},
        {"input_ids": batch["input_ids"][1:, pad:], "attention_mask": batch["attention_mask"][1:, pad:]},
    ]
    alone[0]["pixel_values"], alone[1]["pixel_values"] = batch["pixel_values"][:2], batch["pixel_values"][2:]
    with torch.no_grad():
        together = generate(model, batch, 4, num_beams=2)
        singles = [generate(model, sample, 4, num_beams=2) for sample in alone]
    assert last_prefill(model)["visual_rows"].lt(PATCHES).all()  # the image merged something
    for i, single in enumerate(singles):
        assert torch.equal(together[i, -4:], single[0, -4:])


def thresholds_file(**changes) -> ThresholdsFile:
    fields = {
        "backbone": "hf_clip",
        "num_layers": 3,
        "image_size": 32,
        "thresholds": [0.5, 0.6, None],
        "r": [6, 6, 0],
        "schedule": {"kind": "constant"},
        "images_seen": 4,
        "global_batch_size": 4,
        "world_size": 1,
        "tokens": {},
        "num_blocks": 2,
    }
    return ThresholdsFile(**{**fields, **changes})


def test_apply_from_a_thresholds_file(tmp_path):
    model = tiny_llava()
    path = thresholds_file().save(tmp_path / "thresholds.json")
    apply_dymu(model, path, cache="expanded", max_merges=3)
    state = model._dymu_llava
    assert state.backbone.name == "hf_clip" and state.num_blocks == 2 and state.cache == "expanded"
    assert state.policy.thresholds == [0.5, 0.6, None] and state.policy.max_merges == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"backbone": "hf_siglip"},
            r"backbone 'hf_siglip' does not adapt this LLaVA's vision tower \(CLIPVisionModel\)",
        ),
        (
            {"num_layers": 12, "thresholds": [0.5] * 12, "r": [6] * 12},
            r"calibrated for backbone 'hf_clip' \(12 layers\)",
        ),
        ({"num_blocks": 3}, r"calibrated with num_blocks=3, but this run reads features after num_blocks=2"),
    ],
)
def test_thresholds_for_another_tower_are_refused(tmp_path, changes, message):
    model = tiny_llava()
    path = thresholds_file(**changes).save(tmp_path / "thresholds.json")
    with pytest.raises(ValueError, match=message):
        apply_dymu(model, path)
    assert not is_dymu(model)


def test_bad_inputs_get_clear_errors():
    model = tiny_llava()
    batch = prompt_batch()
    with pytest.raises(ValueError, match="unknown cache 'paged'"):
        apply_dymu(model, MergePolicy(thresholds=[0.5] * 3), cache="paged")
    apply_dymu(model, MergePolicy(thresholds=[0.5] * 3))
    with pytest.raises(ValueError, match=r"input_ids hold 48 image placeholders; 2 images need 16 each \(32\)"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:2]})


def test_next_token_logits_with_and_without_vtu():
    model = tiny_llava()
    batch = prompt_batch()
    args = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        stock = model(**batch, position_ids=positions).logits[:, -1]
        apply_dymu(model, MergePolicy(thresholds=[math.inf] * 3))
        # with nothing merged, rows are positions: both ways are the stock model
        for vtu in (True, False):
            torch.testing.assert_close(next_token_logits(model, *args, vtu=vtu), stock, rtol=0, atol=1e-10)
        apply_dymu(model, merging_policy(model))
        with_vtu, without = next_token_logits(model, *args), next_token_logits(model, *args, vtu=False)
        # one row per merged token at its own position: the sequence gets shorter, the answer changes
        rows = last_prefill(model)["rows"]
    assert (with_vtu - without).abs().max() > 1e-3
    assert rows.tolist()[0] < batch["attention_mask"].sum(1).tolist()[0]


def test_beam_search_with_merging_gives_the_same_beams_with_either_cache():
    """Beams reorder and copy the compact cache (a ``transformers.Cache``) and its layout through the
    Cache API; it must keep giving what the stock cache of the full sequence gives."""
    model = tiny_llava()
    batch = prompt_batch()
    out = {}
    with torch.no_grad():
        for cache in ("compact", "expanded"):
            apply_dymu(model, merging_policy(model), cache=cache)
            out[cache] = generate(model, batch, 4, num_beams=3, num_return_sequences=2, return_dict_in_generate=True)
    assert last_prefill(model)["visual_rows"].lt(PATCHES).all()
    assert isinstance(out["compact"].cache, HFCompactCache) and isinstance(out["compact"].cache, Cache)
    assert out["compact"].cache.layout.expand.shape[0] == 3 * 2  # the layout followed the beams
    assert torch.equal(out["compact"].sequences, out["expanded"].sequences)
    torch.testing.assert_close(out["compact"].sequences_scores, out["expanded"].sequences_scores, rtol=0, atol=1e-10)


def test_the_private_generate_hook_we_override_is_pinned_to_the_tested_transformers():
    """``_expand_inputs_for_generation`` is private: this fails on a new transformers until the
    override is checked against it, and apply_dymu refuses a changed hook with a clear error."""
    import transformers

    assert transformers.__version__.startswith(EXPAND_TESTED_WITH + "."), (
        f"DyMU's override of _expand_inputs_for_generation was checked against transformers {EXPAND_TESTED_WITH}; "
        f"re-check it (backbones/hf_llava_generate.py) for {transformers.__version__} and update EXPAND_TESTED_WITH"
    )
    check_expand_hook(type(tiny_llava()))  # the installed hook has the parameters the override passes

    class Changed(torch.nn.Module):
        def _expand_inputs_for_generation(self, expand_size=1, input_ids=None, **model_kwargs): ...

    with pytest.raises(RuntimeError, match=r"Changed._expand_inputs_for_generation takes .* update the override"):
        check_expand_hook(Changed)
