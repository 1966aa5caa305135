"""Videos in a whole tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL with DyMU (backbones/hf_qwen_vl_lm.py): the tower
merges each temporal slice on its own, and VTU places a merged token's rows at its cells' (t, h, w)
M-RoPE positions. Float64; a batch of two prompts (one left-padded) that mixes two videos of
different lengths and sizes with two images."""

from __future__ import annotations

import math

import pytest
import torch
from test_qwen_vl_lm import HIDDEN, IMAGE, VIDEO, build
from tests_support import naive_reference

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import apply_dymu, last_prefill, remove_dymu
from dymu_lightning.backbones.hf_qwen_vl_lm import next_positions, qwen_vl_decode, qwen_vl_prefill
from dymu_lightning.core import MergePolicy

pytestmark = pytest.mark.usefixtures("one_thread")

# Qwen2.5-VL spaces a video's slices by tokens_per_second (4) x these seconds: t steps of 4 and 2.
SECONDS = torch.tensor([1.0, 0.5])
FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
#: Qwen3-VL's processor writes a timestamp (text) before each slice's placeholders: this one's id.
TIMESTAMP = 10


def _smooth(generator: torch.Generator, frames: int, size: tuple[int, int]) -> torch.Tensor:
    """``[frames, 3, H, W]``: a smooth scene that drifts a little from frame to frame."""
    coarse = torch.randn(1, 3, 2, 2, generator=generator, dtype=torch.float64)
    drift = torch.randn(1, 3, 2, 2, generator=generator, dtype=torch.float64)
    steps = torch.arange(frames, dtype=torch.float64)[:, None, None, None] * 0.2
    return torch.nn.functional.interpolate(coarse + steps * drift, size, mode="bilinear")


def _video(family: str, slices: int, cells: int) -> list[int]:
    """A video's placeholders: Qwen3-VL's with a timestamp token before each slice's cells."""
    if family == "qwen3_vl":
        return [TIMESTAMP, *[VIDEO] * cells] * slices
    return [VIDEO] * (slices * cells)


def prompts(samples: tuple[int, ...] = (0, 1), family: str = "qwen2_vl"):
    """Sample 0: 2 text, video A (4 frames of 16 x 24 px: 2 slices of 6 cells), 1 text, image P
    (16 x 16: 4 cells), 1 text; sample 1, left-padded: 1 text, image Q (24 x 16: 6 cells), 2 text,
    video B (6 frames of 16 x 16: 3 slices of 4 cells), 1 text. Qwen3-VL: a timestamp before each slice.

    Returns ``input_ids``, ``attention_mask``, images, videos and Qwen2.5's seconds per slice of
    the chosen samples (the left padding is kept, so a sample reads the same alone as in the batch)."""
    generator = torch.Generator().manual_seed(3)
    video_a, video_b = _smooth(generator, 4, (16, 24)), _smooth(generator, 6, (16, 16))
    image_p = torch.randn(3, 16, 16, generator=generator, dtype=torch.float64)
    image_q = _smooth(generator, 1, (24, 16))[0]
    first = [1, 2, *_video(family, 2, 6), 3, *[IMAGE] * 4, 5]
    second = [6, *[IMAGE] * 6, 7, 8, *_video(family, 3, 4), 9]
    pad = len(second) - len(first)
    ids = [[0] * pad + first, second]
    masks = [[0] * pad + [1] * len(first), [1] * len(second)]
    images, videos = [image_p, image_q], [video_a, video_b]
    pick = list(samples)
    return (
        torch.tensor([ids[b] for b in pick]),
        torch.tensor([masks[b] for b in pick]),
        [images[b] for b in pick],
        [videos[b] for b in pick],
        SECONDS[pick],
    )


def token_types(input_ids: torch.Tensor) -> torch.Tensor:
    """What Qwen's processor gives as ``mm_token_type_ids``: 1 image, 2 video, 0 text."""
    return (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()


def _seconds(family: str, seconds: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"second_per_grid_ts": seconds} if family == "qwen2_5_vl" else {}


def stock_logits(model, family, input_ids, attention_mask, images, videos, seconds):
    backbone = get_backbone("hf_qwen2_vl")
    patches, grid = backbone.patchify(model.model.visual, images)
    video_patches, video_grid = backbone.patchify_videos(model.model.visual, videos)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=patches,
        image_grid_thw=grid,
        pixel_values_videos=video_patches,
        video_grid_thw=video_grid,
        mm_token_type_ids=token_types(input_ids),
        **_seconds(family, seconds),
    ).logits


