"""DyMU through a whole tiny Qwen2-VL, prefill only (backbones/hf_qwen_vl_lm.py): the merged tower's
tokens in the M-RoPE language model with VTU. Float64, a batch of two prompts (one left-padded) with
three images of different sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError
from tests_support import naive_reference
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from dymu_lightning.backbones import get_backbone, hf_qwen_vl
from dymu_lightning.backbones.hf_qwen_vl_lm import next_positions, qwen_vl_decode, qwen_vl_prefill
from dymu_lightning.core import MergePolicy

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGE = 60
VIDEO = 61
HIDDEN = 32


FAMILIES = {
    "qwen2_vl": ("hf_qwen2_vl", Qwen2VLConfig, Qwen2VLForConditionalGeneration, "hidden_size"),
    "qwen2_5_vl": ("hf_qwen2_5_vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "out_hidden_size"),
    # interleaved M-RoPE, q/k norms in the language model; DeepStack after tower blocks 0 and 1
    "qwen3_vl": ("hf_qwen3_vl", Qwen3VLConfig, Qwen3VLForConditionalGeneration, "out_hidden_size"),
}


def build(family: str = "qwen2_vl") -> Qwen2VLForConditionalGeneration:
    """A tiny random Qwen2-VL (2.5-VL, 3-VL): the adapter's tiny tower and a 2-layer M-RoPE language model."""
    name, config_class, model_class, output_width = FAMILIES[family]
    tower = dict(get_backbone(name).tiny_configs()[0].config)
    tower.pop("img_size")
    text = {
        "vocab_size": 64,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HIDDEN // 4,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
    }
    config = config_class(
        text_config=text,
        vision_config={**tower, output_width: HIDDEN},
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return model_class(config).double().eval()


def prompts():
    """Sample 0: 2 text, image A (24 x 40 px: 15 cells), 2 text, image B (16 x 16: 4 cells), 1 text;
    sample 1, left-padded: 1 text, image C (32 x 24: 12 cells), 2 text. Images in placeholder order."""
    generator = torch.Generator().manual_seed(1)

    def smooth(size):
        coarse = torch.randn(1, 3, 2, 2, generator=generator, dtype=torch.float64)
        return torch.nn.functional.interpolate(coarse, size, mode="bilinear")[0]

    images = [smooth((24, 40)), torch.randn(3, 16, 16, generator=generator, dtype=torch.float64), smooth((32, 24))]
    first = [1, 2, *[IMAGE] * 15, 3, 4, *[IMAGE] * 4, 5]
    second = [6, *[IMAGE] * 12, 7, 8]
    pad = len(first) - len(second)
    input_ids = torch.tensor([first, [0] * pad + second])
    attention_mask = torch.tensor([[1] * len(first), [0] * pad + [1] * len(second)])
    return input_ids, attention_mask, images


def stock_logits(model, input_ids, attention_mask, images):
    backbone = get_backbone("hf_qwen2_vl")
    patches, grid = backbone.patchify(model.model.visual, images)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=patches,
        image_grid_thw=grid,
        mm_token_type_ids=(input_ids == IMAGE).int(),
    ).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rotary", ["exact", "mean"])
