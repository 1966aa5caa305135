"""Property tests: the index maps round trip for any batch (TokenLayout in the encoder, VirtualLayout in VTU).

Expected values are rebuilt with plain Python loops from the lengths or the group assignment, so the
properties do not lean on the maps under test. Every comparison is exact: the maps only move values,
and the VTU mean of identical integer copies is exact in float64.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests_support import FAMILIES, TINY, naive_reference

from dymu_lightning.backbones.hf_llm import HFCompactCache, vtu_forward
from dymu_lightning.core import TokenLayout
from dymu_lightning.core.vtu import VirtualLayout, decode_attention, vtu_attention

pytestmark = pytest.mark.usefixtures("one_thread")

# ----- TokenLayout ----------------------------------------------------------------------------------------------------

# Every image keeps at least one token (B tokens never merge), so lengths start at 1.
lengths_lists = st.lists(st.integers(1, 9), min_size=1, max_size=6)
feature_shapes = st.lists(st.integers(1, 3), max_size=2).map(tuple)
dtypes = st.sampled_from([torch.float64, torch.float32, torch.int64])
fills = st.sampled_from([0.0, -1.0, 7.0])


def _layout(lengths: list[int]) -> TokenLayout:
    return TokenLayout.from_lengths(torch.tensor(lengths), max(lengths), sum(lengths))


def _distinct(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Values that all differ (and differ from every fill), so a misplaced one cannot go unnoticed."""
    return (torch.arange(math.prod(shape)) + 100).reshape(shape).to(dtype)


def _padded_by_hand(packed: torch.Tensor, lengths: list[int], fill: float) -> torch.Tensor:
    rows, start = [], 0
    for length in lengths:
        row = packed.new_full((max(lengths), *packed.shape[1:]), fill)
        row[:length] = packed[start : start + length]
        rows.append(row)
        start += length
    return torch.stack(rows)


@given(lengths=lengths_lists, features=feature_shapes, dtype=dtypes, fill=fills)
def test_pad_places_each_image_in_its_row_and_pack_inverts_it(lengths, features, dtype, fill):
    layout = _layout(lengths)
    assert (layout.batch, layout.max_len, layout.total) == (len(lengths), max(lengths), sum(lengths))
    packed = _distinct((sum(lengths), *features), dtype)
    padded = layout.pad(packed, fill=fill)
    assert padded.dtype == dtype
    assert torch.equal(padded, _padded_by_hand(packed, lengths, fill))
    assert torch.equal(layout.pack(padded), packed)
    # pack reads strided views in place (an attention output transposed back from [B, H, L, d])
    strided = padded.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(layout.pack(strided), packed)


@given(lengths=lengths_lists, features=feature_shapes, dtype=dtypes, fill=fills)
def test_pack_keeps_exactly_the_real_slots_and_pad_restores_them(lengths, features, dtype, fill):
    layout = _layout(lengths)
    grid = _distinct((len(lengths), max(lengths), *features), dtype)
    real = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]  # [B, L]
    packed = layout.pack(grid)
    assert torch.equal(packed, grid[real])  # row-major over the real slots: image after image
    restored = layout.pad(packed, fill=fill)
    assert torch.equal(restored[real], grid[real])
    assert (restored[~real] == fill).all()


@given(batch=st.integers(1, 5), length=st.integers(1, 9), features=feature_shapes, dtype=dtypes)
def test_dense_layout_equals_equal_lengths(batch, length, features, dtype):
    dense = TokenLayout.dense(batch, length, torch.device("cpu"))
    general = _layout([length] * batch)
    packed = _distinct((batch * length, *features), dtype)
    assert torch.equal(dense.pad(packed), general.pad(packed))
    assert torch.equal(dense.pad(packed), packed.reshape(batch, length, *features))
    assert torch.equal(dense.pack(dense.pad(packed)), packed)


# ----- VirtualLayout --------------------------------------------------------------------------------------------------