def prefill(model, family, policy, samples=(0, 1), **options):
    input_ids, attention_mask, images, videos, seconds = prompts(samples, family)
    return qwen_vl_prefill(
        model, input_ids, images, policy, attention_mask, videos=videos, **_seconds(family, seconds), **options
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_infinite_thresholds_equal_the_stock_model(family):
    model = build(family)
    input_ids, attention_mask, images, videos, seconds = prompts(family=family)
    policy = MergePolicy(thresholds=[math.inf] * len(model.model.visual.blocks))
    with torch.no_grad():
        stock = stock_logits(model, family, input_ids, attention_mask, images, videos, seconds)
        ours = prefill(model, family, policy)
    valid = attention_mask.bool()
    torch.testing.assert_close(ours.position_logits()[valid], stock[valid], rtol=0, atol=1e-8)
    # a row per image, then per video slice; a video's placeholders keep their slice's t position
    assert ours.merged.lengths.tolist() == [4, 6, 6, 6, 4, 4, 4]
    if family == "qwen3_vl":  # 3 pads, 2 text, a timestamp, slice 1, a timestamp, slice 2
        video_a = ours.layout.positions[0, 0, [*range(6, 12), *range(13, 19)]]
        assert video_a.tolist() == [3] * 6 + [7] * 6  # each slice's t: one past its timestamp
        return
    video_a = ours.layout.positions[0, 0, 4:16]  # sample 0: 2 pads, 2 text, then video A
    step = 4 if family == "qwen2_5_vl" else 1  # 2.5: tokens_per_second 4 x 1.0 s per slice
    assert video_a.tolist() == [2] * 6 + [2 + step] * 6


def _rows(model, input_ids, result, images: int, tap: int | None = None) -> torch.Tensor:
    """The prefill's input rows, rebuilt with Python loops: a text position's row is its embedding, a
    placeholder's row is its cell's merged token (the tower's first ``images`` slices are the
    images, the videos' slices follow). With ``tap``: Qwen3-VL's DeepStack rows of that tap instead
    (the merged token's tap feature; zeros for text)."""
    embeds = model.get_input_embeddings()(input_ids)
    rows = torch.zeros(input_ids.shape[0], result.layout.num_rows, HIDDEN, dtype=embeds.dtype)
    merged = result.merged
    features = merged.tokens
    if tap is not None:
        features, embeds = merged.layout.pad(merged.taps[tap]), torch.zeros_like(embeds)
    cells = (merged.group >= 0).sum(1).tolist()
    cursor = {IMAGE: (0, 0), VIDEO: (images, 0)}  # the (slice, cell) each kind reads next
    for b in range(input_ids.shape[0]):
        for n in range(input_ids.shape[1]):
            token = int(input_ids[b, n])
            if token in cursor:
                slice_, cell = cursor[token]
                rows[b, result.layout.expand[b, n]] = features[slice_, int(merged.group[slice_, cell])]
                cursor[token] = (slice_, cell + 1) if cell + 1 < cells[slice_] else (slice_ + 1, 0)
            else:
                rows[b, result.layout.expand[b, n]] = embeds[b, n]
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_video_rows_attend_as_the_naive_reference(family):
    """First-layer (and every-layer) exactness of VTU over M-RoPE: the rows expanded to the full
    sequence and run through the host's own attention at the full prompt's (t, h, w) positions."""
    model = build(family)
    input_ids = prompts(family=family)[0]
    with torch.no_grad():
        ours = prefill(model, family, MergePolicy(mode="fixed_r", r=1))
        layers = len(model.model.visual.blocks)  # r = 1 a block, down to one token
        assert ours.merged.lengths.tolist() == [max(cells - layers, 1) for cells in (4, 6, 6, 6, 4, 4, 4)]
        groups = ours.merged.group
        for slice_ in range(2, 7):  # every video slice merged some of its own cells, none of another's
            assert (groups[slice_][groups[slice_] >= 0].bincount() > 1).any()
        rows = _rows(model, input_ids, ours, images=2)
        deepstack = [_rows(model, input_ids, ours, 2, tap) for tap in range(len(ours.merged.taps))]
        reference = model.lm_head(naive_reference(model.model.language_model, rows, ours.layout, deepstack))
    valid_rows = ours.layout.counts() > 0
    torch.testing.assert_close(ours.logits[valid_rows], reference[valid_rows], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_reads_the_same_alone_and_in_the_batch(family):
    model = build(family)
    policy = MergePolicy(mode="fixed_r", r=1)
    with torch.no_grad():
        batch = prefill(model, family, policy)
        for sample in (0, 1):
            alone = prefill(model, family, policy, samples=(sample,))
            valid = alone.layout.valid[0]
            torch.testing.assert_close(
                alone.position_logits()[0, valid], batch.position_logits()[sample, valid], rtol=0, atol=1e-10
            )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["compact", "expanded"])
def test_greedy_decoding_at_infinite_thresholds_is_the_stock_model(family, cache):
    """Two greedy steps after the prefill equal the stock model decoding on its own cache, as its
    generate() does (positions from the recorded rope deltas). That is not a recompute of the whole
    sequence: Qwen2.5's video B spans t positions up to 4 past its start, and the host continues text
    one past the largest position, while a recompute would number the new text after the last text."""
    model = build(family)
    input_ids, attention_mask, images, videos, seconds = prompts(family=family)
    policy = MergePolicy(thresholds=[math.inf] * len(model.model.visual.blocks))
    backbone = get_backbone("hf_qwen2_vl")
    patches, grid = backbone.patchify(model.model.visual, images)
    video_patches, video_grid = backbone.patchify_videos(model.model.visual, videos)
    with torch.no_grad():
        stock = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=patches,
            image_grid_thw=grid,
            pixel_values_videos=video_patches,
            video_grid_thw=video_grid,
            mm_token_type_ids=token_types(input_ids),
            use_cache=True,
            **_seconds(family, seconds),
        )
        stock_cache, mask = stock.cache, attention_mask
        result = prefill(model, family, policy, cache=cache)
        logits = result.position_logits()[:, -1]
        torch.testing.assert_close(logits, stock.logits[:, -1], rtol=0, atol=1e-8)
        positions, valid = result.layout.positions, result.layout.valid
        for _ in range(2):
            token = logits.argmax(-1, keepdim=True)
            new_positions = next_positions(positions, valid, 1)
            positions, valid = torch.cat([positions, new_positions], -1), torch.cat([valid, valid[:, -1:]], 1)
            logits = qwen_vl_decode(model, result.cache, token, new_positions, valid)[:, -1]
            mask = torch.cat([mask, mask[:, -1:]], 1)
            text = mask.cumsum(1)[:, -1:] - 1 + model.model.rope_deltas  # generate()'s positions, [B, 1]
            stock = model(
                input_ids=token,
                attention_mask=mask,
                cache=stock_cache,
                position_ids=text[None].expand(3, -1, -1),
                use_cache=True,
            )
            stock_cache = stock.cache
            torch.testing.assert_close(logits, stock.logits[:, -1], rtol=0, atol=1e-8)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_merged_video_decoding_compact_equals_expanded(family):
    model = build(family)
    policy = MergePolicy(mode="fixed_r", r=1)
    with torch.no_grad():
        compact = prefill(model, family, policy, cache="compact")
        expanded = prefill(model, family, policy, cache="expanded")
        layout = compact.layout
        for new in (2, 1):
            ids = torch.randint(1, 50, (2, new), generator=torch.Generator().manual_seed(new))
            positions = next_positions(layout.positions, layout.valid, new)
            valid = torch.cat([layout.valid, torch.ones(2, new, dtype=torch.bool)], 1)
            ours = qwen_vl_decode(model, compact.cache, ids, positions, valid)
            theirs = qwen_vl_decode(model, expanded.cache, ids, positions, valid)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
            layout = layout.extend(positions, valid)


