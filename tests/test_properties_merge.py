"""Property tests: merging conserves sizes and size-weighted sums, for any batch and any merge decisions.

With a block that is the identity, every token is the mean of the original tokens of its group, and
its size is the size of that group (DyMU / ToMe: a size-weighted mean of size-weighted means is the
plain mean of the originals). Sums of sizes are exact; the means are checked to 1e-12 in float64
(5e-6 in float32). Driven through the public entry points only: ``TokenState.start``,
``bipartite_edges`` and ``merge_tokens``, and ``run_blocks`` with identity blocks. Last, which edges
merge: ``MergePolicy.select`` against a ranking written out in Python.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from dymu_lightning.core import BlockParts, Edges, MergePolicy, TokenState, bipartite_edges, merge_tokens, run_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 5e-6}


def _check_groups(x0: torch.Tensor, num_prefix: int, tokens, sizes, lengths, group) -> None:
    """Each image's real tokens are the means of their groups of originals, and sizes count the groups.

    Args:
        x0: ``[B, N, C]`` the original tokens, prefix first.
        tokens: ``[B, L, C]`` padded tokens after merging; sizes ``[B, L]``; lengths ``[B]``;
            group ``[B, N - num_prefix]``, each patch's token.
    """
    batch, length, _ = x0.shape
    tol = TOLERANCE[x0.dtype]
    for b in range(batch):
        n = int(lengths[b])
        members = group[b].tolist()
        assert all(num_prefix <= m < n for m in members), "a patch points at a prefix or padding slot"
        counts = [1] * num_prefix + [members.count(position) for position in range(num_prefix, n)]
        assert sizes[b, :n].tolist() == counts, "sizes differ from the group counts"
        assert float(sizes[b].sum()) == length  # nothing lost, nothing doubled
        assert min(counts) >= 1, "a token stands for no original"
        torch.testing.assert_close(tokens[b, :num_prefix], x0[b, :num_prefix], rtol=0, atol=0)
        for position in range(num_prefix, n):
            originals = [num_prefix + i for i, m in enumerate(members) if m == position]
            expected = x0[b, originals].double().mean(dim=0).to(x0.dtype)
            torch.testing.assert_close(tokens[b, position], expected, rtol=tol, atol=tol)
        # the size-weighted sum of the image is the sum of its originals
        weighted = (tokens[b, :n].double() * sizes[b, :n, None].double()).sum(dim=0)
        torch.testing.assert_close(weighted, x0[b].double().sum(dim=0), rtol=tol, atol=tol * length)


@st.composite
def merge_runs(draw) -> dict:
    """A batch, its prefix, and per layer the probability that an eligible edge merges."""
    return {
        "batch": draw(st.integers(1, 5)),
        "length": draw(st.integers(1, 20)),
        "num_prefix": draw(st.integers(0, 2)),  # every token when the image is that short
        "channels": draw(st.integers(1, 4)),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
        "rates": draw(st.lists(st.sampled_from([0.0, 0.3, 0.7, 1.0]), min_size=1, max_size=5)),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(run=merge_runs())
def test_merge_tokens_keeps_group_means_and_sizes(run):
    """Random keys, random subsets of the eligible edges merging, layer after layer."""
    generator = torch.Generator().manual_seed(run["seed"])
    batch, length, num_prefix = run["batch"], run["length"], min(run["num_prefix"], run["length"])
    x0 = torch.randn(batch, length, run["channels"], generator=generator).to(run["dtype"])
    state = TokenState.start(x0, num_prefix)
    for rate in run["rates"]:
        layout = state.layout
        if layout.max_len < 2:  # merge_tokens needs a B token
            break
        valid = torch.arange(layout.max_len)[None, :] < layout.lengths[:, None]
        keys = torch.randn(batch, layout.max_len, 3, generator=generator).to(run["dtype"])
        edges = bipartite_edges(keys, valid, num_protected=num_prefix)
        merge = (torch.rand(edges.scores.shape, generator=generator) < rate) & edges.eligible
        before = layout.lengths.clone()
        state = merge_tokens(state, edges.partner, merge)
        event("variable lengths" if not state.layout.is_dense else "equal lengths")
        assert torch.equal(state.layout.lengths, before - merge.sum(dim=1))
        assert state.layout.max_len == int(state.layout.lengths.max())
        assert state.layout.total == int(state.layout.lengths.sum())
        padded_x, padded_sizes = state.layout.pad(state.x), state.layout.pad(state.sizes)
        assert padded_x.dtype == x0.dtype
        _check_groups(x0, num_prefix, padded_x, padded_sizes, state.layout.lengths, state.group)


def _identity_blocks(layers: int, heads: int, channels: int) -> list[BlockParts]:
    """Blocks whose residual branches add nothing: queries, keys and values are the tokens themselves,
    so matching sees the tokens, and the merges are the only thing that changes them."""

    def attn_in(x: torch.Tensor):
        h = x.reshape(x.shape[0], heads, channels // heads)
        return h, h, h

    def zero(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], channels)

    return [BlockParts(attn_in=attn_in, attn_out=zero, mlp=zero, scale=1.0) for _ in range(layers)]


@st.composite
def policies(draw, layers: int) -> MergePolicy:
    """Any mode and caps; the simplest choices (which a derandomized run tries first) merge something."""
    mode = draw(st.sampled_from(["threshold", "fixed_r", "batch_topk"]))
    caps = {
        "max_merges": draw(st.none() | st.integers(1, 4) | st.just(0)),
        "min_tokens": draw(st.none() | st.integers(0, 12)),
    }
    if mode == "threshold":
        values = st.floats(-1.0, 0.9, allow_nan=False) | st.none()  # None: the layer never merges
        return MergePolicy(thresholds=draw(st.lists(values, min_size=layers, max_size=layers)), **caps)
    r = draw(st.integers(1, 6) | st.lists(st.integers(0, 6), min_size=layers, max_size=layers))
    return MergePolicy(mode=mode, r=r, **caps)


@st.composite
def encoder_runs(draw) -> dict:
    layers = draw(st.integers(1, 4))
    return {
        "batch": draw(st.integers(1, 5)),
        "length": draw(st.integers(1, 16)),
        "num_prefix": draw(st.integers(0, 2)),  # every token when the image is that short
        "heads": draw(st.sampled_from([1, 2])),
        "layers": layers,
        "policy": draw(policies(layers)),
        "backend": draw(st.sampled_from(["sdpa", "eager"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(run=encoder_runs())
def test_identity_blocks_leave_each_token_the_mean_of_its_group(run):
    """The whole merged forward (``run_blocks``), every merge mode and cap, with identity blocks."""
    batch, length, layers, heads = run["batch"], run["length"], run["layers"], run["heads"]
    num_prefix = min(run["num_prefix"], length)
    channels = 2 * heads
    x0 = torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(run["seed"]))
    x0 = x0.double()
    merged_per_layer: dict[int, torch.Tensor] = {}
    record = lambda decision: merged_per_layer.setdefault(decision.layer, decision.merge.sum(dim=1))  # noqa: E731
    policy = replace(run["policy"], on_layer=record)
    policy.validate(layers, "identity")
    with torch.no_grad():
        out = run_blocks(x0, _identity_blocks(layers, heads, channels), policy, num_prefix, backend=run["backend"])

    event("some merges" if int(out.lengths.sum()) < batch * length else "no merge")
    counts = out.tokens_per_layer
    assert counts.shape == (batch, layers + 1)
    assert (counts[:, 0] == length).all()
    assert torch.equal(counts[:, -1], out.lengths)
    for layer in range(layers):
        removed = counts[:, layer] - counts[:, layer + 1]
        expected = merged_per_layer.get(layer, torch.zeros(batch, dtype=torch.long))
        assert torch.equal(removed, expected), "tokens removed differ from the merges decided"
        if policy.max_merges is not None:
            assert (removed <= policy.max_merges).all()
        if policy.min_tokens is not None:
            assert (counts[:, layer + 1] >= torch.clamp(counts[:, layer], max=policy.min_tokens)).all()
    mask = torch.arange(out.tokens.shape[1])[None, :] < out.lengths[:, None]
    assert torch.equal(out.mask, mask)
    assert torch.equal(out.packed, out.tokens[mask])
    assert (out.tokens[~mask] == 0).all() and (out.sizes[~mask] == 0).all()
    _check_groups(x0, num_prefix, out.tokens, out.sizes, out.lengths, out.group)


# ----- which edges merge ----------------------------------------------------------------------------------------------

scores_with_ties = st.sampled_from([float("-inf"), 0.0, 0.5, 0.9]) | st.floats(-1.0, 1.0)


@st.composite
def layer_decisions(draw) -> dict:
    batch, edges = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    return {
        "scores": draw(
            st.lists(st.lists(scores_with_ties, min_size=edges, max_size=edges), min_size=batch, max_size=batch)
        ),
        "lengths": draw(st.lists(st.integers(2 * edges - 1, 2 * edges), min_size=batch, max_size=batch)),
        "mode": draw(st.sampled_from(["threshold", "fixed_r", "batch_topk"])),
        "threshold": draw(st.sampled_from([0.0, 0.5]) | st.floats(-1.0, 1.0)),
        "r": draw(st.integers(0, 7)),
        "max_merges": draw(st.none() | st.integers(0, 6)),
        "min_tokens": draw(st.none() | st.integers(0, 12)),
    }


@given(case=layer_decisions())
def test_each_image_merges_a_prefix_of_its_own_ranking(case):
    """Per image: rank the edges by score, ties to the earlier A token; merge those above the threshold,
    or the image's r best that can merge, or those above the batch's top-k cut; at most ``max_merges``,
    and never below ``min_tokens`` tokens."""
    scores = torch.tensor(case["scores"], dtype=torch.float64)
    edges = Edges(scores, torch.zeros_like(scores, dtype=torch.long))
    policy = MergePolicy(
        mode=case["mode"],
        thresholds=[case["threshold"]],
        r=case["r"],
        max_merges=case["max_merges"],
        min_tokens=case["min_tokens"],
    )
    lengths = torch.tensor(case["lengths"])
    merge = policy.select(0, edges, lengths).merge
    for b, row in enumerate(case["scores"]):
        ranking = sorted(range(len(row)), key=lambda a: (-row[a], a))
        if case["mode"] == "threshold":
            chosen = [a for a in ranking if row[a] > case["threshold"]]
        elif case["mode"] == "batch_topk":  # above the batch's (k+1)-th best score, k = B * r
            pooled = sorted((s for image in case["scores"] for s in image), reverse=True)
            k = len(case["scores"]) * case["r"]
            cut = pooled[k] if k < len(pooled) else float("-inf")
            chosen = [a for a in ranking if row[a] > cut]
        else:
            chosen = [a for a in ranking[: case["r"]] if row[a] > float("-inf")]
        cap = len(row)
        if case["max_merges"] is not None:
            cap = min(cap, case["max_merges"])
        if case["min_tokens"] is not None:
            cap = min(cap, max(0, case["lengths"][b] - case["min_tokens"]))
        expected = sorted(a for a in chosen if ranking.index(a) < cap)
        assert merge[b].nonzero().flatten().tolist() == expected
