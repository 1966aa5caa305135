"""Conformance checks for a backbone adapter: run them on a new adapter before trusting it.

``check_backbone`` asserts the properties that every built-in adapter is tested for (see
tests/test_backbones.py for the full versions): merging off equals the stock model, unpatching
restores it, an image's result does not depend on its batch-mates, sizes equal group counts, and
proportional attention as widened heads (folded into the projections where ``BlockParts.linears``
describes them: the form GPUs run) equals the bias form.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dymu_lightning.backbones.base import Backbone, is_patched
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy


def check_backbone(backbone: Backbone, model: nn.Module, pixels: Tensor, r: int = 4, atol: float = 1e-5) -> None:
    """Assert the adapter's core properties on ``model`` with ``pixels`` (``[B, 3, H, W]``, B >= 2).

    Raises AssertionError naming the property that failed.
    """
    assert pixels.shape[0] >= 2, "check_backbone needs at least two images"
    with torch.no_grad():
        stock = backbone.stock_features(model, pixels)
        off = backbone.merged_forward(model, pixels, MergePolicy.off())
        assert off.tokens.shape == stock.shape, f"merging off: shape {off.tokens.shape} != stock {stock.shape}"
        error = (off.tokens - stock).abs().max().item()
        assert error <= atol, f"merging off differs from the stock model by {error:.2e}"

        # A nudge above each batch threshold keeps rounding from deciding a tie at the threshold.
        thresholds = [t + 1e-6 for t in batch_thresholds(backbone, model, pixels, r)]
        policy = MergePolicy(thresholds=thresholds)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        backbone.patch(model, policy)
        batch = model(pixels)
        backbone.unpatch(model)
        assert not is_patched(model), "unpatch left the model patched"
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "patching changed weights"
        assert torch.equal(backbone.stock_features(model, pixels), stock), "unpatch did not restore the forward"
        assert int(batch.lengths.sum()) < stock.shape[0] * stock.shape[1], "nothing merged at the batch thresholds"

        for b in range(pixels.shape[0]):
            alone = backbone.merged_forward(model, pixels[b : b + 1], policy)
            n = int(batch.lengths[b])
            assert int(alone.lengths[0]) == n, f"image {b}: {int(alone.lengths[0])} tokens alone, {n} in the batch"
            assert torch.equal(alone.group[0], batch.group[b]), f"image {b}: group map depends on the batch"
            error = (alone.tokens[0, :n] - batch.tokens[b, :n]).abs().max().item()
            assert error <= atol, f"image {b}: tokens differ by {error:.2e} alone and in the batch"
            counts = torch.bincount(batch.group[b], minlength=n).float()
            counts[: batch.num_prefix] += 1
            assert torch.equal(batch.sizes[b, :n], counts), f"image {b}: sizes are not the group counts"

        bias = backbone.merged_forward(model, pixels, policy, widened=False)
        widened = backbone.merged_forward(model, pixels, policy, widened=True)
        assert torch.equal(widened.tokens_per_layer, bias.tokens_per_layer), "widened heads merge differently"
        error = (widened.tokens - bias.tokens).abs().max().item()
        assert error <= atol, f"widened heads differ from the bias form by {error:.2e}: check BlockParts.linears"