@st.composite
def samples(draw) -> tuple[list[int], list[bool], int]:
    """One sequence: text tokens (a row each) and images (patches spread over 1..patches rows, every
    row holding at least one patch, in any order), with padding on either side. A padding position
    points at a row of its own, or all of them at one shared row (both occur in the library)."""
    expand: list[int] = []
    rows = 0
    for kind in draw(st.lists(st.sampled_from(["text", "image"]), min_size=1, max_size=4)):
        if kind == "text":
            size = draw(st.integers(1, 3))
            expand += range(rows, rows + size)
            rows += size
        else:
            patches = draw(st.integers(1, 8))
            groups = draw(st.integers(1, patches))
            extra = draw(st.lists(st.integers(0, groups - 1), min_size=patches - groups, max_size=patches - groups))
            order = draw(st.permutations(list(range(groups)) + extra))
            expand += [rows + g for g in order]
            rows += groups
    valid = [True] * len(expand)
    left, right = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    if left + right and draw(st.booleans()):  # one shared padding row
        expand = [rows] * left + expand + [rows] * right
        rows += 1
    else:  # a row per padding position, placed in sequence order as the library does
        expand = list(range(left)) + [e + left for e in expand] + list(range(rows + left, rows + left + right))
        rows += left + right
    valid = [False] * left + valid + [False] * right
    return expand, valid, rows


@st.composite
def virtual_layouts(draw) -> VirtualLayout:
    """A batch of 1..3 samples padded on the right to one length; ``num_rows`` is the largest sample's
    (or one more). RoPE positions count every position, or the valid ones only."""
    batch = draw(st.lists(samples(), min_size=1, max_size=3))
    length = max(len(e) for e, _, _ in batch)
    num_rows = max(r for _, _, r in batch) + draw(st.integers(0, 1))  # possibly a row nobody uses
    expand, valid = [], []
    for e, v, rows in batch:
        pad = length - len(e)
        expand.append(e + [rows] * pad if rows < num_rows else e + [0] * pad)
        valid.append(v + [False] * pad)
    valid = torch.tensor(valid)
    if draw(st.booleans()):  # 0..N-1, as without position_ids
        positions = torch.arange(length).expand(len(batch), -1)
    else:  # counted over the valid positions only, as generate() does for left padding
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return VirtualLayout(torch.tensor(expand), positions, valid, num_rows)


def _members(layout: VirtualLayout, b: int, row: int) -> list[int]:
    """Valid positions of sample ``b`` that show row ``row``."""
    expand, valid = layout.expand[b].tolist(), layout.valid[b].tolist()
    return [n for n in range(len(expand)) if expand[n] == row and valid[n]]


@given(layout=virtual_layouts(), features=feature_shapes)
def test_rows_to_positions_and_back_is_the_identity(layout, features):
    batch, length = layout.expand.shape
    generator = torch.Generator().manual_seed(0)
    # Integer values: a mean of identical copies is then exact in float64.
    rows = torch.randint(-1000, 1000, (batch, layout.num_rows, *features), generator=generator).double()
    expanded = layout.to_positions(rows)
    assert expanded.shape == (batch, length, *features)
    for b in range(batch):
        for n in range(length):
            assert torch.equal(expanded[b, n], rows[b, layout.expand[b, n]])
    back = layout.to_rows(expanded)
    used = layout.counts() > 0
    assert torch.equal(back[used], rows[used])
    assert (back[~used] == 0).all()


@given(layout=virtual_layouts())
def test_counts_are_the_valid_positions_of_each_row(layout):
    batch = layout.expand.shape[0]
    expected = [[len(_members(layout, b, r)) for r in range(layout.num_rows)] for b in range(batch)]
    assert layout.counts().tolist() == expected
    assert torch.equal(layout.counts().sum(dim=1), layout.valid.sum(dim=1).float())


