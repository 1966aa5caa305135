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

    def extend(self, positions: Tensor, valid: Tensor | None = None) -> VirtualLayout:
        """This layout with ``t`` new tokens appended, each its own new row.

        Args:
            positions: ``[B, t]`` RoPE positions of the new tokens.
            valid: ``[B, N + t]`` validity of every position afterwards (a generation attention
                mask); None keeps the old validity and marks the new tokens valid.
        """
        batch, new = positions.shape
        rows = self.num_rows + torch.arange(new, device=positions.device).expand(batch, -1)
        if valid is None:
            valid = torch.cat([self.valid, torch.ones_like(positions, dtype=torch.bool)], dim=1)
        return VirtualLayout(
            torch.cat([self.expand, rows], dim=1),
            torch.cat([self.positions, positions], dim=1),
            valid.bool(),
            self.num_rows + new,
        )

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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x``: ``[B, H, N, d]``; ``cos``, ``sin``: ``[B, N, d]`` for the virtual positions.

    RoPE in the Llama-family convention (dimension i pairs with i + d/2), ``x * cos + rotate_half(x) *
    sin``, written as in-place multiply-adds into one output: decoding from the compact cache rotates
    every stored key at every step, and the textbook form allocates three more tensors of that size.
    """
    half = x.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def vtu_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: VirtualLayout, cos: Tensor, sin: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of the rows as if they were expanded to their virtual positions.

    Args:
        q: ``[B, N_un, Hq, d]`` query rows (before RoPE).
        k, v: ``[B, N_un, Hkv, d]`` key and value rows (before RoPE); Hq is a multiple of Hkv (GQA).
        layout: rows -> virtual positions.
        cos, sin: ``[B, N, d]`` RoPE tables at the virtual positions.
        scale: logit scale.

    Returns:
        ``[B, N_un, Hq * d]``: for each row, the mean attention output over its positions; and the
        keys (after RoPE) and values at the virtual positions, ``[B, Hkv, N, d]`` each: exactly what
        the stock model's KV cache would hold for the full sequence.
    """
    q, k, v = (layout.to_positions(t).transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = layout.causal_mask()
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    rows = layout.to_rows(out.transpose(1, 2))  # [B, N_un, Hq, d]
    return rows.flatten(2), k, v


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, layout: VirtualLayout, cos: Tensor, sin: Tensor, scale: float
) -> Tensor:
    """The last ``t`` positions of ``layout`` (new singleton rows) attend over every virtual position.

    Keys are stored once per row, before RoPE, and rotated here at each position they stand for: the
    expanded keys exist for one layer at a time, never in the cache.

    Args:
        q: ``[B, t, Hq, d]`` queries of the new tokens (before RoPE).
        keys, values: ``[B, N_un, Hkv, d]`` every row so far, the new ones last (before RoPE).
        layout: rows -> virtual positions, ``N`` positions, the new tokens last.
        cos, sin: ``[B, N, d]`` RoPE tables at the virtual positions.
        scale: logit scale.

    Returns:
        ``[B, t, Hq * d]``.
    """
    new = q.shape[1]
    k = apply_rope(layout.to_positions(keys).transpose(1, 2), cos, sin)  # [B, Hkv, N, d]
    v = layout.to_positions(values).transpose(1, 2)
    q = apply_rope(q.transpose(1, 2), cos[:, -new:], sin[:, -new:])  # [B, Hq, t, d]
    mask = None
    if new > 1 or layout.padded:
        length = layout.expand.shape[1]
        order = torch.arange(length, device=q.device)
        causal = order[None, :] <= order[-new:, None]  # [t, N]
        mask = (causal[None] & layout.valid[:, None, :])[:, None]  # [B, 1, t, N]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).flatten(2)


class CompactKVCache:
    """A KV cache that stores each row once: a merged visual token's keys and values are kept for its
    group, not for every patch position, together with the layout that says where the rows sit.

    Keys are stored before RoPE (a row stands for several positions, so it has no single rotation);
    :func:`decode_attention` rotates them per position as it reads them. New tokens append one row
    and one position each.
    """

    def __init__(self, layout: VirtualLayout) -> None:
        self.layout = layout
        self.keys: list[Tensor] = []  # per layer, [B, N_un, Hkv, d]
        self.values: list[Tensor] = []

    def store(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``[B, n, Hkv, d]`` rows for ``layer``; returns all of that layer's rows."""
        if layer == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], keys], dim=1)
            self.values[layer] = torch.cat([self.values[layer], values], dim=1)
        return self.keys[layer], self.values[layer]

    @property
    def seq_length(self) -> int:
        """Virtual positions covered so far (prompt and generated tokens)."""
        return self.layout.expand.shape[1]

    def nbytes(self) -> int:
        """Bytes held: keys, values and the layout maps."""
        tensors = [*self.keys, *self.values, self.layout.expand, self.layout.positions, self.layout.valid]
        return sum(t.numel() * t.element_size() for t in tensors)

    def select(self, index: Tensor) -> None:
        """Keep the samples ``index`` (``[B']`` long), in that order (beam search reorders the batch)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        lay = self.layout
        self.layout = VirtualLayout(
            lay.expand.index_select(0, index),
            lay.positions.index_select(0, index),
            lay.valid.index_select(0, index),
            lay.num_rows,
        )
