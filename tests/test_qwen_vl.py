"""The Qwen2-VL / Qwen2.5-VL vision towers (backbones/hf_qwen_vl.py): what the registry-wide tests
cannot see. Native-resolution packing of images of different sizes, the processor's patch layout,
windows (2.5), the patch merger's fold, the exact rotary path against a naive per-image reference
built on the host's own attention modules, the mean-position approximation's measured gap, and
calibration over images of different cell counts, and videos (merged slice by slice). Tiny random
towers, float64 where exactness matters.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import LayerMerges, MergePolicy

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["hf_qwen2_vl", "hf_qwen2_5_vl", "hf_qwen3_vl"]
# (height, width) in px; multiples of 8 (patch 4 x merge 2). 2.5's windows are 32 px: partial ones too.
SIZES = [(24, 40), (64, 64), (56, 32), (40, 72)]


@cache
def _tower(name: str, dtype: torch.dtype = torch.float64):
    backbone = get_backbone(name)
    torch.manual_seed(0)
    return backbone, backbone.build(backbone.tiny_configs()[0].config).to(dtype).eval()


def _images(sizes, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    """Alternately smooth (upsampled 2x2) and noisy images of the given sizes."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index, (height, width) in enumerate(sizes):
        if index % 2 == 0:
            coarse = torch.randn(1, 3, 2, 2, generator=generator, dtype=torch.float64)
            out.append(F.interpolate(coarse, size=(height, width), mode="bilinear")[0])
        else:
            out.append(torch.randn(3, height, width, generator=generator, dtype=torch.float64))
    return [image.to(dtype) for image in out]


def _thresholds(name: str) -> list[float]:
    backbone, model = _tower(name)
    pool = torch.stack(_images([(64, 64)] * 4))
    return [t + 1e-6 for t in batch_thresholds(backbone, model, pool, r=8)]


def _image(merged, b: int):
    n = int(merged.lengths[b])
    cells = int((merged.group[b] >= 0).sum())
    return merged.tokens[b, :n], merged.sizes[b, :n], merged.group[b, :cells], merged.tokens_per_layer[b]


# ----- the processor's layout ------------------------------------------------------------------------------
def test_patchify_matches_the_hf_processor_layout():
    backbone, model = _tower("hf_qwen2_vl", torch.float32)
    processor = Qwen2VLImageProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, do_resize=False, do_rescale=False, do_normalize=False
    )
    images = _images([(24, 40), (16, 8)], torch.float32)
    ours, grid = backbone.patchify(model, images)
    theirs = processor(images=[i.numpy() for i in images], return_tensors="pt", input_data_format="channels_first")
    assert torch.equal(grid, theirs["image_grid_thw"])
    assert torch.equal(ours, theirs["pixel_values"])


def test_patchify_videos_matches_the_hf_video_processor_layout():
    backbone, model = _tower("hf_qwen2_vl", torch.float32)
    processor = Qwen2VLVideoProcessor(
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        do_resize=False,
        do_rescale=False,
        do_normalize=False,
        do_sample_frames=False,
    )
    videos = [torch.randn(4, 3, 16, 24, generator=torch.Generator().manual_seed(0)), _video((24, 8), 6, torch.float32)]
    ours, grid = backbone.patchify_videos(model, videos)
    theirs = processor(videos=videos, return_tensors="pt", input_data_format="channels_first")
    assert grid.tolist() == theirs["video_grid_thw"].tolist() == [[2, 4, 6], [3, 6, 2]]
    assert torch.equal(ours, theirs["pixel_values_videos"])