def test_a_wrong_video_placeholder_count_is_a_clear_error():
    model = build()
    input_ids, attention_mask, images, videos, _ = prompts()
    with pytest.raises(ValueError, match=r"input_ids hold 24 video placeholders; the videos have 36 cells"):
        qwen_vl_prefill(model, input_ids, images, MergePolicy.off(), attention_mask, videos=[*videos, videos[1]])


# ----- generate() with apply_dymu ------------------------------------------------------------------------------
NEW_TOKENS = 3


def processor_inputs(model, family) -> dict[str, torch.Tensor]:
    """The mixed prompts as Qwen's processors give them."""
    input_ids, attention_mask, images, videos, seconds = prompts(family=family)
    backbone = get_backbone("hf_qwen2_vl")
    patches, grid = backbone.patchify(model.model.visual, images)
    video_patches, video_grid = backbone.patchify_videos(model.model.visual, videos)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": patches,
        "image_grid_thw": grid,
        "pixel_values_videos": video_patches,
        "video_grid_thw": video_grid,
        "mm_token_type_ids": token_types(input_ids),
        **_seconds(family, seconds),
    }


def generate(model, family, **options):
    with torch.no_grad():
        return model.generate(
            **processor_inputs(model, family),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            **options,
        )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["expanded", "compact"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_videos_at_infinite_thresholds_is_the_stock_model(family, cache, num_beams):
    model = build(family)
    stock = generate(model, family, num_beams=num_beams)
    apply_dymu(model, MergePolicy(thresholds=[math.inf] * len(model.model.visual.blocks)), cache=cache)
    ours = generate(model, family, num_beams=num_beams)
    assert ours.shape == (2, prompts(family=family)[0].shape[1] + NEW_TOKENS) and torch.equal(ours, stock)
    # nothing merged: a row per cell of every image, then of every video slice (each beam prefills
    # its own copy of its prompt's items)
    cells = [4] * num_beams + [6] * num_beams + [6, 6] * num_beams + [4, 4, 4] * num_beams
    accounting = last_prefill(model)
    assert accounting["visual_rows"].tolist() == accounting["visual_positions"].tolist() == cells
    remove_dymu(model)
    assert torch.equal(generate(model, family, num_beams=num_beams), stock)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_merged_generate_with_videos_compact_equals_expanded(family, num_beams):
    model = build(family)
    out = {}
    for cache in ("expanded", "compact"):
        apply_dymu(model, MergePolicy(mode="fixed_r", r=1), cache=cache)
        with torch.no_grad():
            out[cache] = model.generate(
                **processor_inputs(model, family),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                num_beams=num_beams,
                output_scores=True,
                return_dict_in_generate=True,
            )
        remove_dymu(model)
    assert torch.equal(out["compact"].sequences, out["expanded"].sequences)
    for compact, expanded in zip(out["compact"].scores, out["expanded"].scores, strict=True):
        torch.testing.assert_close(compact, expanded, rtol=0, atol=1e-8)


def test_beams_copy_each_prompt_with_its_own_images_and_videos():
    """Images, videos, their grid rows and seconds are copied prompt by prompt: [A, B] -> [A, A, B, B]
    for one item per prompt; each copy then reads what the prompt alone reads."""
    model = build("qwen2_5_vl")
    apply_dymu(model, MergePolicy(mode="fixed_r", r=1), cache="compact")
    batch = processor_inputs(model, "qwen2_5_vl")
    _, expanded = model._expand_inputs_for_generation(expand_size=2, **batch)
    assert expanded["image_grid_thw"].tolist() == batch["image_grid_thw"][[0, 0, 1, 1]].tolist()
    assert expanded["video_grid_thw"].tolist() == batch["video_grid_thw"][[0, 0, 1, 1]].tolist()
    assert expanded["second_per_grid_ts"].tolist() == [1.0, 1.0, 0.5, 0.5]
    a, b = batch["pixel_values_videos"].split(batch["video_grid_thw"].prod(1).tolist())  # 48, 48 patches
    assert torch.equal(expanded["pixel_values_videos"], torch.cat([a, a, b, b]))
    p, q = batch["pixel_values"].split(batch["image_grid_thw"].prod(1).tolist())
    assert torch.equal(expanded["pixel_values"], torch.cat([p, p, q, q]))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_one_unpadded_prompt_with_the_compact_cache_is_the_stock_model(family):
    """generate() drops an all-ones attention mask when decoding: the compact cache then extends its
    M-RoPE layout ([3, B, N] positions) with the new tokens marked valid."""
    model = build(family)
    input_ids, attention_mask, images, videos, seconds = prompts(samples=(1,), family=family)
    assert attention_mask.all()
    backbone = get_backbone("hf_qwen2_vl")
    patches, grid = backbone.patchify(model.model.visual, images)
    video_patches, video_grid = backbone.patchify_videos(model.model.visual, videos)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": patches,
        "image_grid_thw": grid,
        "pixel_values_videos": video_patches,
        "video_grid_thw": video_grid,
        "mm_token_type_ids": token_types(input_ids),
        **_seconds(family, seconds),
    }
    options = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    with torch.no_grad():
        stock = model.generate(**batch, **options)
        apply_dymu(model, MergePolicy(thresholds=[math.inf] * len(model.model.visual.blocks)), cache="compact")
        assert torch.equal(model.generate(**batch, **options), stock)
