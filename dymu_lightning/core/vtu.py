"""Virtual token unmerging (VTU): RoPE attention as if every merged token were still its full group.

A language-model sequence has N *virtual* positions (text plus the full visual grid) but only N_un
distinct *rows*: text tokens are singletons, and each merged visual token stands for its group of
patches. Position-wise layers (norms, projections, MLP) commute with copying rows to positions, so they
run on the N_un rows. Attention cannot: it runs on the N positions, with RoPE at the positions the full
sequence would have had and the usual causal mask, and its outputs are averaged back over each row's
positions. Nothing of size N x N x d is ever built: q, k and v are gathered to ``[B, H, N, d]`` and
the attention product is left to SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class VirtualLayout:
    """How the rows of a batch map to virtual positions.

    Attributes:
        expand: ``[B, N]`` long, the row behind each virtual position.
        positions: ``[B, N]`` long, the RoPE position of each virtual position.
        valid: ``[B, N]`` bool, False for padding positions.
        num_rows: ``N_un``, rows per sample (samples with fewer rows are padded).
    """

    expand: Tensor
    positions: Tensor
    valid: Tensor
    num_rows: int

    def __post_init__(self) -> None:
        # Decided once per layout (one host sync), so that unpadded batches take SDPA's causal kernel.
        object.__setattr__(self, "padded", not bool(self.valid.all()))
        # Every layer averages over the same groups: count their members once.
        counts = torch.zeros(self.expand.shape[0], self.num_rows, device=self.expand.device)
        object.__setattr__(self, "_counts", counts.scatter_add_(1, self.expand, self.valid.float()))

    @classmethod
    def singletons(cls, batch: int, length: int, device: torch.device | None = None) -> VirtualLayout:
        """Every row its own position, positions 0..N-1: VTU is then plain attention."""
        index = torch.arange(length, device=device).expand(batch, -1)
        return cls(index, index, torch.ones(batch, length, dtype=torch.bool, device=device), length)

    def counts(self) -> Tensor:
        """``[B, N_un]`` float, valid virtual positions per row (0 for padding rows)."""
        return self._counts

    def to_positions(self, rows: Tensor) -> Tensor:
        """``[B, N_un, *F]`` -> ``[B, N, *F]``: copy each row to its positions."""
        index = self.expand.reshape(*self.expand.shape, *([1] * (rows.dim() - 2)))
        return rows.gather(1, index.expand(-1, -1, *rows.shape[2:]))

    def to_rows(self, values: Tensor) -> Tensor:
        """``[B, N, *F]`` -> ``[B, N_un, *F]``: the mean over each row's valid positions."""
        weights = self.valid.to(values.dtype).reshape(*self.valid.shape, *([1] * (values.dim() - 2)))
        index = self.expand.reshape(*self.expand.shape, *([1] * (values.dim() - 2))).expand_as(values)
        sums = values.new_zeros(values.shape[0], self.num_rows, *values.shape[2:]).scatter_add_(
            1, index, values * weights
        )
        counts = self.counts().to(values.dtype).clamp(min=1)
        return sums / counts.reshape(*counts.shape, *([1] * (values.dim() - 2)))

    def causal_mask(self) -> Tensor | None:
        """``[B, 1, N, N]`` bool: position i sees position j when j <= i in sequence order and j is
        valid. A padding query sees itself only, so no row of the softmax is empty. None when nothing
        is padded: plain causal attention then applies."""
        if not self.padded:
            return None
        length = self.expand.shape[1]
        order = torch.arange(length, device=self.expand.device)
        causal = order[None, :] <= order[:, None]
        mask = causal[None] & self.valid[:, None, :]
        mask = mask | (torch.eye(length, dtype=torch.bool, device=mask.device)[None] & ~self.valid[:, :, None])
        return mask[:, None]


def rotate_half(x: Tensor) -> Tensor:
    """The rotation RoPE pairs dimension i with i + d/2 (the Llama-family convention)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x``: ``[B, H, N, d]``; ``cos``, ``sin``: ``[B, N, d]`` for the virtual positions."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def vtu_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: VirtualLayout, cos: Tensor, sin: Tensor, scale: float
) -> Tensor:
    """Attention of the rows as if they were expanded to their virtual positions.

    Args:
        q: ``[B, N_un, Hq, d]`` query rows (before RoPE).
        k, v: ``[B, N_un, Hkv, d]`` key and value rows (before RoPE); Hq is a multiple of Hkv (GQA).
        layout: rows -> virtual positions.
        cos, sin: ``[B, N, d]`` RoPE tables at the virtual positions.
        scale: logit scale.

    Returns:
        ``[B, N_un, Hq * d]``: for each row, the mean attention output over its positions.
    """
    q, k, v = (layout.to_positions(t).transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = layout.causal_mask()
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    rows = layout.to_rows(out.transpose(1, 2))  # [B, N_un, Hq, d]
    return rows.flatten(2)
