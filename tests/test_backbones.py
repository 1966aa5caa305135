"""Properties every registered backbone adapter must have (tests run once per registry entry)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dymu_lightning.backbones import is_patched
from dymu_lightning.core import MergedTokens, MergePolicy


def _image(merged: MergedTokens, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image ``b``'s real tokens ``[n, C]``, sizes ``[n]`` and group map ``[N0]``."""
    n = int(merged.lengths[b])
    return merged.tokens[b, :n], merged.sizes[b, :n], merged.group[b]


# 1. Merging off equals the stock model; unpatch restores it bit for bit. -------------------------------
def test_infinite_thresholds_equal_stock_model(tiny):
    pixels = tiny.images(3)
    with torch.no_grad():
        stock = tiny.backbone.stock_features(tiny.model, pixels)
        for policy in (MergePolicy(thresholds=[math.inf] * tiny.num_layers), MergePolicy.off()):
            merged = tiny.backbone.merged_forward(tiny.model, pixels, policy)
            torch.testing.assert_close(merged.tokens, stock, rtol=1e-5, atol=1e-5)
            assert (merged.tokens_per_layer == stock.shape[1]).all()
            assert merged.mask.all() and (merged.sizes == 1).all()


def test_unpatch_restores_the_model_exactly(tiny):
    pixels = tiny.images(2)
    model, backbone = tiny.model, tiny.backbone
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_attributes = set(vars(model))
    with torch.no_grad():
        before = backbone.stock_features(model, pixels)
        policy = MergePolicy(thresholds=tiny.thresholds(pixels))
        backbone.patch(model, policy)
        assert is_patched(model)
        patched = model(pixels)
        direct = backbone.merged_forward(model, pixels, policy)
        assert isinstance(patched, MergedTokens)
        assert torch.equal(patched.tokens, direct.tokens)
        assert patched.lengths.sum() < before.shape[0] * before.shape[1]
        backbone.unpatch(model)
        after = backbone.stock_features(model, pixels)
    assert not is_patched(model)
    assert set(vars(model)) == before_attributes
    assert torch.equal(after, before)
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)


# 2. An image's result does not depend on its batch-mates. ----------------------------------------------
@pytest.mark.parametrize("mode", ["threshold", "fixed_r", "capped"])
def test_result_is_independent_of_batch_mates(tiny64, mode):
    pixels = tiny64.images(5)
    thresholds = tiny64.thresholds(pixels)
    policy = {
        "threshold": MergePolicy(thresholds=thresholds),
        "fixed_r": MergePolicy(mode="fixed_r", r=5),
        "capped": MergePolicy(thresholds=thresholds, max_merges=7, min_tokens=20),
    }[mode]
    with torch.no_grad():
        batch = tiny64.backbone.merged_forward(tiny64.model, pixels, policy)
        if mode == "threshold":  # the batch must really be variable-length for this to mean anything
            assert len(set(batch.lengths.tolist())) > 1
        for b in (0, 1, 4):
            alone = tiny64.backbone.merged_forward(tiny64.model, pixels[b : b + 1], policy)
            tokens, sizes, group = _image(batch, b)
            tokens_alone, sizes_alone, group_alone = _image(alone, 0)
            assert torch.equal(group, group_alone)
            assert torch.equal(sizes, sizes_alone)
            torch.testing.assert_close(tokens, tokens_alone, rtol=0, atol=1e-10)
            assert torch.equal(batch.tokens_per_layer[b], alone.tokens_per_layer[0])


# 3. Sizes are group counts; fixed r equals a naive per-image reference. --------------------------------
def test_sizes_equal_group_counts(tiny):
    pixels = tiny.images(4)
    with torch.no_grad():
        merged = tiny.backbone.merged_forward(tiny.model, pixels, MergePolicy(thresholds=tiny.thresholds(pixels)))
    prefix = merged.num_prefix
    for b in range(pixels.shape[0]):
        _, sizes, group = _image(merged, b)
        counts = torch.bincount(group, minlength=sizes.shape[0]).float()
        counts[:prefix] += 1  # each prefix token stands for itself
        assert torch.equal(sizes, counts)
        assert int(sizes.sum()) == group.shape[0] + prefix
    assert (merged.sizes[~merged.mask] == 0).all()


