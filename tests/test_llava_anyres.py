"""DyMU in HF LLaVA-NeXT and LLaVA-OneVision: AnyRes crops merged one by one, VTU over the native layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tests_support import TINY, VISION, generate, greedy_reference, naive_reference
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import apply_dymu, dymu_inputs, last_prefill, next_token_logits, remove_dymu
from dymu_lightning.backbones.hf_llava_next import (
    cell_support,
    crop_pixels,
    crops_per_image,
    image_lengths,
    pack,
    processor_crops,
)
from dymu_lightning.backbones.hf_llm import vtu_forward
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy

IMAGE = 63
# crops of 32 px (4 x 4 patches of 8 px); tiles in grids of up to 2 x 3
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]
INF = MergePolicy(thresholds=[math.inf] * 3)
MODELS = ("next", "onevision")
# (height, width) of two images: wide and tall, square, extreme, small
SIZES = {
    "wide-tall": [[40, 70], [90, 50]],
    "square": [[64, 64], [32, 32]],
    "extreme": [[20, 96], [96, 24]],
}


def tiny_model(kind: str) -> LlavaNextForConditionalGeneration | LlavaOnevisionForConditionalGeneration:
    """LLaVA-NeXT: CLIP (CLS dropped, features after 2 of 3 blocks) + Llama. OneVision: SigLIP (all
    patches, after the last block) + Qwen2, ``anyres_max_2`` so that a 2 x 3 grid gets downsampled."""
    text = {**TINY, "max_position_embeddings": 512}
    if kind == "next":
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**VISION).to_dict(),
            text_config=LlamaConfig(**text).to_dict(),
            image_token_index=IMAGE,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_grid_pinpoints=PINPOINTS,
        )
        model_class = LlavaNextForConditionalGeneration
    else:
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**VISION).to_dict(),
            text_config=Qwen2Config(**text).to_dict(),
            image_token_index=IMAGE,
            video_token_index=IMAGE - 1,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=PINPOINTS,
            vision_aspect_ratio="anyres_max_2",
        )
        model_class = LlavaOnevisionForConditionalGeneration
    torch.manual_seed(0)
    return model_class(config).double().eval()


def crops(count: int, seed: int = 0) -> torch.Tensor:
    """``[count, 3, 32, 32]``: alternately smooth (a 2 x 2 colour field blown up) and noisy crops."""
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(count, 3, 2, 2, generator=generator), size=32, mode="bilinear")
    noisy = torch.randn(count, 3, 32, 32, generator=generator)
    return torch.where(torch.arange(count)[:, None, None, None] % 2 == 0, smooth, noisy).double()


def batch_of(model, sizes: list[list[int]], images_per_sample: list[int], onevision_counts: bool = False) -> dict:
    """Left-padded prompts, ``text, image..., text`` per sample, with as many placeholders as the
    stock model needs for each image; pixel values ``[num_images, max_crops, 3, 32, 32]``."""
    image_sizes = torch.tensor(sizes)
    counts = torch.tensor(images_per_sample) if onevision_counts else None
    per_image = crops_per_image(model, image_sizes, counts)
    lengths = image_lengths(model, per_image, image_sizes)
    sequences, image = [], 0
    for sample, count in enumerate(images_per_sample):
        ids = [1 + sample]
        for _ in range(count):
            ids += [IMAGE] * lengths[image] + [5]
            image += 1
        sequences.append([*ids, 7, 8][: len(ids) + 2 - sample])  # samples of different lengths
    width = max(map(len, sequences))
    input_ids = torch.tensor([[0] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    pixels = crops(len(sizes) * max(per_image)).view(len(sizes), max(per_image), 3, 32, 32)
    batch = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": image_sizes}
    if counts is not None:
        batch["batch_num_images"] = counts
    return batch


def merging_policy(model) -> MergePolicy:
    """Thresholds from the test crops: about 6 merges per crop and layer."""
    tower = model.model.vision_tower
    backbone = get_backbone("hf_clip" if isinstance(model, LlavaNextForConditionalGeneration) else "hf_siglip")
    return MergePolicy(thresholds=[t + 1e-6 for t in batch_thresholds(backbone, tower, crops(8), r=6)])


def positions_of(batch: dict) -> torch.Tensor:
    return (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("kind", MODELS)
def test_infinite_thresholds_equal_the_stock_model(kind, sizes):
    model = tiny_model(kind)
    batch = batch_of(model, SIZES[sizes], [1, 1])
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = model(**batch, position_ids=positions_of(batch)).logits
        stock_tokens = generate(model, batch, 4)
        apply_dymu(model, INF)
        ours = model(**batch, position_ids=positions_of(batch)).logits
        for cache in ("compact", "expanded"):
            apply_dymu(model, INF, cache=cache)
            assert torch.equal(generate(model, batch, 4), stock_tokens), cache
    assert torch.equal(ours[valid], stock[valid])  # float64: bit for bit
    counts = last_prefill(model)
    assert torch.equal(counts["visual_rows"], counts["visual_positions"])  # nothing merged: a row per cell


@pytest.mark.parametrize("cache", ["compact", "expanded"])
@pytest.mark.parametrize("kind", MODELS)
def test_several_images_per_prompt_and_beam_search_equal_the_stock_model(kind, cache):
    """Sample 0 holds two images (OneVision then gives each the base crop only), sample 1 one image
    with its AnyRes tiles; beams copy each prompt with all of its images and their crops."""
    model = tiny_model(kind)
    batch = batch_of(model, [[40, 70], [90, 50], [64, 96]], [2, 1], onevision_counts=kind == "onevision")
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = model(**batch).logits
        stock_beams = generate(model, batch, 3, num_beams=2, num_return_sequences=2)
        apply_dymu(model, INF, cache=cache)
        ours = model(**batch).logits
        beams = generate(model, batch, 3, num_beams=2, num_return_sequences=2)
    assert torch.equal(ours[valid], stock[valid])
    assert beams.shape[0] == 4 and torch.equal(beams, stock_beams)


def full_support(model, image_crops: int, size: torch.Tensor) -> torch.Tensor:
    """``[L, crops * P]`` bool: which patches each cell's stock feature depends on, found the slow way
    (a one-hot channel per patch through the model's own layout code)."""
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    eye = torch.eye(image_crops * patches, dtype=torch.float64).view(image_crops, patches, -1)
    return pack(model, [eye], size[None], eye.new_zeros(eye.shape[-1]))[0] != 0


@pytest.mark.parametrize("kind", MODELS)
def test_rows_follow_the_native_layout(kind):
    """With merging: every virtual position carries the stock feature of the unmerged crops (its
    group's projected token at each patch, then the stock layout), a cell is its group's row exactly
    when all the patches it reads are in one group, and newline cells are rows of their own."""
    model = tiny_model(kind)
    batch = batch_of(model, [[40, 70], [90, 50]], [1, 1])
    apply_dymu(model, merging_policy(model))
    with torch.no_grad():
        inputs = dymu_inputs(model, batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"])
        per_image = crops_per_image(model, batch["image_sizes"])
        merged, projector = inputs.merged, model.model.multi_modal_projector
        # the unmerged crops: each patch carries its group's projected token (Python loops)
        unmerged = torch.stack(
            [
                torch.stack([projector(merged.tokens[c, merged.group[c, p]]) for p in range(merged.group.shape[1])])
                for c in range(merged.group.shape[0])
            ]
        )
        expected = pack(model, list(unmerged.split(per_image)), batch["image_sizes"], model.model.image_newline)
    at_positions = inputs.layout.to_positions(inputs.rows)
    placeholder = batch["input_ids"] == IMAGE
    torch.testing.assert_close(at_positions[placeholder], torch.cat(expected), rtol=0, atol=1e-12)

    counts = last_prefill(model)
    assert counts["visual_rows"].lt(counts["visual_positions"]).all()  # merging saved rows
    # each cell's row: shared with other cells exactly when its support is one group
    expand = inputs.layout.expand[placeholder]  # [L]: placeholders are image after image, one sample each
    crop_start = 0
    cell_start = 0
    kinds = torch.zeros(3, 3, dtype=torch.long)  # [groups read (0, 1, more), patches read (0, 1, more)]
    for i, (count, size) in enumerate(zip(per_image, batch["image_sizes"], strict=True)):
        support = full_support(model, count, size)  # [L_i, crops * P]
        groups = merged.group[crop_start : crop_start + count]  # [crops, P]
        group_id = (groups + 1000 * torch.arange(count)[:, None]).flatten()  # distinct across crops
        rows = expand[cell_start : cell_start + support.shape[0]].tolist()
        for cell, reads in enumerate(support):
            read_groups = set(group_id[reads].tolist())
            row_cells = [j for j, r in enumerate(rows) if r == rows[cell]]
            kinds[min(len(read_groups), 2), min(int(reads.sum()), 2)] += 1
            if len(read_groups) == 1:  # the group's row: its cells are exactly the cells read from that group
                same = [j for j, other in enumerate(support) if set(group_id[other].tolist()) == read_groups]
                assert row_cells == same, (i, cell)
            else:  # a newline (reads nothing) or a cell straddling groups: a row of its own
                assert row_cells == [cell], (i, cell)
        crop_start += count
        cell_start += support.shape[0]
    assert counts["visual_positions"].tolist() == [len(e) for e in expected]
    assert kinds[0, 0] > 0 and kinds[1, 1] > 0  # newline cells; cells of one patch
    if kind == "onevision":  # downsampled: cells that pool one group's patches, and cells that straddle groups
        assert kinds[1, 2] > 0 and kinds[2, 2] > 0, kinds


@pytest.mark.parametrize("kind", MODELS)
def test_vtu_equals_the_naive_reference_over_the_native_layout(kind):
    model = tiny_model(kind)
    batch = batch_of(model, [[40, 70], [90, 50]], [1, 1])
    apply_dymu(model, merging_policy(model))
    with torch.no_grad():
        inputs = dymu_inputs(
            model,
            batch["input_ids"],
            batch["pixel_values"],
            batch["attention_mask"],
            positions_of(batch),
            image_sizes=batch["image_sizes"],
        )
        language = model.model.language_model
        ours = vtu_forward(language, inputs.rows, inputs.layout)
        reference = naive_reference(language, inputs.rows, inputs.layout)
    used = inputs.layout.counts() > 0
    torch.testing.assert_close(ours[used], reference[used], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", MODELS)
def test_an_image_keeps_its_rows_and_answer_whatever_its_batch_mates(kind):
    model = tiny_model(kind)
    batch = batch_of(model, [[40, 70], [90, 50]], [1, 1])
    apply_dymu(model, merging_policy(model))
    pad = int((batch["attention_mask"][1] == 0).sum())
    alone = {
        "input_ids": batch["input_ids"][1:, pad:],
        "attention_mask": batch["attention_mask"][1:, pad:],
        "pixel_values": batch["pixel_values"][1:],
        "image_sizes": batch["image_sizes"][1:],
    }
    with torch.no_grad():
        together = model(**batch, position_ids=positions_of(batch), logits_to_keep=1).logits[1]
        rows_together = last_prefill(model)["visual_rows"][1]
        single = model(**alone, logits_to_keep=1).logits[0]
        rows_alone = last_prefill(model)["visual_rows"][0]
    assert rows_together == rows_alone
    torch.testing.assert_close(single, together, rtol=0, atol=1e-10)


@pytest.mark.parametrize("images", ["one each", "two and one"])
@pytest.mark.parametrize("kind", MODELS)
def test_both_caches_generate_what_the_naive_reference_decodes(kind, images):
    model = tiny_model(kind)
    if images == "one each":
        batch = batch_of(model, [[40, 70], [90, 50]], [1, 1])
    else:  # OneVision gives the pair of sample 0 their base crops only
        batch = batch_of(model, [[40, 70], [90, 50], [64, 96]], [2, 1], onevision_counts=kind == "onevision")
    out = {}
    for cache in ("compact", "expanded"):
        apply_dymu(model, merging_policy(model), cache=cache)
        with torch.no_grad():
            out[cache] = generate(model, batch, 5, num_beams=1)
            beams = generate(model, batch, 3, num_beams=2, num_return_sequences=2, return_dict_in_generate=True)
            out[cache + " beams"] = beams.sequences
    with torch.no_grad():
        reference = greedy_reference(model, batch, steps=5)
    counts = last_prefill(model)  # of the reference's dymu_inputs
    assert counts["visual_rows"].lt(counts["visual_positions"]).all()
    assert torch.equal(out["compact"][:, batch["input_ids"].shape[1] :], reference)
    assert torch.equal(out["expanded"], out["compact"])
    assert torch.equal(out["expanded beams"], out["compact beams"])


def test_clear_errors():
    next_model, onevision = tiny_model("next"), tiny_model("onevision")
    batch = batch_of(onevision, [[40, 70]], [1])
    video = torch.zeros(1, 2, 3, 32, 32, dtype=torch.float64)
    apply_dymu(onevision, INF)
    apply_dymu(next_model, INF)
    with pytest.raises(ValueError, match=r"LlavaNextForConditionalGeneration takes no video"):
        next_model(input_ids=batch["input_ids"], pixel_values_videos=video)
    with pytest.raises(ValueError, match="needs image_sizes with pixel_values"):
        onevision(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"input_ids hold \d+ image placeholders; 1 images take \d+"):
        onevision(**{**batch, "image_sizes": torch.tensor([[90, 50]])})
    remove_dymu(next_model)
    next_model.config.vision_feature_layer = [-3, -2]  # features of two layers, concatenated
    with pytest.raises(ValueError, match=r"DyMU reads one vision feature layer; this LLaVA concatenates \[-3, -2\]"):
        apply_dymu(next_model, INF)
    with pytest.raises(TypeError, match="apply_dymu takes LlavaForConditionalGeneration, LlavaNext"):
        apply_dymu(onevision.model, INF)


def test_crops_are_merged_one_by_one():
    """Each crop is one image for the tower: a crop's tokens do not depend on the other crops."""
    model = tiny_model("onevision")
    batch = batch_of(model, [[40, 70]], [1])
    apply_dymu(model, merging_policy(model))
    per_image = crops_per_image(model, batch["image_sizes"])
    pixels = crop_pixels(batch["pixel_values"], per_image)
    with torch.no_grad():
        together = dymu_inputs(model, batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"])
        backbone, tower = get_backbone("hf_siglip"), model.model.vision_tower
        policy = model._dymu_llava.policy
        for c in range(pixels.shape[0]):
            alone = backbone.merged_forward(tower, pixels[c : c + 1], policy, num_blocks=3)
            assert torch.equal(alone.group[0], together.merged.group[c])
            length = int(alone.lengths[0])
            torch.testing.assert_close(alone.tokens[0, :length], together.merged.tokens[c, :length], rtol=0, atol=1e-12)


def video_batch(model) -> dict:
    """Sample 0: text, a video, text. Sample 1 (left-padded): text, an image (AnyRes), text, a video.
    Two frames a video; OneVision pools each frame 2 x 2 and closes a video with one newline."""
    image_sizes = torch.tensor([[40, 70]])
    per_image = crops_per_image(model, image_sizes)
    image = [IMAGE] * image_lengths(model, per_image, image_sizes)[0]
    video = [IMAGE - 1] * (2 * 4 + 1)  # 2 frames of 2 x 2 pooled cells, and the newline
    first, second = [1, *video, 2, 3], [4, *image, 5, *video, 6]
    width = max(len(first), len(second))
    input_ids = torch.tensor([[0] * (width - len(s)) + s for s in (first, second)])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in (first, second)])
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": crops(per_image[0], seed=1)[None],
        "image_sizes": image_sizes,
        "pixel_values_videos": crops(4, seed=2).view(2, 2, 3, 32, 32),
    }


@pytest.mark.parametrize("cache", ["compact", "expanded"])
def test_video_with_infinite_thresholds_equals_the_stock_model(cache):
    model = tiny_model("onevision")
    batch = video_batch(model)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = model(**batch, position_ids=positions_of(batch)).logits
        stock_beams = generate(model, batch, 3, num_beams=2, num_return_sequences=2)
        apply_dymu(model, INF, cache=cache)
        ours = model(**batch, position_ids=positions_of(batch)).logits
        counts = last_prefill(model)
        beams = generate(model, batch, 3, num_beams=2, num_return_sequences=2)
    torch.testing.assert_close(ours[valid], stock[valid], rtol=0, atol=1e-12)
    assert torch.equal(beams, stock_beams)
    assert counts["video_positions"].tolist() == [9, 9] and counts["video_rows"].tolist() == [9, 9]


def test_video_frames_are_merged_alone_and_pooled_in_the_native_layout():
    """With merging: every video position carries the stock pooling of the unmerged frames; a pooled
    cell is its group's row exactly when its 2 x 2 window lies in one group; greedy decoding with
    either cache equals the naive reference."""
    model = tiny_model("onevision")
    batch = video_batch(model)
    apply_dymu(model, MergePolicy(mode="fixed_r", r=5), cache="compact")
    with torch.no_grad():
        inputs = dymu_inputs(
            model,
            batch["input_ids"],
            batch["pixel_values"],
            image_sizes=batch["image_sizes"],
            pixel_values_videos=batch["pixel_values_videos"],
        )
        merged, projector = inputs.merged, model.model.multi_modal_projector
        frames = merged.group[-4:]  # the 4 frames come after the image's crops
        unmerged = torch.stack([projector(merged.tokens[-4 + f, frames[f]]) for f in range(4)])  # [4, P, C]
        pooled = model.model.apply_pooling(unmerged).reshape(2, 8, -1)
        newline = model.model.image_newline[None, None].expand(2, 1, -1)
        expected = torch.cat([pooled, newline], dim=1).flatten(0, 1)
        # which frame patches each pooled cell reads, the slow way (a one-hot channel per patch)
        eye = torch.eye(16, dtype=torch.float64)[None]
        reads = model.model.apply_pooling(eye)[0] != 0  # [4, 16]
    video = batch["input_ids"] == IMAGE - 1
    at_positions = inputs.layout.to_positions(inputs.rows)
    torch.testing.assert_close(at_positions[video], expected, rtol=0, atol=1e-12)
    expand = inputs.layout.expand[video].view(2, 9)  # [sample, video cell]: each sample has one video
    straddling = 0
    for sample in range(2):
        rows = expand[sample].tolist()  # this sample's video: 2 frames x 4 cells, then the newline
        for cell in range(8):
            frame = 2 * sample + cell // 4
            read = set(frames[frame][reads[cell % 4]].tolist())
            mates = [j for j in range(9) if rows[j] == rows[cell]]
            if len(read) > 1:
                straddling += 1
                assert mates == [cell]
            else:
                same = [
                    j
                    for j in range(8)
                    if 2 * sample + j // 4 == frame and set(frames[frame][reads[j % 4]].tolist()) == read
                ]
                assert mates == same
        assert [j for j in range(9) if rows[j] == rows[8]] == [8]  # the newline
    assert straddling > 0
    with torch.no_grad():
        reference = greedy_reference(model, batch, steps=4)
        for cache in ("compact", "expanded"):
            apply_dymu(model, MergePolicy(mode="fixed_r", r=5), cache=cache)
            out = generate(model, batch, 4)
            assert torch.equal(out[:, batch["input_ids"].shape[1] :], reference), cache
    # pooled cells straddling groups save nothing: here one video keeps all 9 rows, the other fewer
    assert last_prefill(model)["video_rows"].lt(9).any()


@pytest.mark.slow
def test_onevision_geometry_at_full_size_equals_the_stock_model():
    """OneVision's real layout: 384 px crops of 27 x 27 patches, its 36 default grid shapes,
    ``anyres_max_9`` and 27 -> 14 video pooling (narrow layers, so that it runs on a CPU). With
    infinite thresholds: the stock logits bit for bit for a 4:3 photo (no downsampling), a 16:9 one
    (2 x 3 tiles, downsampled: cells read 2 x 2 patches) and a two-frame video."""
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=384, patch_size=14
    )
    text = Qwen2Config(**{**TINY, "num_hidden_layers": 1, "max_position_embeddings": 16384})
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE, video_token_index=IMAGE - 1
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).double().eval()
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for size, cells in (([480, 640], 2929), ([1080, 1920], 7269)):
        sizes = torch.tensor([size])
        per_image = crops_per_image(model, sizes)
        assert image_lengths(model, per_image, sizes) == [cells]
        pixels = torch.randn(1, per_image[0], 3, 384, 384, generator=generator, dtype=torch.float64)
        inputs.append(
            {"input_ids": torch.tensor([[1, *[IMAGE] * cells, 2]]), "pixel_values": pixels, "image_sizes": sizes}
        )
    video = torch.randn(1, 2, 3, 384, 384, generator=generator, dtype=torch.float64)
    inputs.append({"input_ids": torch.tensor([[1, *[IMAGE - 1] * (2 * 14 * 14 + 1), 2]]), "pixel_values_videos": video})
    with torch.no_grad():
        stock = [model(**batch, logits_to_keep=1).logits for batch in inputs]
        apply_dymu(model, MergePolicy(thresholds=[math.inf] * 2))
        for batch, expected in zip(inputs, stock, strict=True):
            assert torch.equal(model(**batch, logits_to_keep=1).logits, expected)


