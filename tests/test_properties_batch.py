"""Property tests: an image's merged tokens, sizes and group map do not depend on its batch-mates, for
random batch compositions on every registered backbone (its tiny random models), and sizes are the
group counts. Each example runs two compositions that share images (one is often an image alone).

In float64, through ``Backbone.merged_forward`` only. Group maps, sizes and token counts must be
equal; tokens agree to 1e-10 (batched and single-image kernels may sum in another order). Thresholds
sit 1e-6 above a calibration edge, so no decision falls within rounding of one.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dymu_lightning.backbones import get_backbone, list_backbones
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergedTokens, MergePolicy

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    pytest.param(name, tiny.name, id=f"{name}-{tiny.name}")
    for name in list_backbones()
    for tiny in get_backbone(name).tiny_configs()
]


@cache
def _model(name: str, config_name: str):
    """The tiny model in float64, its image size, and thresholds calibrated on a fixed mixed batch."""
    backbone = get_backbone(name)
    config = {t.name: t.config for t in backbone.tiny_configs()}[config_name]
    torch.manual_seed(0)
    model = backbone.build(config).double().eval()
    size = int(getattr(getattr(model, "config", None), "image_size", 0) or config.get("img_size"))
    pool = torch.stack([_image(recipe, size) for recipe in ((2, 0.0, 0), (4, 0.05, 1), (1, 1.0, 2), (8, 0.02, 3))])
    thresholds = batch_thresholds(backbone, model, pool, r=6)
    return backbone, model, size, thresholds


def _image(recipe: tuple[int, float, int], size: int) -> torch.Tensor:
    """``[3, S, S]`` float64: a ``coarse x coarse`` colour field blown up (few distinct patches for a
    small ``coarse``) plus ``noise`` times white noise."""
    coarse, noise, seed = recipe
    generator = torch.Generator().manual_seed(seed)
    field = F.interpolate(
        torch.randn(1, 3, coarse, coarse, generator=generator, dtype=torch.float64), size=size, mode="bilinear"
    )
    return field[0] + noise * torch.randn(3, size, size, generator=generator, dtype=torch.float64)


recipes = st.tuples(st.sampled_from([1, 2, 3, 4, 8]), st.sampled_from([0.0, 0.02, 0.3, 1.0]), st.integers(0, 3))


@st.composite
def policies(draw, thresholds: list[float]) -> MergePolicy:
    mode = draw(st.sampled_from(["threshold", "fixed_r", "capped"]))
    if mode == "fixed_r":
        return MergePolicy(mode="fixed_r", r=draw(st.integers(1, 16)))
    shift = draw(st.sampled_from([-0.02, -0.005, 0.0, 0.003]))  # more or fewer merges than calibrated
    shifted = [t + shift + 1e-6 for t in thresholds]
    if mode == "threshold":
        return MergePolicy(thresholds=shifted)
    return MergePolicy(thresholds=shifted, max_merges=draw(st.integers(0, 8)), min_tokens=draw(st.integers(0, 50)))


def _image_result(merged: MergedTokens, b: int) -> tuple[torch.Tensor, ...]:
    n = int(merged.lengths[b])
    return merged.tokens[b, :n], merged.sizes[b, :n], merged.group[b], merged.tokens_per_layer[b]


@st.composite
def two_batches(draw) -> tuple[list, list]:
    """Two compositions that share images: a batch of 2..4 (repeats allowed) and another made of some
    of the same images, plus possibly others, in another order; often a single image alone."""
    first = draw(st.lists(recipes, min_size=2, max_size=4), label="first")
    shared = draw(st.lists(st.sampled_from(first), min_size=1, max_size=3), label="shared")
    others = draw(st.lists(recipes, max_size=2), label="others")
    second = draw(st.permutations(shared + others), label="second")
    return first, second


@pytest.mark.parametrize("name,config_name", CASES)
@settings(max_examples=max(3, settings.default.max_examples // 2))
@given(data=st.data())
def test_an_image_merges_the_same_in_any_batch(name, config_name, data):
    backbone, model, size, thresholds = _model(name, config_name)
    compositions = data.draw(two_batches())
    policy = data.draw(policies(thresholds), label="policy")
    backend = data.draw(st.sampled_from(["sdpa", "eager"]), label="backend")
    layers = len(thresholds)  # all of them, with the final norm, or LLaVA-style the first few without
    num_blocks = data.draw(st.none() | st.integers(1, layers), label="num_blocks")
    results = {}  # recipe -> (composition, result) of its first occurrence
    with torch.no_grad():
        for which, batch in enumerate(compositions):
            pixels = torch.stack([_image(recipe, size) for recipe in batch])
            merged = backbone.merged_forward(model, pixels, policy, backend=backend, num_blocks=num_blocks)
            event("variable lengths" if len(set(merged.lengths.tolist())) > 1 else "equal lengths")
            if len(batch) == 1:
                event("an image alone")
            full = merged.tokens_per_layer[0, 0]
            for b, recipe in enumerate(batch):
                tokens, sizes, group, counts = _image_result(merged, b)
                # sizes are the group counts (prefix tokens stand for themselves): nothing lost
                expected_sizes = torch.bincount(group, minlength=sizes.shape[0]).float()
                expected_sizes[: merged.num_prefix] += 1
                assert torch.equal(sizes, expected_sizes)
                assert int(sizes.sum()) == full
                if recipe not in results:
                    results[recipe] = (which, (tokens, sizes, group, counts))
                    continue
                # the same image elsewhere in this batch, or in the other one
                where, (tokens0, sizes0, group0, counts0) = results[recipe]
                event("compared across batches" if where != which else "compared within a batch")
                assert torch.equal(counts0, counts), f"{recipe}: token counts per layer depend on the batch"
                assert torch.equal(group0, group), f"{recipe}: group map depends on the batch"
                assert torch.equal(sizes0, sizes)
                torch.testing.assert_close(tokens0, tokens, rtol=0, atol=1e-10)