def test_native_size_is_the_hf_processors_resize_rule():
    """Every size of a sweep (odd sides, extreme aspect ratios, images above and below the pixel
    budget) resizes as transformers' own rule does, with the defaults and with a tight budget; the
    images preprocess_native makes cut into the processor's grids."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    backbone, model = _tower("hf_qwen2_vl")
    sides = [1, 13, 27, 28, 41, 55, 100, 333, 640, 1000, 1999, 4000]
    budgets = [{}, {"min_pixels": 28 * 28 * 16, "max_pixels": 28 * 28 * 64}]
    unit = backbone.cell_pixels(model)
    for budget in budgets:
        for height in sides:
            for width in sides:
                if max(height, width) > 200 * min(height, width):
                    with pytest.raises(ValueError, match=r"over 200 times as long as wide"):
                        backbone.native_size(model, height, width, **budget)
                    continue
                expected = smart_resize(height, width, factor=unit, **budget)
                assert backbone.native_size(model, height, width, **budget) == expected, (height, width, budget)
    photos = [Image.new("RGB", (640, 480), (10, 200, 30)), Image.new("RGB", (100, 333), (90, 20, 250))]
    budget = {"min_pixels": 256, "max_pixels": 8192}  # 4 to 128 cells of 8 px
    processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, **budget)
    expected = processor(images=photos, return_tensors="pt")["image_grid_thw"]
    _, grid = backbone.patchify(model, backbone.preprocess_native(model, photos, **budget))
    assert grid.tolist() == expected.tolist() == [[1, 18, 26], [1, 40, 12]]  # 72 x 104 and 160 x 48 px


def _video(size, frames: int, dtype=torch.float64, seed: int = 5) -> torch.Tensor:
    """``[frames, 3, H, W]``: a smooth scene drifting from frame to frame (so slices differ)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 2, 2, generator=generator, dtype=torch.float64)
    drift = torch.randn(1, 3, 2, 2, generator=generator, dtype=torch.float64)
    steps = torch.arange(frames, dtype=torch.float64)[:, None, None, None] * 0.3
    return F.interpolate(coarse + steps * drift, size=size, mode="bilinear").to(dtype)


