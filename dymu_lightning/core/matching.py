"""Bipartite soft matching: each token of set A proposes one merge, with its most similar B token.

Within each image the current tokens alternate between the sets: even positions form A, odd
positions form B. Every A token keeps one edge, its best B partner by cosine similarity of the
attention keys (averaged over heads). Protected prefix tokens (CLS, registers) and padding take part
in no edge: their scores are ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` promoted to at least float32 (sums and similarities in bf16 are too coarse), in plain
    Python: ``torch.promote_types`` is a dispatcher call of its own, once per layer and use."""
    return dtype if dtype.is_floating_point and dtype.itemsize >= 4 else torch.float32


@dataclass(frozen=True)
class Edges:
    """One candidate merge per A token.

    Attributes:
        scores: ``[B, Na]`` float32 (float64 for float64 keys), cosine similarity to the best B
            token; ``-inf`` where the A token is protected, padding, or has no eligible partner.
        partner: ``[B, Na]`` long, index of that B token among the B tokens (position ``2 * j + 1``).
    """

    scores: Tensor
    partner: Tensor

    @property
    def eligible(self) -> Tensor:
        """``[B, Na]`` bool, edges that may merge at all."""
        return torch.isfinite(self.scores)


def bipartite_edges(
    keys: Tensor, valid: Tensor, num_protected: int, segments: Tensor | None = None, blocked: Tensor | None = None
) -> Edges:
    """Best B partner for every A token.

    Args:
        keys: ``[B, L, d]`` attention keys averaged over heads, in the padded grid.
        valid: ``[B, L]`` bool, real tokens (a prefix of each row).
        num_protected: leading tokens of every image that never merge (CLS, registers).
        segments: optional ``[B, L]`` long, a segment id per token (e.g. the attention window it
            sits in); an A token may only pair with a B token of its own segment, so no merged
            token ever spans two segments.
        blocked: optional ``[B, L]`` bool, ``~valid`` with the first ``num_protected`` columns set,
            if the caller has it already (capacity states build it in one comparison).

    Returns:
        :class:`Edges` with ``Na = ceil(L / 2)`` entries per image.
    """
    batch, length, _ = keys.shape
    # Similarities are compared against calibrated thresholds, so compute them in float32
    # whatever the model runs in: a bf16 cosine is too coarse to rank edges reliably.
    unit = F.normalize(keys.to(accumulation_dtype(keys.dtype)), dim=-1)
    # One mask for both sets, built in two ops (each a kernel launch on a GPU), unless given.
    if blocked is None:
        blocked = ~valid
        blocked[:, :num_protected] = True
    a_blocked, b_blocked = blocked[:, 0::2], blocked[:, 1::2]
    num_a = a_blocked.shape[1]
    if b_blocked.shape[1] == 0:
        scores = unit.new_full((batch, num_a), float("-inf"))
        return Edges(scores, torch.zeros(batch, num_a, dtype=torch.long, device=keys.device))

    similarity = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
    similarity.masked_fill_(b_blocked[:, None, :], float("-inf"))
    if segments is not None:
        similarity.masked_fill_(segments[:, 0::2, None] != segments[:, None, 1::2], float("-inf"))
    scores, partner = similarity.max(dim=-1)
    scores.masked_fill_(a_blocked, float("-inf"))  # the max's own output: no copy
    return Edges(scores, partner)
