"""VTU in Llama-family models against the stock model and a naive reference."""

from __future__ import annotations

import pytest
import torch
from tests_support import FAMILIES, TINY, naive_reference
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from dymu_lightning.backbones.hf_llm import vtu_decode, vtu_forward, vtu_prefill
from dymu_lightning.core.vtu import VirtualLayout, causal_attention, causal_mask, layout_from_keys, vtu_attention


def build(family: str, attn: str = "sdpa") -> torch.nn.Module:
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(**TINY, attn_implementation=attn)
    return model_class(config).double().eval()


def random_layout(generator: torch.Generator, pad: int = 0) -> VirtualLayout:
    """Two text tokens, an image of 8 patches merged into 3 rows, two text tokens, a second image of
    6 patches merged into 2 rows, one text token (19 positions, 10 rows); the last ``pad`` positions
    are then turned into padding, pointing at an extra padding row."""
    pieces, row = [], 0
    for kind, size, groups in (("text", 2, 2), ("image", 8, 3), ("text", 2, 2), ("image", 6, 2), ("text", 1, 1)):
        if kind == "text":
            pieces.append(torch.arange(row, row + size))
        else:
            # every group gets at least one patch, the rest land at random
            assignment = torch.cat(
                [torch.arange(groups), torch.randint(0, groups, (size - groups,), generator=generator)]
            )
            pieces.append(row + assignment[torch.randperm(size, generator=generator)])
        row += groups
    expand = torch.cat(pieces)
    valid = torch.arange(expand.numel()) < expand.numel() - pad
    expand[~valid] = row
    return expand, valid, row + 1


