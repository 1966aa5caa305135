"""Property tests: the calibration cut ranked across processes equals the single-process cut, for any split.

The processes are emulated in one: each "rank" runs :class:`GlobalBatchCut` on its share once to
produce what it would send, then once more with a gather that returns everybody's payloads, which is
what ``all_gather`` hands back. The cut is a value of the pooled scores (the (k+1)-th best), so the
comparison is exact, ties and ``-inf`` edges included.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dymu_lightning.core import local_batch_cut
from dymu_lightning.core.calibration import GlobalBatchCut

pytestmark = pytest.mark.usefixtures("one_thread")

# Few distinct values, so that ties (also across images and ranks) are common; -inf: protected or
# padding tokens, which have no edge.
edge_scores = st.sampled_from([float("-inf"), -0.5, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0]) | st.floats(-1.0, 1.0)


@st.composite
def split_batches(draw) -> dict:
    """A global batch of images with ``Na`` edges each, dealt to ``W`` ranks in any order, each rank
    holding ``b`` rows; rows beyond the real images are padding with arbitrary (even winning) scores."""
    world = draw(st.integers(1, 4))
    local = draw(st.integers(1, 4))
    images = draw(st.integers(0, world * local))
    edges = draw(st.integers(1, 5))
    scores = draw(st.lists(st.lists(edge_scores, min_size=edges, max_size=edges), min_size=images, max_size=images))
    slots = draw(st.permutations(range(world * local)))  # where each image lands (first `images` slots used)
    r = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    garbage = draw(st.sampled_from([2.0, float("-inf"), 0.5]))
    return {
        "world": world,
        "local": local,
        "edges": edges,
        "scores": scores,
        "slots": slots,
        "r": r,
        "garbage": garbage,
    }


def _rank_inputs(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank, ``[b, Na]`` scores and ``[b]`` valid."""
    world, local = batch["world"], batch["local"]
    grid = torch.full((world * local, batch["edges"]), batch["garbage"], dtype=torch.float64)
    valid = torch.zeros(world * local, dtype=torch.bool)
    for image, row in enumerate(batch["scores"]):
        grid[batch["slots"][image]] = torch.tensor(row, dtype=torch.float64)
        valid[batch["slots"][image]] = True
    return list(zip(grid.split(local), valid.split(local), strict=True))


def _distributed_cuts(batch: dict, layer: int) -> tuple[list[torch.Tensor], list[int]]:
    """Every rank's cut at ``layer`` and the bytes each sent."""
    ranks = _rank_inputs(batch)
    images = len(batch["scores"])
    payloads = []
    for scores, valid in ranks:  # round 1: what each rank sends
        cut = GlobalBatchCut(batch["r"], valid, images, gather=lambda t: payloads.append(t.clone()) or t)
        cut(layer, scores, k=scores.shape[0] * batch["r"][layer])
    gathered = torch.cat(payloads)
    cuts, sent = [], []
    for scores, valid in ranks:  # round 2: each rank ranks the gathered payloads
        cut = GlobalBatchCut(batch["r"], valid, images, gather=lambda t: gathered)
        cuts.append(cut(layer, scores, k=scores.shape[0] * batch["r"][layer]))
        sent.extend(cut.bytes_sent)
    return cuts, sent


@settings(max_examples=4 * settings.default.max_examples)  # a few ms each
@given(batch=split_batches())
def test_global_cut_equals_the_single_process_cut_for_any_split(batch):
    images = len(batch["scores"])
    whole = torch.tensor(batch["scores"], dtype=torch.float64).reshape(images, batch["edges"])
    for layer, r in enumerate(batch["r"]):
        expected = local_batch_cut(layer, whole, images * r)
        cuts, sent = _distributed_cuts(batch, layer)
        for cut in cuts:  # every rank finds the same cut, the single-process one
            assert cut.dtype == whole.dtype and cut.shape == ()
            assert float(cut) == float(expected)
        assert len(set(sent)) == 1  # fixed-size payloads: all_gather never sees uneven shapes
        # When the cut value is no other edge's too, exactly k edges of the real images merge (all of them if fewer).
        finite = whole[torch.isfinite(whole)]
        merged = int((whole > expected).sum())
        if int((finite == expected).sum()) == 1 or float(expected) == float("-inf"):
            assert merged == min(images * r, finite.numel())
            event("exact count")
        else:
            assert merged <= images * r
            event("tie at the cut")
