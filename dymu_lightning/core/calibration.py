"""Threshold calibration (DyMU Eq. 4), ranked over a global batch that may span processes.

Per layer, the batch's edges are pooled and the top ``k = B * r_l`` merge; the batch threshold is
the best edge left unmerged, clamped at 0. Thresholds are the mean over batches, accumulated in
float64 as a sum and a count (a running mean in low precision drifts, and a sum and count resume
exactly).

Across processes, the global batch is the union of the local batches. Each process contributes its
local top-(k+1) scores, padded with ``-inf`` to a fixed size so that every process sends the same
shape; the (k+1)-th best of the gathered scores is the global cut. The result does not depend on how
the global batch is split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Concatenates a same-shaped 1-D tensor from every process: [n] -> [world * n].
Gather = Callable[[Tensor], Tensor]


def no_gather(tensor: Tensor) -> Tensor:
    """The single-process :data:`Gather`."""
    return tensor


class GlobalBatchCut:
    """A ``MergePolicy.batch_cut`` that ranks each layer's edges over the global batch.

    Args:
        r: merges per image for every layer.
        valid: ``[B]`` bool, the real images of the local batch (padding rows take no part in the
            ranking; whatever they merge is discarded).
        global_images: real images in the global batch (the same on every process).
        gather: see :data:`Gather`.
    """

    def __init__(self, r: list[int], valid: Tensor, global_images: int, gather: Gather = no_gather) -> None:
        self.r = r
        self.valid = valid
        self.global_images = global_images
        self.gather = gather
        #: bytes each process sent, per layer (for the benchmarks' accounting)
        self.bytes_sent: list[int] = []

    def __call__(self, layer: int, scores: Tensor, k: int) -> Tensor:
        """0-d tensor: the global (k+1)-th best score, ``-inf`` if k edges or fewer can merge.

        ``k`` from the caller counts the local batch; the global one replaces it."""
        del k
        k = self.global_images * self.r[layer]
        pool = scores.masked_fill(~self.valid[:, None], float("-inf")).flatten()
        # Every process sends exactly k+1 scores, whatever its share of the edges.
        top = pool.new_full((k + 1,), float("-inf"))
        count = min(k + 1, pool.numel())
        top[:count] = torch.topk(pool, count, sorted=False).values
        gathered = self.gather(top).flatten()
        self.bytes_sent.append(top.numel() * top.element_size())
        return torch.topk(gathered, k + 1).values[-1]


class ThresholdStats:
    """Per-layer running sums of batch thresholds, in float64.

    ``mean()`` is the calibrated threshold; a layer that never merged has no threshold (None).
    """

    def __init__(self, num_layers: int) -> None:
        self.sum = torch.zeros(num_layers, dtype=torch.float64)
        self.count = torch.zeros(num_layers, dtype=torch.long)

    def add(self, layer: int, threshold: Tensor | float) -> None:
        self.sum[layer] += float(threshold)
        self.count[layer] += 1

    def mean(self) -> list[float | None]:
        return [float(s / c) if c > 0 else None for s, c in zip(self.sum.tolist(), self.count.tolist(), strict=True)]

    def state_dict(self) -> dict[str, Tensor]:
        return {"sum": self.sum.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["sum"].shape != self.sum.shape:
            raise ValueError(f"threshold state has {state['sum'].numel()} layers, expected {self.sum.numel()}")
        self.sum.copy_(state["sum"])
        self.count.copy_(state["count"])


class TokenStats:
    """Per-image token counts: mean, standard deviation, min, max and a histogram, mergeable across
    batches and resumable.

    Args:
        full: tokens per image without merging (the histogram has ``full + 1`` bins, one per count).
    """

    def __init__(self, full: int) -> None:
        self.full = full
        self.histogram = torch.zeros(full + 1, dtype=torch.long)

    def add(self, tokens: Tensor) -> None:
        """``tokens``: ``[n]`` counts of real images."""
        self.histogram += torch.bincount(tokens.long().cpu(), minlength=self.full + 1)[: self.full + 1]

    def summary(self) -> dict[str, float | int | None]:
        images = int(self.histogram.sum())
        if images == 0:
            return {"mean": None, "std": None, "min": None, "max": None, "images": 0, "full": self.full}
        values = torch.arange(self.full + 1, dtype=torch.float64)
        weights = self.histogram.double()
        mean = float((values * weights).sum() / images)
        variance = float((weights * (values - mean) ** 2).sum() / images)
        present = self.histogram.nonzero().flatten()
        return {
            "mean": mean,
            "std": variance**0.5,
            "min": int(present.min()),
            "max": int(present.max()),
            "images": images,
            "full": self.full,
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {"histogram": self.histogram.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["histogram"].shape != self.histogram.shape:
            raise ValueError(f"token histogram has {state['histogram'].numel()} bins, expected {self.full + 1}")
        self.histogram.copy_(state["histogram"])