def test_infinite_thresholds_equal_the_stock_model(family, rotary):
    model = build(family)
    input_ids, attention_mask, images = prompts()
    policy = MergePolicy(thresholds=[math.inf] * len(model.model.visual.blocks))
    with torch.no_grad():
        stock = stock_logits(model, input_ids, attention_mask, images)
        ours = qwen_vl_prefill(model, input_ids, images, policy, attention_mask, rotary=rotary)
    valid = attention_mask.bool()
    torch.testing.assert_close(ours.position_logits()[valid], stock[valid], rtol=0, atol=1e-8)
    assert ours.layout.positions.shape == (3, 2, input_ids.shape[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_rows_are_the_merged_tokens_and_attend_as_the_naive_reference(family):
    model = build(family)
    input_ids, attention_mask, images = prompts()
    policy = MergePolicy(mode="fixed_r", r=2)
    with torch.no_grad():
        ours = qwen_vl_prefill(model, input_ids, images, policy, attention_mask)
    lengths = ours.merged.lengths.tolist()
    layers = len(model.model.visual.blocks)
    assert lengths == [15 - 2 * layers, 1, 12 - 2 * layers]  # r = 2 a block; 4 cells go 4, 2, 1, 1...
    used = (ours.layout.counts() > 0).sum(1).tolist()
    assert used == [5 + lengths[0] + lengths[1], 3 + lengths[2]]  # text singletons + merged tokens
    # each placeholder reads its cell's group: two cells of an image share a row exactly when they
    # share a merged token, and rows are numbered per sample in the order of their first position
    image_positions = [(0, slice(2, 17), 0), (0, slice(19, 23), 1), (1, slice(10, 22), 2)]  # 9 pads in sample 1
    for sample, span, image in image_positions:
        rows, group = ours.layout.expand[sample, span], ours.merged.group[image, : span.stop - span.start]
        assert torch.equal(rows[:, None] == rows[None], group[:, None] == group[None])
    for sample in range(2):
        firsts = list(dict.fromkeys(ours.layout.expand[sample].tolist()))  # rows by first position
        assert firsts == list(range(len(firsts)))

    # the same rows, expanded and run through the host's own attention at the full prompt's positions
    hidden_rows = _rows(model, input_ids, images, ours)
    # Qwen3-VL: each visual row also gets its merged token's DeepStack features after the first layers
    deepstack = [_rows(model, input_ids, images, ours, tap) for tap in range(len(ours.merged.taps))]
    assert len(deepstack) == (2 if family == "qwen3_vl" else 0)
    with torch.no_grad():
        language = model.model.language_model
        reference = model.lm_head(naive_reference(language, hidden_rows, ours.layout, deepstack))
    valid_rows = ours.layout.counts() > 0
    torch.testing.assert_close(ours.logits[valid_rows], reference[valid_rows], rtol=0, atol=1e-6)


def _rows(model, input_ids, images, prefill, tap: int | None = None) -> torch.Tensor:
    """The prefill's input rows, rebuilt with Python loops: a text position's row is its embedding, an
    image placeholder's row is its cell's merged token. With ``tap``: the DeepStack rows of that tap
    instead (the merged token's tap feature; zeros for text)."""
    embeds = model.get_input_embeddings()(input_ids)
    features = prefill.merged.tokens
    if tap is not None:
        features, embeds = prefill.merged.layout.pad(prefill.merged.taps[tap]), torch.zeros_like(embeds)
    rows = torch.zeros(input_ids.shape[0], prefill.layout.num_rows, HIDDEN, dtype=embeds.dtype)
    image, cell = 0, 0
    for b in range(input_ids.shape[0]):
        for n in range(input_ids.shape[1]):
            if input_ids[b, n] == IMAGE:
                token = int(prefill.merged.group[image, cell])
                rows[b, prefill.layout.expand[b, n]] = features[image, token]
                cell += 1
                if cell == int((prefill.merged.group[image] >= 0).sum()):
                    image, cell = image + 1, 0
            else:
                rows[b, prefill.layout.expand[b, n]] = embeds[b, n]
    return rows


def test_a_wrong_placeholder_count_is_a_clear_error():
    model = build()
    input_ids, attention_mask, images = prompts()
    with pytest.raises(ValueError, match=r"input_ids hold 31 image placeholders; the images have 23 cells"):
        qwen_vl_prefill(model, input_ids, images[:2] + [images[1]], MergePolicy.off(), attention_mask)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("cache", ["compact", "expanded"])
def test_greedy_decoding_at_infinite_thresholds_is_the_stock_model(family, cache):
    """Three greedy steps after the prefill: each step's logits equal the stock model's on the whole
    sequence so far (recomputed, M-RoPE positions from the host), for both caches."""
    model = build(family)
    input_ids, attention_mask, images = prompts()
    policy = MergePolicy(thresholds=[math.inf] * len(model.model.visual.blocks))
    with torch.no_grad():
        prefill = qwen_vl_prefill(model, input_ids, images, policy, attention_mask, cache=cache)
        logits = prefill.position_logits()[:, -1]
        positions, valid, ids, mask = prefill.layout.positions, prefill.layout.valid, input_ids, attention_mask
        for _ in range(3):
            token = logits.argmax(-1, keepdim=True)  # [B, 1]
            new_positions = next_positions(positions, valid, 1)
            positions, valid = torch.cat([positions, new_positions], -1), torch.cat([valid, valid[:, -1:]], 1)
            logits = qwen_vl_decode(model, prefill.cache, token, new_positions, valid)[:, -1]
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, mask[:, -1:]], 1)
            stock = stock_logits(model, ids, mask, images)[:, -1]
            torch.testing.assert_close(logits, stock, rtol=0, atol=1e-8)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_merged_decoding_compact_equals_expanded_and_the_naive_reference(family):
    model = build(family)
    input_ids, attention_mask, images = prompts()
    policy = MergePolicy(mode="fixed_r", r=2)
    with torch.no_grad():
        compact = qwen_vl_prefill(model, input_ids, images, policy, attention_mask, cache="compact")
        expanded = qwen_vl_prefill(model, input_ids, images, policy, attention_mask, cache="expanded")
        rows, layout = _rows(model, input_ids, images, compact), compact.layout
        # Qwen3-VL's DeepStack rows of the prompt (new tokens are text: zeros)
        deepstack = [_rows(model, input_ids, images, compact, tap) for tap in range(len(compact.merged.taps))]
        for new in (2, 1):
            ids = torch.randint(1, 50, (2, new), generator=torch.Generator().manual_seed(new))
            positions = next_positions(layout.positions, layout.valid, new)
            valid = torch.cat([layout.valid, torch.ones(2, new, dtype=torch.bool)], 1)
            ours = qwen_vl_decode(model, compact.cache, ids, positions, valid)
            theirs = qwen_vl_decode(model, expanded.cache, ids, positions, valid)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
            rows = torch.cat([rows, model.get_input_embeddings()(ids)], 1)
            deepstack = [torch.cat([tap, torch.zeros(2, new, HIDDEN, dtype=tap.dtype)], 1) for tap in deepstack]
            layout = layout.extend(positions, valid)
            reference = naive_reference(model.model.language_model, rows, layout, deepstack)
            reference = model.lm_head(reference)[:, -new:]
            torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_tower_loads_out_of_a_whole_saved_model(family, tmp_path):
    """`load` on a whole model's directory reads only the tower: its config and the weights under
    model.visual., and gives the whole model's tower's features exactly."""
    model = build(family)
    model.save_pretrained(tmp_path / "whole")
    backbone = get_backbone(FAMILIES[family][0])
    tower = backbone.load(tmp_path / "whole")
    assert type(tower) is type(model.model.visual) and next(tower.parameters()).dtype == torch.float64
    _, _, images = prompts()
    with torch.no_grad():
        for ours, theirs in zip(
            backbone.stock_features_images(tower, images),
            backbone.stock_features_images(model.model.visual, images),
            strict=True,
        ):
            assert torch.equal(ours, theirs)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