@pytest.mark.parametrize("kind", MODELS)
def test_thresholds_calibrated_on_the_processors_crops_merge_their_target_on_them(kind):
    """Calibrated on the crops the model's own processor makes (base crops and tiles, not whole
    images), the thresholds merge exactly r tokens per crop and layer on average when DyMU then runs
    on the processor's output for the same images (batch top-k at calibration = thresholds after)."""
    model = tiny_model(kind)
    processor_class = LlavaNextImageProcessor if kind == "next" else LlavaOnevisionImageProcessor
    size = {"shortest_edge": 32} if kind == "next" else {"height": 32, "width": 32}
    processor = processor_class(size=size, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy())
        for h, w in ((40, 70), (90, 50), (64, 64))
    ]
    crops_seen = processor_crops(model, processor, images)
    assert crops_seen.shape == (7 + 7 + 5, 3, 32, 32)  # base crop + 2 x 3, 3 x 2 and 2 x 2 tiles
    backbone = get_backbone("hf_clip" if kind == "next" else "hf_siglip")
    found = batch_thresholds(backbone, model.model.vision_tower, crops_seen.double(), r=2)
    apply_dymu(model, MergePolicy(thresholds=found))
    out = processor(images=images, return_tensors="pt")
    per_image = crops_per_image(model, out["image_sizes"])
    with torch.no_grad():
        merged = dymu_inputs(
            model,
            torch.tensor([[IMAGE] * sum(image_lengths(model, per_image, out["image_sizes"]))]),
            out["pixel_values"].double(),
            image_sizes=out["image_sizes"],
        ).merged
    blocks = 2 if kind == "next" else 3  # the blocks before the features LLaVA reads
    full = 16 + (1 if kind == "next" else 0)  # patches, and CLIP's CLS
    assert int(merged.lengths.sum()) == crops_seen.shape[0] * (full - 2 * blocks)