# ----- merging off equals the stock tower -------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("rotary", ["exact", "mean"])
def test_infinite_thresholds_equal_stock_for_packed_images_of_different_sizes(name, rotary):
    backbone, model = _tower(name)
    images = _images(SIZES)
    policy = MergePolicy(thresholds=[math.inf] * backbone.num_layers(model))
    with torch.no_grad():
        stock = backbone.stock_features_images(model, images)
        merged = backbone.merged_forward_images(model, images, policy, rotary=rotary)
    for b, expected in enumerate(stock):
        tokens, sizes, group, counts = _image(merged, b)
        assert tokens.shape == expected.shape
        torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)
        assert (sizes == 1).all() and torch.equal(group, torch.arange(expected.shape[0]))
        assert (counts == expected.shape[0]).all()
        assert (merged.group[b, expected.shape[0] :] == -1).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_infinite_thresholds_equal_stock_for_videos_packed_with_images(name):
    """A video (3 slices) between two images: one output row per slice, each the stock tower's."""
    backbone, model = _tower(name)
    image_patches, image_grid = backbone.patchify(model, _images([(24, 40), (40, 72)]))
    video_patches, video_grid = backbone.patchify_videos(model, [_video((40, 32), 6)])
    patches = torch.cat([image_patches[:60], video_patches, image_patches[60:]])
    grid = torch.cat([image_grid[:1], video_grid, image_grid[1:]])
    policy = MergePolicy(thresholds=[math.inf] * backbone.num_layers(model))
    with torch.no_grad():
        stock = backbone.stock_features_patches(model, patches, grid)
        merged = backbone.merged_forward_patches(model, patches, grid, policy)
    assert [s.shape[0] for s in stock] == merged.lengths.tolist() == [15, 20, 20, 20, 45]
    for b, expected in enumerate(stock):
        tokens, sizes, group, _ = _image(merged, b)
        torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-10)
        assert (sizes == 1).all() and torch.equal(group, torch.arange(expected.shape[0]))
    # Qwen3-VL's DeepStack features: the host's own, cell for cell (none for the others)
    stock_taps = backbone.stock_taps_patches(model, patches, grid) if name == "hf_qwen3_vl" else []
    assert len(merged.taps) == len(stock_taps) == (2 if name == "hf_qwen3_vl" else 0)
    for ours, theirs in zip(merged.taps, stock_taps, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_video_merges_slice_by_slice_whatever_its_batch_mates(name):
    """A video's slices merge on their own: a 3-slice video packed after an image gives, slice by
    slice, what each 2-frame piece of it gives alone as a one-slice video (groups, sizes, tokens)."""
    backbone, model = _tower(name)
    video = _video((40, 32), 6)
    policy = MergePolicy(thresholds=_thresholds(name))
    with torch.no_grad():
        image_patches, image_grid = backbone.patchify(model, _images([(24, 40)]))
        video_patches, video_grid = backbone.patchify_videos(model, [video])
        packed = backbone.merged_forward_patches(
            model, torch.cat([image_patches, video_patches]), torch.cat([image_grid, video_grid]), policy
        )
        assert (packed.tokens_per_layer[1:, -1] < 20).all(), "every slice must merge something"
        for piece in range(3):
            alone = backbone.merged_forward_patches(
                model, *backbone.patchify_videos(model, [video[2 * piece : 2 * piece + 2]]), policy
            )
            for ours, theirs in zip(_image(packed, 1 + piece), _image(alone, 0), strict=True):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


# ----- an image's result does not depend on its batch-mates -------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("rotary", ["exact", "mean"])
def test_native_images_merge_the_same_alone_and_packed(name, rotary):
    backbone, model = _tower(name)
    images = _images(SIZES)
    policy = MergePolicy(thresholds=_thresholds(name))
    with torch.no_grad():
        batch = backbone.merged_forward_images(model, images, policy, rotary=rotary)
        assert len(set(batch.lengths.tolist())) == len(SIZES)
        assert (batch.tokens_per_layer[:, -1] < batch.tokens_per_layer[:, 0]).any(), "something must merge"
        reordered = backbone.merged_forward_images(model, images[::-1], policy, rotary=rotary)
        for b in range(len(images)):
            alone = backbone.merged_forward_images(model, images[b : b + 1], policy, rotary=rotary)
            for other, index in ((alone, 0), (reordered, len(images) - 1 - b)):
                tokens, sizes, group, counts = _image(batch, b)
                tokens2, sizes2, group2, counts2 = _image(other, index)
                assert torch.equal(group, group2) and torch.equal(sizes, sizes2) and torch.equal(counts, counts2)
                torch.testing.assert_close(tokens, tokens2, rtol=0, atol=1e-10)


# ----- the patch merger's fold and the group map in the LM grid -----------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_group_map_is_in_the_lm_cell_grid_and_the_fold_is_the_merger(name):
    backbone, model = _tower(name)
    images = _images(SIZES)
    policy = MergePolicy(thresholds=_thresholds(name))
    layers = backbone.num_layers(model)
    with torch.no_grad():
        merged = backbone.merged_forward_images(model, images, policy)
        before = backbone.merged_forward_images(model, images, policy, num_blocks=layers)
    width = backbone.width(model)
    assert before.tokens.shape[-1] == 4 * width  # a token before the fold is one cell's 4 patches
    torch.testing.assert_close(merged.packed, model.merger(before.packed.reshape(-1, width)), rtol=0, atol=1e-12)
    for b, (height, width_px) in enumerate(SIZES):
        cells = (height // 8) * (width_px // 8)  # LM tokens the stock model would give this image
        tokens, sizes, group, _ = _image(merged, b)
        assert group.shape[0] == cells and int(sizes.sum()) == cells
        assert torch.equal(sizes, torch.bincount(group, minlength=tokens.shape[0]).to(sizes.dtype))
        assert (merged.group[b, cells:] == -1).all()


# ----- windows (2.5) --------------------------------------------------------------------------------------------
def _host_windows(model, grid_thw: torch.Tensor) -> torch.Tensor:
    """Each cell's window id as the host's own window index lays them out (cells of one window are
    consecutive in its permuted order, and ``cu_window_seqlens`` cuts them)."""
    config = model.config
    index, cu = get_vision_window_index(grid_thw, config.spatial_merge_size, config.window_size, config.patch_size)
    cell_bounds = cu.long() // config.spatial_merge_size**2
    window_of_slot = torch.bucketize(torch.arange(index.numel()), cell_bounds[1:], right=True)
    return torch.empty_like(index).scatter_(0, index, window_of_slot)


def test_window_ids_partition_cells_as_the_host_does():
    backbone, model = _tower("hf_qwen2_5_vl")
    _, grid = backbone.patchify(model, _images(SIZES))
    ours, host = backbone.windows(model, grid), _host_windows(model, grid)
    cells = (grid[:, 1] * grid[:, 2] // 4).tolist()
    for ours_b, host_b in zip(ours.split(cells), host.split(cells), strict=True):
        same_ours = ours_b[:, None] == ours_b[None, :]
        assert torch.equal(same_ours, host_b[:, None] == host_b[None, :])


def test_groups_never_cross_windows():
    backbone, model = _tower("hf_qwen2_5_vl")
    images = _images(SIZES)
    _, grid = backbone.patchify(model, images)
    windows = backbone.windows(model, grid).split((grid[:, 1] * grid[:, 2] // 4).tolist())
    # Merge as much as the policy allows: r = 10 per layer on every image.
    with torch.no_grad():
        merged = backbone.merged_forward_images(model, images, MergePolicy(mode="fixed_r", r=10))
    crossed = 0
    for b in range(len(images)):
        _, sizes, group, _ = _image(merged, b)
        assert (sizes > 1).sum() > 0
        for token in range(sizes.shape[0]):
            crossed += int(windows[b][group == token].unique().numel() > 1)
    assert crossed == 0


# ----- the exact rotary path equals a naive reference on the host's own modules ------------------------------
def naive_exact(backbone, model, image: torch.Tensor, r: int):
    """Fixed r per layer for one image with Python loops: per block, every original token carries its
    group's features, the host's own attention module runs on them (per window on windowed blocks)
    with the host's rotary at the original positions, each group takes its members' mean output;
    matching over whole cells (unrotated keys, mean over heads, 4 sub-tokens side by side),
    same-window pairs only; size-weighted means; survivors in raster order. Qwen3-VL's DeepStack: after
    each tap block, every cell's tap feature is the tap merger on the row that holds it; the returned
    features are their means over the final groups."""
    patches, grid = backbone.patchify(model, [image])
    x = _first_block_input(model, patches, grid) if hasattr(model, "pos_embed") else model.patch_embed(patches)
    cells, width = x.shape[0] // 4, x.shape[1]
    cos, sin = model.rotary_pos_emb(x, get_vision_position_ids(grid, 2))
    windows = backbone.windows(model, grid)
    windows = torch.zeros(cells, dtype=torch.long) if windows is None else windows
    windowed = backbone.windowed_layers(model)
    rows = x.view(cells, 4 * width)
    members = [[c] for c in range(cells)]
    cell_features = []  # per DeepStack tap: [cells, C_out]
    for index, block in enumerate(model.blocks):
        expanded = torch.empty(cells, 4 * width, dtype=x.dtype)
        for row, group in enumerate(members):
            expanded[group] = rows[row]
        expanded = expanded.view(-1, width)
        # the similarity metric: this block's (unrotated) keys of the rows it attends from
        qkv = block.attn.qkv(block.norm1(rows.view(-1, width)))
        k = qkv.view(rows.shape[0] * 4, 3, block.attn.num_heads, -1)[:, 1]
        out = torch.empty_like(expanded)
        segments = windows.unique() if index in windowed else [None]
        for segment in segments:
            cell_ids = torch.arange(cells) if segment is None else torch.nonzero(windows == segment)[:, 0]
            tokens = (cell_ids[:, None] * 4 + torch.arange(4)).flatten()
            cu = torch.tensor([0, tokens.numel()], dtype=torch.int32)
            out[tokens] = block.attn(
                block.norm1(expanded[tokens]), cu_seqlens=cu, position_embeddings=(cos[tokens], sin[tokens])
            )
        out = out.view(cells, 4 * width)
        rows = rows + torch.stack([out[group].mean(0) for group in members])
        keys = F.normalize(k.mean(dim=1).reshape(len(members), -1), dim=-1)
        window_of = [int(windows[group[0]]) for group in members]
        edges = []
        for a in range(0, len(members), 2):
            candidates = [
                (float(keys[a] @ keys[b]), b) for b in range(1, len(members), 2) if window_of[b] == window_of[a]
            ]
            if candidates:
                best = max(score for score, _ in candidates)
                edges.append((best, a, next(b for score, b in candidates if score == best)))
        edges.sort(key=lambda edge: (-edge[0], edge[1]))
        into = {a: b for _, a, b in edges[:r]}
        new_rows, new_members = [], []
        for t in range(len(members)):
            if t in into:
                continue
            group = [t] + [a for a, b in into.items() if b == t]
            weight = torch.tensor([float(len(members[g])) for g in group], dtype=x.dtype)
            new_rows.append((rows[group] * weight[:, None]).sum(0) / weight.sum())
            new_members.append(sum((members[g] for g in group), []))
        rows, members = torch.stack(new_rows), new_members
        rows = rows + block.mlp(block.norm2(rows.view(-1, width))).view(rows.shape)
        if index in getattr(model.config, "deepstack_visual_indexes", ()):
            merger = model.deepstack_merger_list[list(model.config.deepstack_visual_indexes).index(index)]
            features = merger(rows.view(-1, width))
            cell_features.append(torch.stack([features[[c in m for m in members].index(True)] for c in range(cells)]))
    group_map = torch.empty(cells, dtype=torch.long)
    for position, originals in enumerate(members):
        group_map[originals] = position
    sizes = torch.tensor([float(len(m)) for m in members])
    taps = [torch.stack([features[m].mean(0) for m in members]) for features in cell_features]
    return model.merger(rows.view(-1, width)), sizes, group_map, taps


def _first_block_input(model, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: what Qwen3-VL's own forward feeds its first block, position embeddings included.
    (Qwen2.5-VL's forward feeds it in window order: not for that one.)"""
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        model(hidden_states=patches, grid_thw=grid)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_rotary_equals_naive_reference(name):
    backbone, model = _tower(name)
    images = _images([(40, 48), (32, 32)])
    r = 5
    with torch.no_grad():
        merged = backbone.merged_forward_images(model, images, MergePolicy(mode="fixed_r", r=r))
        for b, image in enumerate(images):
            tokens, sizes, group, _ = _image(merged, b)
            ref_tokens, ref_sizes, ref_group, ref_taps = naive_exact(backbone, model, image, r)
            assert torch.equal(group, ref_group)
            assert torch.equal(sizes, ref_sizes)
            torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-9)
            taps = [merged.layout.pad(tap)[b, : tokens.shape[0]] for tap in merged.taps]
            assert len(taps) == len(ref_taps) == (2 if name == "hf_qwen3_vl" else 0)
            for tap, ref_tap in zip(taps, ref_taps, strict=True):
                torch.testing.assert_close(tap, ref_tap, rtol=0, atol=1e-9)


# ----- the mean-position approximation, measured against the exact path ----------------------------------------
def rotary_gap(name: str, images, policy: MergePolicy) -> tuple[float, float]:
    """(relative gap of ``"mean"`` to ``"exact"`` outputs, fraction of cells merged away): the merges
    are those of the exact path, so both modes see the same groups only at the first merging layer;
    the gap compounds over layers."""
    backbone, model = _tower(name)
    with torch.no_grad():
        exact = backbone.merged_forward_images(model, images, policy, rotary="exact")
        mean = backbone.merged_forward_images(model, images, policy, rotary="mean")
    assert torch.equal(exact.group, mean.group), "compare on equal groups"
    gap = ((mean.packed - exact.packed).norm() / exact.packed.norm()).item()
    merged = 1 - exact.lengths.sum().item() / exact.tokens_per_layer[:, 0].sum().item()
    return gap, merged


@pytest.mark.parametrize("name", FAMILIES)
def test_mean_position_rotary_has_a_small_measured_gap(name):
    """Merges after the last block's attention: no attention sees a merged token, the modes agree.
    Merges in the first block: every later attention does, and the gap is measurable but small."""
    backbone, model = _tower(name)
    layers = backbone.num_layers(model)
    images = _images(SIZES)
    late = MergePolicy(mode="fixed_r", r=[0] * (layers - 1) + [6])
    gap, merged = rotary_gap(name, images, late)
    assert merged > 0 and gap < 1e-12  # merges after the last attention: rotary plays no part
    early = MergePolicy(mode="fixed_r", r=[6] + [0] * (layers - 1))
    gap, merged = rotary_gap(name, images, early)
    assert merged > 0.05 and 1e-6 < gap < 0.5


# ----- calibration over images of different cell counts -----------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_calibration_ranks_all_edges_of_all_images_whatever_the_batch_order(name):
    """batch_topk pools every image's edges at a layer (each image contributes its own number of
    edges), merges the best B * r and cuts at the next: the same cut for any order of the images,
    and exactly B * r merges per layer."""
    backbone, model = _tower(name)
    images = _images(SIZES)
    r = 3
    found: dict[tuple[int, int], tuple[float, int]] = {}

    def recorder(order: int):
        def record(merges: LayerMerges) -> None:
            found[order, merges.layer] = (float(merges.cut), int(merges.merge.sum()))

        return record

    with torch.no_grad():
        for order, batch in enumerate((images, images[::-1], images[1:] + images[:1])):
            policy = MergePolicy(mode="batch_topk", r=r, on_layer=recorder(order))
            backbone.merged_forward_images(model, batch, policy)
    for layer in range(backbone.num_layers(model)):
        cuts = {found[order, layer][0] for order in range(3)}
        assert len(cuts) == 1
        assert found[0, layer][1] == len(images) * r


# ----- what is not supported says so -----------------------------------------------------------------------------
def test_unsupported_parts_are_clear_errors():
    backbone, model = _tower("hf_qwen2_vl")
    patches, grid = backbone.patchify(model, _images([(16, 16)]))
    with pytest.raises(ValueError, match=r"backbone 'hf_qwen2_vl': 16 patches, but grid_thw describes 32"):
        backbone.unit_batch(model, patches, torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match=r"frames a multiple of temporal_patch_size 2, got \[3, 3, 16, 16\]"):
        backbone.patchify_videos(model, [torch.zeros(3, 3, 16, 16)])
    with pytest.raises(NotImplementedError, match=r"rotate q and k by 2D positions"):
        backbone.blocks(model)
    with pytest.raises(ValueError, match=r"has only the dynamic engine path"):
        backbone.merged_forward(model, torch.stack(_images([(16, 16)])), MergePolicy.off(), path="static")
    for option in ("compile_merge", "compile_blocks"):
        with pytest.raises(ValueError, match=rf"backbone 'hf_qwen2_vl' has no compiled engine yet; use {option}=False"):
            backbone.merged_forward(model, torch.stack(_images([(16, 16)])), MergePolicy.off(), **{option: True})
    with pytest.raises(ValueError, match=r"image sides must be multiples of 8 px"):
        backbone.patchify(model, _images([(20, 16)]))
    with pytest.raises(ValueError, match=r"unknown rotary mode 'center'"):
        backbone.merged_forward_images(model, _images([(16, 16)]), MergePolicy.off(), rotary="center")


def test_rotary_is_the_hosts_own():
    """The adapter's rotation is the host's function at the host's positions (fractional ones too)."""
    backbone, model = _tower("hf_qwen2_vl")
    rotary = backbone.rotary(model)
    assert rotary.rotate is apply_rotary_pos_emb_vision
    cos, sin = rotary.angles(torch.tensor([[0.5, 1.5], [1.0, 2.0]]))
    cos_int, _ = rotary.angles(torch.tensor([[1, 2]]))
    assert torch.equal(cos[1], cos_int[0]) and not torch.equal(cos[0], cos[1])


def test_apply_dymu_takes_a_whole_qwen2_vl_and_remove_dymu_restores_it():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from dymu_lightning.backbones.hf_llava import apply_dymu, is_dymu, remove_dymu

    text = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
    }
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "patch_size": 4}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, eos_token_id=0, pad_token_id=0)
    model = Qwen2VLForConditionalGeneration(config)
    assert get_backbone("hf_qwen2_vl").handles(model.model.visual)  # the tower alone is supported
    stock_forward = model.forward
    assert apply_dymu(model, MergePolicy.off()) is model and is_dymu(model)
    assert set(vars(model)) >= {"forward", "_expand_inputs_for_generation", "_dymu_llava"}
    remove_dymu(model)
    assert not {"forward", "_expand_inputs_for_generation", "_dymu_llava"} & set(vars(model))
    assert model.forward == stock_forward  # the class's own method again


@pytest.mark.parametrize("name", FAMILIES)
def test_a_saved_tower_loads_and_gives_the_same_features(name, tmp_path):
    backbone, model = _tower(name, torch.float32)
    model.save_pretrained(tmp_path / "tower")
    loaded = backbone.load(tmp_path / "tower")
    images = _images([(24, 40), (16, 16)], torch.float32)
    with torch.no_grad():
        for ours, theirs in zip(
            backbone.stock_features_images(model, images), backbone.stock_features_images(loaded, images), strict=True
        ):
            assert torch.equal(ours, theirs)
    assert backbone.image_size(loaded) == 448  # no img_size saved: Qwen's usual 448 px square


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("split", [[[0, 2], [1, 3]], [[3], [2, 0, 1]], [[1], [0], [3, 2]]])
def test_native_calibration_does_not_depend_on_the_split_over_processes(name, split):
    """Images of different cell counts dealt to 2 or 3 emulated ranks (threads with a blocking
    all-gather) rank their edges globally: thresholds and every image's counts equal one process."""
    from test_properties_calibration import ThreadGroup

    from dymu_lightning.core.calibration import GlobalBatchCut

    backbone, model = _tower(name)
    images = _images(SIZES)
    r = [3] * backbone.num_layers(model)

    def calibrate(batch, cut=None):
        found = {}
        record = lambda merges: found.__setitem__(merges.layer, float(merges.batch_threshold))  # noqa: E731
        policy = MergePolicy(mode="batch_topk", r=r, batch_cut=cut, on_layer=record)
        with torch.no_grad():
            return found, backbone.merged_forward_images(model, batch, policy).tokens_per_layer

    whole_thresholds, whole_counts = calibrate(images)

    def rank_work(rank: int, gather):
        local = [images[i] for i in split[rank]]
        return calibrate(local, GlobalBatchCut(r, torch.ones(len(local), dtype=torch.bool), len(images), gather))

    results = ThreadGroup(len(split)).run(rank_work)
    for rank, (thresholds, counts) in enumerate(results):
        assert thresholds == pytest.approx(whole_thresholds, abs=1e-12)
        assert torch.equal(counts, whole_counts[split[rank]])


def test_the_calibrate_task_runs_on_a_qwen_tower(tmp_path, shards):
    """`dymu recipe=...` with model.backbone=hf_qwen2_vl: square images at model.image_size, tokens
    counted in cells (64 at 64 px), one threshold per block."""
    import yaml
    from tests_support import run

    arch = dict(get_backbone("hf_qwen2_vl").tiny_configs()[0].config)
    arch.pop("img_size")  # ours, not the host config's: a recipe sets model.image_size
    recipe = {
        "task": "calibrate",
        "out_dir": str(tmp_path / "out"),
        "model": {"backbone": "hf_qwen2_vl", "random_init": True, "arch": arch, "image_size": 64},
        "data": {"shards": str(shards), "global_batch_size": 4},
        "schedule": {"r": 3},
        "trainer": {"accelerator": "cpu", "progress_bar": False},
    }
    path = tmp_path / "qwen.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run(path)
    assert result.backbone == "hf_qwen2_vl" and len(result.thresholds) == 3
    assert result.tokens["full"] == 64 and result.tokens["images"] == 10 and result.tokens["mean"] < 64