class FakeHub:
    """``hf_hub_download`` and ``snapshot_download`` over a local folder standing for a hub repository:
    each fetched file is copied into a snapshot folder, and its name is remembered."""

    def __init__(self, remote, snapshot):
        self.remote, self.snapshot, self.fetched = remote, snapshot, []

    def hf_hub_download(self, repo_id, filename):
        assert repo_id == "Qwen/tiny"
        if not (self.remote / filename).is_file():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        self.fetched.append(filename)
        self.snapshot.mkdir(exist_ok=True)
        (self.snapshot / filename).write_bytes((self.remote / filename).read_bytes())
        return str(self.snapshot / filename)

    def snapshot_download(self, repo_id):
        for file in self.remote.iterdir():
            self.hf_hub_download(repo_id, file.name)
        return str(self.snapshot)


@pytest.mark.parametrize("shard_size", ["40KB", None])
def test_the_tower_loads_from_a_whole_model_on_the_hub(shard_size, tmp_path, monkeypatch):
    """By hub id, `load` fetches the config and only the safetensors shards that hold tower weights
    (the shard index says which), and gives the whole model's tower exactly; an unsharded checkpoint
    is its one file."""
    model = build("qwen2_5_vl")
    model.save_pretrained(tmp_path / "remote", **({"max_shard_size": shard_size} if shard_size else {}))
    hub = FakeHub(tmp_path / "remote", tmp_path / "snapshot")
    monkeypatch.setattr(hf_qwen_vl, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(hf_qwen_vl, "snapshot_download", hub.snapshot_download)
    tower = get_backbone("hf_qwen2_5_vl").load("Qwen/tiny")
    assert same_weights(tower, model.model.visual)
    shards = sorted(p.name for p in (tmp_path / "remote").glob("*.safetensors"))
    fetched = sorted(name for name in hub.fetched if name.endswith(".safetensors"))
    if shard_size is None:
        assert fetched == shards == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "remote" / "model.safetensors.index.json").read_text())["weight_map"]
        assert fetched == sorted({f for key, f in index.items() if key.startswith(("model.visual.", "visual."))})
        assert len(fetched) < len(shards)  # the language model's shards stay on the hub


def test_a_saved_tower_on_the_hub_loads_with_from_pretrained(tmp_path, monkeypatch):
    """A repository holding only a tower (no vision_config: its own config) is fetched whole."""
    model = build("qwen2_vl")
    model.model.visual.save_pretrained(tmp_path / "remote")
    hub = FakeHub(tmp_path / "remote", tmp_path / "snapshot")
    monkeypatch.setattr(hf_qwen_vl, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(hf_qwen_vl, "snapshot_download", hub.snapshot_download)
    tower = get_backbone("hf_qwen2_vl").load("Qwen/tiny")
    assert same_weights(tower, model.model.visual)