def naive_fixed_r(tiny, pixels: torch.Tensor, r: int):
    """ToMe with r merges per layer, one image at a time, with Python loops: an independent
    re-statement of the method (eager attention with a log-size bias, bipartite matching over
    even/odd positions, size-weighted means, survivors in raster order)."""
    backbone, model = tiny.backbone, tiny.model
    prefix = backbone.num_prefix_tokens(model)
    x = backbone.embed(model, pixels)[0]
    sizes = torch.ones(x.shape[0], dtype=x.dtype)
    members = [[i] for i in range(x.shape[0])]  # original token indices behind each current token
    for parts in backbone.blocks(model):
        q, k, v = parts.attn_in(x)  # [n, H, d]
        logits = torch.einsum("qhd,khd->hqk", q, k) * parts.scale + sizes.log()[None, None, :]
        x = x + parts.attn_out(torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(x.shape[0], -1))
        keys = F.normalize(k.mean(dim=1), dim=-1)
        edges = []
        for a in range(prefix + (prefix % 2), x.shape[0], 2):
            candidates = [(float(keys[a] @ keys[b]), b) for b in range(1, x.shape[0], 2) if b >= prefix]
            if candidates:
                best = max(score for score, _ in candidates)
                edges.append((best, a, next(b for score, b in candidates if score == best)))
        edges.sort(key=lambda edge: (-edge[0], edge[1]))
        into = {a: b for _, a, b in edges[:r]}
        rows, new_sizes, new_members = [], [], []
        for t in range(x.shape[0]):
            if t in into:
                continue
            group = [t] + [a for a, b in into.items() if b == t]
            weight = sizes[group]
            rows.append((x[group] * weight[:, None]).sum(0) / weight.sum())
            new_sizes.append(weight.sum())
            new_members.append(sum((members[g] for g in group), []))
        x, sizes, members = torch.stack(rows), torch.stack(new_sizes), new_members
        x = x + parts.mlp(x)
    final = backbone.final_norm(model)
    x = final(x) if final is not None else x
    group_map = torch.empty(sum(len(m) for m in members) - prefix, dtype=torch.long)
    for position, originals in enumerate(members):
        for original in originals:
            if original >= prefix:
                group_map[original - prefix] = position
    return x, sizes, group_map


def test_fixed_r_equals_naive_reference(tiny64):
    if not tiny64.backbone.plain_blocks:
        pytest.skip(f"{tiny64.backbone.name}: rotary blocks; its own naive reference is in its adapter's tests")
    pixels = tiny64.images(3)
    r = 9
    with torch.no_grad():
        merged = tiny64.backbone.merged_forward(tiny64.model, pixels, MergePolicy(mode="fixed_r", r=r))
        for b in range(pixels.shape[0]):
            tokens, sizes, group = _image(merged, b)
            ref_tokens, ref_sizes, ref_group = naive_fixed_r(tiny64, pixels[b : b + 1], r)
            assert torch.equal(group, ref_group)
            assert torch.equal(sizes, ref_sizes.float())
            torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-9)
    # Every layer removed exactly r tokens from every image.
    assert (merged.tokens_per_layer.diff(dim=1) == -r).all()


# 4. Eager and SDPA attention agree with the proportional bias and padding. ---------------------------
def test_eager_and_sdpa_agree(tiny):
    pixels = tiny.images(4)
    policy = MergePolicy(thresholds=tiny.thresholds(pixels))
    with torch.no_grad():
        sdpa = tiny.backbone.merged_forward(tiny.model, pixels, policy, backend="sdpa")
        eager = tiny.backbone.merged_forward(tiny.model, pixels, policy, backend="eager")
    assert len(set(sdpa.lengths.tolist())) > 1, "the batch should be padded for this test to mean anything"
    assert torch.equal(sdpa.group, eager.group)
    torch.testing.assert_close(sdpa.tokens, eager.tokens, rtol=1e-4, atol=1e-5)


# 6. Bad input names the backbone and its layer count. -----------------------------------------------
def test_wrong_threshold_count_is_a_clear_error(tiny):
    name, layers = tiny.backbone.name, tiny.num_layers
    pixels = tiny.images(1)
    expected = rf"backbone '{name}' \({layers} layers\) needs {layers} thresholds, one per layer, got {layers - 1}"
    with pytest.raises(ValueError, match=expected):
        tiny.backbone.merged_forward(tiny.model, pixels, MergePolicy(thresholds=[0.5] * (layers - 1)))
    with pytest.raises(ValueError, match=expected):
        tiny.backbone.patch(tiny.model, MergePolicy(thresholds=[0.5] * (layers - 1)))
    assert not is_patched(tiny.model)


def test_nan_threshold_is_a_clear_error(tiny):
    name, layers = tiny.backbone.name, tiny.num_layers
    thresholds = [0.5] * layers
    thresholds[1] = float("nan")
    with pytest.raises(ValueError, match=rf"threshold for layer 1 of backbone '{name}' \({layers} layers\) is NaN"):
        tiny.backbone.patch(tiny.model, MergePolicy(thresholds=thresholds))


def test_num_blocks_stops_early_without_final_norm(tiny):
    """LLaVA-style features: the first k blocks' output, with no final norm."""
    pixels = tiny.images(2)
    with torch.no_grad():
        merged = tiny.backbone.merged_forward(tiny.model, pixels, MergePolicy.off(), num_blocks=tiny.num_layers - 1)
        x = tiny.backbone.embed(tiny.model, pixels)
    assert merged.tokens_per_layer.shape[1] == tiny.num_layers
    assert merged.tokens.shape == x.shape
    with pytest.raises(ValueError, match=rf"num_blocks=0 is out of range for backbone '{tiny.backbone.name}'"):
        tiny.backbone.merged_forward(tiny.model, pixels, MergePolicy.off(), num_blocks=0)
