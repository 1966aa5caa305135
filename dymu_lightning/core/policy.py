"""Which edges merge at a layer: thresholds (DyMU inference), fixed r (ToMe), or batch top-k.

All three select, per image, a prefix of that image's edges sorted by score, so the optional
per-image caps (at most ``max_merges`` per layer, at least ``min_tokens`` left) are one more prefix
cut on the same ranking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dymu_lightning.core.matching import Edges

Mode = Literal["threshold", "fixed_r", "batch_topk"]
MODES: tuple[str, ...] = ("threshold", "fixed_r", "batch_topk")

# (layer, scores [B, Na], k) -> 0-d tensor: the score that the (k+1)-th best edge of the batch has.
BatchCut = Callable[[int, Tensor, int], Tensor]


@dataclass(frozen=True)
class LayerMerges:
    """What one layer decided, handed to ``MergePolicy.on_layer`` (calibration listens here).

    Attributes:
        layer: block index.
        edges: the layer's :class:`Edges` (``[B, Na]``).
        merge: ``[B, Na]`` bool, the edges that merged.
        cut: 0-d tensor, the batch cut score in ``batch_topk`` mode (``-inf`` when every eligible
            edge merged), else None.
    """

    layer: int
    edges: Edges
    merge: Tensor
    cut: Tensor | None

    @property
    def batch_threshold(self) -> Tensor | None:
        """The paper's per-batch threshold: the best edge that did not merge, clamped to >= 0."""
        if self.cut is None:
            return None
        return self.cut.clamp(min=0.0)


@dataclass
class MergePolicy:
    """How every layer of an encoder merges.

    Args:
        mode: ``"threshold"`` merges every edge whose score is strictly above the layer's threshold;
            ``"fixed_r"`` merges each image's ``r`` best edges; ``"batch_topk"`` merges the
            ``B * r`` best edges of the whole batch, each in its own image (calibration).
        thresholds: per-layer thresholds for ``"threshold"`` mode; ``None`` or ``inf`` = the layer
            never merges.
        r: merges per image per layer for ``"fixed_r"`` and ``"batch_topk"``; an int for every layer
            or one per layer.
        max_merges: optional per-image cap on merges in one layer.
        min_tokens: optional per-image floor on the tokens left (protected ones included).
        batch_cut: replaces the local ``batch_topk`` cut, e.g. by one ranked across processes.
        on_layer: called after each merging layer with a :class:`LayerMerges`.
    """

    mode: Mode = "threshold"
    thresholds: Sequence[float | None] | None = None
    r: int | Sequence[int] | None = None
    max_merges: int | None = None
    min_tokens: int | None = None
    batch_cut: BatchCut | None = field(default=None, repr=False)
    on_layer: Callable[[LayerMerges], None] | None = field(default=None, repr=False)

    @classmethod
    def off(cls) -> MergePolicy:
        """No layer merges: the patched encoder computes what the stock one does."""
        return cls(mode="fixed_r", r=0)

    def validate(self, num_layers: int, backbone: str) -> None:
        """Raise ValueError if this policy cannot drive ``backbone`` with ``num_layers`` blocks."""
        where = f"backbone '{backbone}' ({num_layers} layers)"
        if self.mode not in MODES:
            raise ValueError(f"unknown merge mode {self.mode!r} for {where}; expected one of {MODES}")
        if self.mode == "threshold":
            if self.thresholds is None:
                raise ValueError(f"mode 'threshold' needs thresholds for {where}")
            if len(self.thresholds) != num_layers:
                raise ValueError(f"{where} needs {num_layers} thresholds, one per layer, got {len(self.thresholds)}")
            for layer, value in enumerate(self.thresholds):
                if value is not None and math.isnan(float(value)):
                    raise ValueError(f"threshold for layer {layer} of {where} is NaN")
        else:
            if self.r is None:
                raise ValueError(f"mode {self.mode!r} needs r for {where}")
            if not isinstance(self.r, int) and len(self.r) != num_layers:
                raise ValueError(f"{where} needs {num_layers} values of r, one per layer, got {len(self.r)}")
            if any(value < 0 for value in self._r_list(num_layers)):
                raise ValueError(f"r must be >= 0 for {where}, got {self.r}")
        for name in ("max_merges", "min_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 for {where}, got {value}")

    def _r_list(self, num_layers: int) -> list[int]:
        if isinstance(self.r, int):
            return [self.r] * num_layers
        return [int(v) for v in self.r]

    def threshold(self, layer: int) -> float:
        value = self.thresholds[layer]
        return math.inf if value is None else float(value)

    def r_at(self, layer: int) -> int:
        return self.r if isinstance(self.r, int) else int(self.r[layer])

    def merges_at(self, layer: int) -> bool:
        """False when the layer provably merges nothing, so its matching can be skipped."""
        if self.max_merges == 0:
            return False
        if self.mode == "threshold":
            return self.threshold(layer) != math.inf
        return self.r_at(layer) > 0

    def select(self, layer: int, edges: Edges, lengths: Tensor) -> LayerMerges:
        """Decide the merges of one layer.

        Args:
            layer: block index.
            edges: :class:`Edges` with ``[B, Na]`` scores.
            lengths: ``[B]`` long, current tokens per image (for the ``min_tokens`` floor).
        """
        scores = edges.scores
        cut = None
        rank = None
        if self.mode == "threshold":
            merge = scores > self.threshold(layer)
        elif self.mode == "fixed_r":
            rank = rank_within_image(scores)
            merge = (rank < self.r_at(layer)) & edges.eligible
        else:
            k = scores.shape[0] * self.r_at(layer)
            cut = (self.batch_cut or local_batch_cut)(layer, scores, k)
            merge = scores > cut

        cap = self._per_image_cap(lengths)
        if cap is not None:
            rank = rank_within_image(scores) if rank is None else rank
            merge = merge & (rank < cap[:, None])
        return LayerMerges(layer=layer, edges=edges, merge=merge, cut=cut)

    def _per_image_cap(self, lengths: Tensor) -> Tensor | None:
        """``[B]`` long, the most merges each image may make at this layer, or None."""
        caps = []
        if self.max_merges is not None:
            caps.append(torch.full_like(lengths, self.max_merges))
        if self.min_tokens is not None:
            caps.append((lengths - self.min_tokens).clamp(min=0))
        if not caps:
            return None
        return torch.stack(caps).amin(dim=0)


def rank_within_image(scores: Tensor) -> Tensor:
    """``[B, Na]`` long, 0 for each image's best edge. Ties go to the earlier token, so the
    ranking, like everything else per image, does not depend on the batch."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def local_batch_cut(layer: int, scores: Tensor, k: int) -> Tensor:
    """The (k+1)-th best score of the batch's pooled edges; ``-inf`` if fewer than k+1 can merge.

    ``scores > cut`` then selects exactly the top k (barring ties at the cut)."""
    flat = scores.flatten()
    if k >= flat.numel():
        return flat.new_tensor(float("-inf"))
    return torch.topk(flat, k + 1, sorted=True).values[-1]