def batch_layout(pads: list[int], seed: int = 0) -> VirtualLayout:
    generator = torch.Generator().manual_seed(seed)
    samples = [random_layout(generator, pad) for pad in pads]
    num_rows = max(n for _, _, n in samples)
    expand = torch.stack([e for e, _, _ in samples])
    valid = torch.stack([v for _, v, _ in samples])
    positions = torch.arange(expand.shape[1]).expand_as(expand)
    return VirtualLayout(expand, positions, valid, num_rows)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_singleton_groups_equal_the_stock_model(family):
    model = build(family)
    embeds = torch.randn(2, 11, TINY["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        stock = model(inputs_embeds=embeds).last_hidden_state
        ours = vtu_forward(model, embeds, VirtualLayout.singletons(2, 11))
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vtu_equals_the_naive_reference(family):
    """Random group maps, batch 2 with different maps, two images per sample, and padding."""
    model = build(family, attn="eager")
    layout = batch_layout(pads=[0, 3])
    assert not torch.equal(layout.expand[0, :16], layout.expand[1, :16])
    rows = torch.randn(2, layout.num_rows, TINY["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        ours = vtu_forward(model, rows, layout)
        reference = naive_reference(model, rows, layout)
    used = layout.counts() > 0
    torch.testing.assert_close(ours[used], reference[used], rtol=0, atol=1e-5)
    # a merged row differs from running the same rows as if they were plain tokens
    plain = vtu_forward(model, rows, VirtualLayout.singletons(2, layout.num_rows))
    assert (plain[used] - ours[used]).abs().max() > 1e-3


def test_rows_round_trip():
    layout = batch_layout(pads=[0, 2], seed=1)
    rows = torch.randn(2, layout.num_rows, 3, dtype=torch.float64)
    back = layout.to_rows(layout.to_positions(rows))
    used = layout.counts() > 0
    torch.testing.assert_close(back[used], rows[used])
    assert torch.equal(layout.counts().sum(dim=1), layout.valid.sum(dim=1).float())


def uneven_layout(seed: int = 0) -> VirtualLayout:
    """Batch 3 of 19 positions: sample 0 as :func:`random_layout`, sample 1 with its last 3 positions
    padding, sample 2 with every patch of both images its own row (18 rows): the padded rows are sized
    by sample 2, the others use fewer."""
    layout = batch_layout(pads=[0, 3], seed=seed)
    busy = torch.arange(19)[None]
    expand = torch.cat([layout.expand, busy])
    valid = torch.cat([layout.valid, torch.ones(1, 19, dtype=torch.bool)])
    return VirtualLayout(expand, torch.arange(19).expand(3, -1), valid, 19)


def test_packed_rows_are_the_used_rows_and_attend_exactly_as_padded_rows():
    layout = uneven_layout()
    packed = layout.pack()
    used = layout.counts() > 0
    # a batch costs the sum of its samples' used rows, not the busiest sample's rows times the batch
    # sample 0: its 10 rows; sample 1: the rows of its 16 valid positions; sample 2: all 19
    assert packed.total == int(used.sum()) == 10 + len(set(layout.expand[1, :16].tolist())) + 19
    assert packed.total < 3 * layout.num_rows
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(3, layout.num_rows, 4, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(3, layout.num_rows, 2, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    angles = layout.positions[..., None] * torch.rand(4, generator=generator, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [B, N, 8]
    padded_out, padded_k, padded_v = vtu_attention(q, k, v, layout, cos, sin, 0.3)
    packed_out, packed_k, packed_v = vtu_attention(*(packed.pack(t) for t in (q, k, v)), packed, cos, sin, 0.3)
    assert torch.equal(packed.unpack(packed_out)[used], padded_out[used])
    valid = layout.valid  # the cached keys and values agree at every valid position
    assert torch.equal(packed_k.transpose(1, 2)[valid], padded_k.transpose(1, 2)[valid])
    assert torch.equal(packed_v.transpose(1, 2)[valid], padded_v.transpose(1, 2)[valid])
    assert torch.equal(packed.unpack(packed.pack(q))[used], q[used])
    assert not packed.unpack(packed.pack(q))[~used].any()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compact_decoding_equals_the_expanded_cache_and_the_naive_reference(family):
    """Random groups, two images per sample, batch 3 (padding, uneven rows); two new tokens at once,
    then one: the compact cache (values per row) gives the stock model's outputs on the expanded
    cache and the naive reference's over the whole extended sequence. (SDPA, not eager: the host's
    eager attention takes its softmax in float32, which would set the tolerance.)"""
    model = build(family)
    layout = uneven_layout(seed=4)
    rows = torch.randn(3, layout.num_rows, TINY["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        _, compact = vtu_prefill(model, rows, layout, cache="compact")
        _, expanded = vtu_prefill(model, rows, layout, cache="expanded")
        assert isinstance(compact, Cache) and all(isinstance(layer, DynamicLayer) for layer in compact.layers)
        for new in (2, 1):
            embeds = torch.randn(3, new, TINY["hidden_size"], dtype=torch.float64)
            positions = layout.positions[:, -1:] + 1 + torch.arange(new)
            valid = torch.cat([layout.valid, torch.ones(3, new, dtype=torch.bool)], dim=1)
            ours = vtu_decode(model, embeds, compact, positions, valid)
            stock = model(
                inputs_embeds=embeds, position_ids=positions, attention_mask=valid.long(), cache=expanded
            ).last_hidden_state
            rows, layout = torch.cat([rows, embeds], dim=1), layout.extend(positions, valid)
            reference = naive_reference(model, rows, layout)[:, -new:]
            torch.testing.assert_close(ours, stock, rtol=0, atol=1e-10)
            torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)
    # the cache: a key per position, a value per row, and it says so to generate()
    assert compact.get_seq_length() == compact.seq_length == 19 + 3
    assert compact.layers[0].values.shape[2] == 19 + 3 and not compact.is_croppable
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        compact.crop(-1)


def test_repeating_grouped_heads_for_masked_attention_changes_nothing():
    """The CUDA path for padded batches (key-value heads copied to their query heads) equals SDPA's
    own grouped-query attention, checked here on the CPU."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 7, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = causal_mask(torch.arange(7).expand(2, -1) >= torch.tensor([[0], [3]]), 7)  # sample 1 left-padded
    grouped = causal_attention(q, k, v, mask, 0.4)
    repeated = causal_attention(q, k, v, mask, 0.4, repeat_heads=True)
    torch.testing.assert_close(repeated, grouped, rtol=0, atol=1e-12)


def test_the_compact_cache_copies_and_selects_samples_with_its_layout():
    """generate()'s batch operations on the Cache move every layer's keys and values and the layout
    together: sample i of the result is sample index[i] of the source."""
    model = build("llama")
    layout = uneven_layout(seed=6)
    rows = torch.randn(3, layout.num_rows, TINY["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        _, cache = vtu_prefill(model, rows, layout, cache="compact")
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    expand = cache.layout.expand.clone()
    for operation, index in (
        (lambda c: c.batch_repeat_interleave(2), torch.tensor([0, 0, 1, 1, 2, 2])),
        (lambda c: c.batch_select_indices(torch.tensor([5, 0, 2])), torch.tensor([2, 0, 1])),
        (lambda c: c.reorder_cache(torch.tensor([1, 1, 0])), torch.tensor([0, 0, 2])),
    ):
        operation(cache)
        assert torch.equal(cache.layout.expand, expand[index])
        for layer, (keys, values) in zip(cache.layers, before, strict=True):
            assert torch.equal(layer.keys, keys[index]) and torch.equal(layer.values, values[index])


def test_layout_from_keys_numbers_rows_by_first_position_in_each_sample():
    keys = torch.tensor([[5, 3, 5, 9], [7, 7, 8, 2]])
    positions = torch.arange(4).expand(2, -1)
    valid = torch.tensor([[True] * 4, [False, True, True, True]])
    layout, row_key = layout_from_keys(keys, positions, valid)
    assert layout.expand.tolist() == [[0, 1, 0, 2], [0, 0, 1, 2]]
    assert row_key.tolist() == [[5, 3, 9], [7, 8, 2]] and layout.num_rows == 3
    assert layout.counts().tolist() == [[2, 1, 1], [1, 1, 1]]  # padding counts for no row
    # a sample with fewer rows gets -1 keys for its padding rows
    _, short = layout_from_keys(torch.tensor([[1, 1, 1], [4, 5, 6]]), positions[:, :3], valid[:, :3])
    assert short.tolist() == [[1, -1, -1], [4, 5, 6]]