@given(layout=virtual_layouts(), seed=st.integers(0, 2**16))
def test_to_rows_is_the_mean_over_each_rows_valid_positions(layout, seed):
    batch, length = layout.expand.shape
    values = torch.randn(batch, length, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    means = layout.to_rows(values)
    for b in range(batch):
        for row in range(layout.num_rows):
            members = _members(layout, b, row)
            expected = values[b, members].mean(dim=0) if members else torch.zeros(2, dtype=torch.float64)
            torch.testing.assert_close(means[b, row], expected, rtol=0, atol=1e-12)


@given(layout=virtual_layouts(), new=st.integers(1, 3))
def test_extend_appends_one_singleton_row_per_new_token(layout, new):
    batch, length = layout.expand.shape
    positions = length + torch.arange(new).expand(batch, -1)
    longer = layout.extend(positions)
    assert longer.num_rows == layout.num_rows + new
    assert torch.equal(longer.expand[:, :length], layout.expand)
    assert torch.equal(longer.valid[:, :length], layout.valid) and longer.valid[:, length:].all()
    assert torch.equal(longer.counts()[:, : layout.num_rows], layout.counts())
    assert (longer.counts()[:, layout.num_rows :] == 1).all()
    rows = torch.randint(-1000, 1000, (batch, longer.num_rows, 3)).double()
    used = longer.counts() > 0
    assert torch.equal(longer.to_rows(longer.to_positions(rows))[used], rows[used])
    assert torch.equal(longer.to_positions(rows)[:, length:], rows[:, layout.num_rows :])


@given(layout=virtual_layouts())
def test_causal_mask_sees_earlier_valid_positions_and_never_nothing(layout):
    mask = layout.causal_mask()
    if bool(layout.valid.all()):
        assert mask is None  # plain causal attention applies
        return
    batch, length = layout.expand.shape
    assert mask.shape == (batch, 1, length, length)
    valid = layout.valid.tolist()
    for b in range(batch):
        for i in range(length):
            expected = [(j <= i and valid[b][j]) or (j == i and not valid[b][i]) for j in range(length)]
            assert mask[b, 0, i].tolist() == expected
    assert mask.any(dim=-1).all()  # no empty softmax row


@cache
def _language_model(family: str) -> torch.nn.Module:
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**TINY, attn_implementation="eager")).double().eval()


@settings(max_examples=max(3, settings.default.max_examples // 3))
@given(layout=virtual_layouts(), family=st.sampled_from(sorted(FAMILIES)), seed=st.integers(0, 2**16))
def test_vtu_equals_the_naive_reference_for_any_layout(layout, family, seed):
    """What the layouts are for: VTU over rows equals expanding them, the host's own attention with
    RoPE at the virtual positions, and the mean per row (method.md §4.5), for random groups, several
    images per sample, padding on either side and batch > 1."""
    model = _language_model(family)
    rows = torch.randn(*layout.expand.shape[:1], layout.num_rows, TINY["hidden_size"], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    with torch.no_grad():
        ours = vtu_forward(model, rows, layout)
        reference = naive_reference(model, rows, layout)
    used = layout.counts() > 0
    # the host's eager attention takes its softmax in float32: float32 tolerances
    torch.testing.assert_close(ours[used], reference[used], rtol=1e-5, atol=1e-6)


def _rope_tables(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, dim]`` cos and sin in the Llama convention, float64."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


@given(layout=virtual_layouts(), new=st.integers(1, 3), gqa=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_decoding_from_compact_rows_equals_prefilling_the_longer_sequence(layout, new, gqa, seed):
    """Generation: the next tokens' attention over the cached rows (keys rotated per position as they
    are read) equals their rows in one VTU prefill of the prompt and the new tokens together."""
    batch, length = layout.expand.shape
    longer = layout.extend(layout.positions[:, -1:] + 1 + torch.arange(new))
    heads, dim = 2 * gqa, 4
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, longer.num_rows, heads, dim, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(batch, longer.num_rows, 2, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    cos, sin = _rope_tables(longer.positions, dim)
    prefill, keys, _ = vtu_attention(q, k, v, longer, cos, sin, scale=dim**-0.5)  # keys rotated per position
    values = v.transpose(1, 2)  # one per row, as the compact cache keeps them
    decoded = decode_attention(q[:, -new:], keys, values, longer, cos[:, -new:], sin[:, -new:], scale=dim**-0.5)
    torch.testing.assert_close(decoded, prefill[:, -new:], rtol=0, atol=1e-12)


@given(layout=virtual_layouts(), data=st.data())
def test_reordering_the_batch_reorders_the_layout(layout, data):
    """Beam search reorders (and repeats) samples: the cache's layout maps follow its rows."""
    batch = layout.expand.shape[0]
    index = torch.tensor(data.draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=4), label="index"))
    cache = HFCompactCache(layout)
    rows = torch.randint(-1000, 1000, (batch, 1, layout.num_rows, 2)).double()  # [B, Hkv, N_un, d]
    cache.update(rows, rows, 0)
    cache.reorder_cache(index)
    assert torch.equal(cache.layers[0].keys, rows[index]) and torch.equal(cache.layers[0].values, rows[index])
    per_row = rows[:, 0]  # [B, N_un, d]
    assert torch.equal(cache.layout.to_positions(per_row[index]), layout.to_positions(per_row)[index])
    assert torch.equal(cache.layout.counts(), layout.counts()[index])
    assert torch.equal(cache.layout.valid, layout.valid[index])
