"""The pure-torch engine, on random tensors."""

from __future__ import annotations

import pytest
import torch

from dymu_lightning.core import (
    LayerMerges,
    MergePolicy,
    TokenLayout,
    TokenState,
    attention,
    bipartite_edges,
    local_batch_cut,
    merge_tokens,
)


def _layout(lengths: list[int]) -> TokenLayout:
    lengths_t = torch.tensor(lengths)
    return TokenLayout.from_lengths(lengths_t, max(lengths), sum(lengths))


def test_pad_and_pack_round_trip():
    layout = _layout([3, 1, 4])
    packed = torch.arange(8.0)[:, None].expand(8, 2)
    padded = layout.pad(packed, fill=-1.0)
    assert padded[:, :, 0].tolist() == [[0, 1, 2, -1], [3, -1, -1, -1], [4, 5, 6, 7]]
    assert torch.equal(layout.pack(padded), packed)
    assert layout.valid_mask().sum(1).tolist() == [3, 1, 4]
    stacked = layout.pad_stack([packed, packed + 10])
    assert torch.equal(stacked[:, :, 1][layout.valid_mask()], packed + 10)
    assert (stacked[~layout.valid_mask()] == 0).all()


def _random_state(lengths: list[int], channels: int = 5, num_prefix: int = 1) -> TokenState:
    layout = _layout(lengths)
    group = torch.arange(num_prefix, max(lengths)).expand(len(lengths), -1)
    # Mark padding originals invalid by clamping: these states only serve merge tests on full images.
    sizes = torch.randint(1, 4, (layout.total,)).float()
    return TokenState(torch.randn(layout.total, channels), sizes, layout, group.clone())


def test_merge_preserves_size_weighted_sums_and_raster_order():
    torch.manual_seed(0)
    lengths = [9, 9]
    state = _random_state(lengths)
    keys = torch.randn(2, 9, 4)
    edges = bipartite_edges(keys, state.layout.valid_mask(), num_protected=1)
    merge = torch.tensor([[False, True, False, True, True], [False, False, True, False, False]])
    after = merge_tokens(state, edges.partner, merge)
    assert after.layout.lengths.tolist() == [6, 8]
    before_x, before_s = state.layout.pad(state.x), state.layout.pad(state.sizes)
    after_x, after_s = after.layout.pad(after.x), after.layout.pad(after.sizes)
    for b in range(2):
        # destination of every old token, recovered from the group map of an identity state
        absorbed = {2 * a: 2 * int(edges.partner[b, a]) + 1 for a in range(5) if merge[b, a]}
        survivors = [t for t in range(9) if t not in absorbed]
        for new, old in enumerate(survivors):
            members = [old] + [a for a, dest in absorbed.items() if dest == old]
            weight = before_s[b, members]
            assert after_s[b, new] == weight.sum()
            expected = (before_x[b, members] * weight[:, None]).sum(0) / weight.sum()
            torch.testing.assert_close(after_x[b, new], expected)
        # the group map follows the same destinations
        for original, position in enumerate(state.group[b].tolist()):
            old = absorbed.get(position, position)
            assert int(after.group[b, original]) == survivors.index(old)


def test_protected_and_padding_tokens_have_no_edges():
    keys = torch.randn(2, 7, 4)
    valid = _layout([7, 4]).valid_mask()
    edges = bipartite_edges(keys, valid, num_protected=3)
    finite = edges.eligible
    assert finite[:, :2].logical_not().all()  # positions 0 and 2 are protected
    assert finite[0, 2:].all() and finite[1, 2:].logical_not().all()  # image 1: positions 4, 6 are padding
    partner_positions = 2 * edges.partner[0, 2:] + 1
    assert (partner_positions >= 3).all()


def test_local_batch_cut_selects_exactly_k():
    scores = torch.tensor([[0.9, 0.1, float("-inf")], [0.5, 0.7, 0.3]])
    cut = local_batch_cut(0, scores, 3)
    assert float(cut) == pytest.approx(0.3)
    assert int((scores > cut).sum()) == 3
    assert float(local_batch_cut(0, scores, 6)) == float("-inf")
    assert int((scores > local_batch_cut(0, scores, 5)).sum()) == 5  # every eligible edge


def test_batch_topk_merges_exactly_b_times_r_per_layer():
    """The calibration rule: each layer merges the batch's B*r best edges, unevenly over images."""
    from tests_support import tiny_timm

    backbone, model, pixels = tiny_timm(batch=6)
    merged_per_layer, per_image = [], []

    def record(decision: LayerMerges) -> None:
        merged_per_layer.append(int(decision.merge.sum()))
        per_image.append(decision.merge.sum(dim=1).tolist())
        assert float(decision.batch_threshold) >= 0

    with torch.no_grad():
        out = backbone.merged_forward(model, pixels, MergePolicy(mode="batch_topk", r=7, on_layer=record))
    assert merged_per_layer == [6 * 7] * backbone.num_layers(model)
    assert any(len(set(counts)) > 1 for counts in per_image)
    assert int(out.lengths.sum()) == 6 * (65 - 7 * backbone.num_layers(model))


@pytest.mark.parametrize("max_merges,min_tokens", [(3, None), (None, 50), (4, 55)])
def test_per_image_caps(max_merges, min_tokens):
    from tests_support import tiny_timm

    backbone, model, pixels = tiny_timm(batch=4)
    policy = MergePolicy(thresholds=[-1.0] * 3, max_merges=max_merges, min_tokens=min_tokens)
    with torch.no_grad():
        counts = backbone.merged_forward(model, pixels, policy).tokens_per_layer
    removed = -counts.diff(dim=1)
    if max_merges is not None:
        assert (removed <= max_merges).all()
    if min_tokens is not None:
        assert (counts >= min_tokens).all()
    # with every edge above a threshold of -1, the caps alone decide: they bind exactly
    expected = counts[:, :-1] - torch.clamp(counts[:, :-1] - (min_tokens or 0), max=max_merges or 10**6)
    assert torch.equal(counts[:, 1:], expected)


def test_proportional_attention_equals_duplicated_keys():
    """A key of size s draws the attention of s identical keys."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    sizes = torch.tensor([1, 3, 2, 1])
    bias = sizes.double().log()[None, None, None, :]
    repeat = torch.repeat_interleave(torch.arange(4), sizes)
    expected = attention(q, k[:, :, repeat], v[:, :, repeat], scale=8**-0.5, backend="eager")
    for backend in ("eager", "sdpa"):
        out = attention(q, k, v, scale=8**-0.5, bias=bias, backend=backend)
        torch.testing.assert_close(out, expected)


def test_policy_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown merge mode 'topk' for backbone 'x' \(2 layers\)"):
        MergePolicy(mode="topk", r=1).validate(2, "x")
    with pytest.raises(ValueError, match=r"mode 'fixed_r' needs r for backbone 'x' \(2 layers\)"):
        MergePolicy(mode="fixed_r").validate(2, "x")
    with pytest.raises(ValueError, match=r"needs 2 values of r, one per layer, got 3"):
        MergePolicy(mode="fixed_r", r=[1, 2, 3]).validate(2, "x")
    with pytest.raises(ValueError, match=r"min_tokens must be >= 0"):
        MergePolicy(mode="fixed_r", r=1, min_tokens=-1).validate(2, "x")
