"""Property tests: the calibration cut ranked across processes equals the single-process cut, for any split.

The processes are emulated in one: each "rank" runs :class:`GlobalBatchCut` on its share once to
produce what it would send, then once more with a gather that returns everybody's payloads, which is
what ``all_gather`` hands back. The cut is a value of the pooled scores (the (k+1)-th best), so the
comparison is exact, ties and ``-inf`` edges included. Then the whole rule through a real tiny
encoder, its ranks run as threads with a blocking all-gather: the thresholds (to 1e-12, float64) and
every image's token counts (exactly) do not depend on the split.
"""

from __future__ import annotations

import threading
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dymu_lightning.backbones import get_backbone
from dymu_lightning.core import MergePolicy, local_batch_cut
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


# ----- the whole encoder, ranks emulated by threads -------------------------------------------------------------------


class ThreadGroup:
    """``world`` ranks as threads of this process, with an all-gather that behaves like the real one:
    every rank blocks until all have contributed, then gets everybody's tensors in rank order."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=120)

    def gather(self, rank: int):
        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()  # everybody has written
            gathered = torch.cat(self.slots)
            self.barrier.wait()  # everybody has read: the slots may be reused
            return gathered

        return all_gather

    def run(self, work) -> list:
        results: list = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = work(rank, self.gather(rank))
            except BaseException as error:  # surface it in the test, and release the other ranks
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@cache
def _tiny_vit():
    backbone = get_backbone("timm_vit")
    torch.manual_seed(0)
    model = backbone.build(backbone.tiny_configs()[0].config).double().eval()
    return backbone, model, model.patch_embed.img_size[0]


def _images(seeds: list[int], size: int) -> torch.Tensor:
    """Smooth (even seed) and noisy (odd seed) images, ``[n, 3, S, S]`` float64."""
    out = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        if seed % 2 == 0:
            coarse = torch.randn(1, 3, 2 + seed % 3, 2 + seed % 3, generator=generator, dtype=torch.float64)
            out.append(F.interpolate(coarse, size=size, mode="bilinear")[0])
        else:
            out.append(torch.randn(3, size, size, generator=generator, dtype=torch.float64))
    return torch.stack(out)


@st.composite
def calibration_splits(draw) -> dict:
    """Distinct images (repeats would tie edges exactly at the cut) dealt to ranks in any order."""
    world = draw(st.integers(1, 3))
    local = draw(st.integers(1, 3))
    images = draw(st.integers(1, world * local))
    return {
        "world": world,
        "local": local,
        "seeds": draw(st.lists(st.integers(0, 40), min_size=images, max_size=images, unique=True)),
        "slots": draw(st.permutations(range(world * local))),
        "r": draw(st.lists(st.integers(0, 12), min_size=3, max_size=3)),
    }


@settings(max_examples=max(3, settings.default.max_examples // 3))
@given(split=calibration_splits())
def test_calibration_thresholds_and_counts_do_not_depend_on_the_split(split):
    """DyMU's calibration rule over the global batch (top B*r edges per layer, threshold = best edge
    left), run by W emulated ranks through the real encoder, equals one process on the whole batch."""
    backbone, model, size = _tiny_vit()
    world, local, r = split["world"], split["local"], split["r"]
    pixels = _images(split["seeds"], size)
    images = pixels.shape[0]

    def calibrate(x: torch.Tensor, cut=None) -> tuple[dict, torch.Tensor]:
        found = {}
        record = lambda merges: found.__setitem__(merges.layer, float(merges.batch_threshold))  # noqa: E731
        policy = MergePolicy(mode="batch_topk", r=r, batch_cut=cut, on_layer=record)
        with torch.no_grad():
            return found, backbone.merged_forward(model, x, policy).tokens_per_layer

    whole_thresholds, whole_counts = calibrate(pixels)
    # rank-major rows: image i in row slots[i]; the other rows are padding (zero images, not valid)
    rows = torch.zeros(world * local, *pixels.shape[1:], dtype=pixels.dtype)
    valid = torch.zeros(world * local, dtype=torch.bool)
    rows[list(split["slots"][:images])] = pixels
    valid[list(split["slots"][:images])] = True

    def rank_work(rank: int, gather) -> tuple[dict, torch.Tensor]:
        part = slice(rank * local, (rank + 1) * local)
        return calibrate(rows[part], GlobalBatchCut(r, valid[part], images, gather=gather))

    results = ThreadGroup(world).run(rank_work)
    counts = torch.cat([c for _, c in results])[valid]  # the real images, in row order
    order = sorted(range(images), key=lambda i: split["slots"][i])
    assert torch.equal(counts, whole_counts[order]), "an image's token counts depend on the split"
    # each layer merged the batch's B * r best edges, unevenly over its images (no ties here)
    assert (whole_counts[:, :-1] - whole_counts[:, 1:]).sum(dim=0).tolist() == [images * k for k in r]
    for thresholds, _ in results:  # every rank records the same thresholds, the single-process ones
        assert thresholds.keys() == whole_thresholds.keys()
        for layer, value in whole_thresholds.items():
            assert thresholds[layer] == pytest.approx(value, abs=1e-12)