@pytest.mark.parametrize("kind", MODELS)
def test_the_probe_finds_the_supports_the_slow_way_finds_for_many_sizes(kind):
    """cell_support (a row and a column channel per grid line) against a one-hot channel per patch,
    for every grid shape and a spread of aspect ratios, unpadded and downsampled alike."""
    model = tiny_model(kind)
    side = 16  # patches per crop
    checked = 0
    for height in (17, 32, 41, 64, 77, 96, 150):
        for width in (13, 32, 50, 64, 90, 96, 200):
            size = torch.tensor([height, width])
            count = crops_per_image(model, size[None])[0]
            support = cell_support(model, count, size)
            reads = full_support(model, count, size)
            assert support.shape[0] == reads.shape[0], (height, width)
            for cell, row in enumerate(support.tolist()):
                assert sorted(p for p in row if p >= 0) == reads[cell].nonzero().flatten().tolist(), (height, width)
            checked += reads.shape[0]
    assert checked > 49 * side


@pytest.mark.parametrize("kind", MODELS)
def test_next_token_logits_with_and_without_vtu(kind):
    model = tiny_model(kind)
    batch = batch_of(model, [[40, 70], [90, 50]], [1, 1])
    args = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    with torch.no_grad():
        # the forward (VTU) takes positions 0..N-1, as the stock forward does without position_ids; the
        # ablation counts the valid rows
        stock = {True: model(**batch).logits[:, -1], False: model(**batch, position_ids=positions_of(batch)).logits}
        stock[False] = stock[False][:, -1]
        apply_dymu(model, INF)
        # with nothing merged, rows are positions: both ways are the stock model
        for vtu in (True, False):
            ours = next_token_logits(model, *args, vtu=vtu, image_sizes=batch["image_sizes"])
            torch.testing.assert_close(ours, stock[vtu], rtol=0, atol=1e-10)
        apply_dymu(model, merging_policy(model))
        with_vtu = next_token_logits(model, *args, image_sizes=batch["image_sizes"])
        without = next_token_logits(model, *args, vtu=False, image_sizes=batch["image_sizes"])
    assert (with_vtu - without).abs().max() > 1e-3
