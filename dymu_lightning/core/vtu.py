"""Virtual token unmerging (VTU): RoPE attention as if every merged token were still its full group.

A language-model sequence has N *virtual* positions (text plus the full visual grid) but only N_un
distinct *rows*: text tokens are singletons, and each merged visual token stands for its group of
patches. Position-wise layers (norms, projections, MLP) commute with copying rows to positions, so they
run on the rows. Attention cannot: it runs on the N positions, with RoPE at the positions the full
sequence would have had and the usual causal mask, and its outputs are averaged back over each row's
positions. Nothing of size N x N x d is ever built: q, k and v are gathered to ``[B, H, N, d]`` and
the attention product is left to SDPA.

A batch's rows are *packed* (:class:`PackedLayout`): the position-wise layers run on the rows that some
valid position uses, one sequence for the whole batch, so a batch costs the sum of its samples' rows,
not its busiest sample's rows times the batch size.

Decoding (:func:`decode_attention`) keeps the keys rotated at their positions, as the stock cache
does, but the values once per row: the attention weights of a row's positions are summed and the
values are read once per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(valid: Tensor, queries: int) -> Tensor:
    """``[B, 1, t, N]`` bool: the positions each of the last ``t = queries`` positions attends to.

    Position i sees position j when j <= i in sequence order and j is valid (``valid``: ``[B, N]``). A
    padding query sees itself only, so that no row of the softmax is empty. The prefill asks for all N
    queries, decoding for its t new tokens: one rule for both.
    """
    length = valid.shape[1]
    order = torch.arange(length, device=valid.device)
    query = order[length - queries :, None]  # [t, 1]
    sees = (order[None, :] <= query)[None] & valid[:, None, :]
    itself = (order[None, :] == query)[None] & ~valid[:, -queries:, None]
    return (sees | itself)[:, None]


@dataclass(frozen=True)
class VirtualLayout:
    """How the rows of a batch map to virtual positions.

    Attributes:
        expand: ``[B, N]`` long, the row behind each virtual position.
        positions: ``[B, N]`` long, the RoPE position of each virtual position; or ``[A, B, N]`` for a
            rotary embedding with ``A`` position axes (Qwen2-VL's M-RoPE: temporal, height, width).
            Only the host's rotary embedding reads them: a merged row's positions are its members'.
        valid: ``[B, N]`` bool, False for padding positions.
        num_rows: ``N_un``, rows per sample (samples with fewer rows are padded).
    """

    expand: Tensor
    positions: Tensor
    valid: Tensor
    num_rows: int

    @cached_property
    def padded(self) -> bool:
        """Whether some position is padding. One host sync, on first use only: an unpadded prefill then
        takes SDPA's causal kernel. Decoding never asks (it always applies its small mask)."""
        return not bool(self.valid.all())

    @cached_property
    def _counts(self) -> Tensor:
        counts = torch.zeros(self.expand.shape[0], self.num_rows, device=self.expand.device)
        return counts.scatter_add_(1, self.expand, self.valid.float())

    @classmethod
    def singletons(cls, batch: int, length: int, device: torch.device | None = None) -> VirtualLayout:
        """Every row its own position, positions 0..N-1: VTU is then plain attention."""
        index = torch.arange(length, device=device).expand(batch, -1)
        return cls(index, index, torch.ones(batch, length, dtype=torch.bool, device=device), length)

    def extend(self, positions: Tensor, valid: Tensor | None = None) -> VirtualLayout:
        """This layout with ``t`` new tokens appended, each its own new row.

        Args:
            positions: ``[B, t]`` (or ``[A, B, t]``, as the layout's) RoPE positions of the new tokens.
            valid: ``[B, N + t]`` validity of every position afterwards (a generation attention
                mask); None keeps the old validity and marks the new tokens valid.
        """
        batch, new = positions.shape[-2:]
        rows = self.num_rows + torch.arange(new, device=positions.device).expand(batch, -1)
        if valid is None:
            # [B, t] even for [A, B, t] positions (M-RoPE)
            valid = torch.cat([self.valid, positions.new_ones((batch, new), dtype=torch.bool)], dim=1)
        return VirtualLayout(
            torch.cat([self.expand, rows], dim=1),
            torch.cat([self.positions, positions], dim=-1),
            valid.bool(),
            self.num_rows + new,
        )

    def select(self, index: Tensor) -> VirtualLayout:
        """The samples ``index`` (``[B']`` long), in that order (beam search reorders the batch)."""
        return VirtualLayout(
            self.expand.index_select(0, index),
            self.positions.index_select(-2, index),
            self.valid.index_select(0, index),
            self.num_rows,
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
        """``[B, 1, N, N]`` bool (see :func:`causal_mask`), or None when nothing is padded: plain
        causal attention then applies."""
        return causal_mask(self.valid, self.expand.shape[1]) if self.padded else None

    def pack(self) -> PackedLayout:
        """The used rows of every sample in one sequence (one host sync: the packed length)."""
        batch = self.expand.shape[0]
        device = self.expand.device
        used = self.counts().flatten() > 0  # [B * N_un]: padding rows and padded-out rows are dropped
        source = used.nonzero().squeeze(1)  # [T]
        total = source.numel()
        slot = torch.full_like(used, total, dtype=torch.long)
        slot[source] = torch.arange(total, device=device)
        flat = slot[self.expand + self.num_rows * torch.arange(batch, device=device)[:, None]]  # [B, N]
        return PackedLayout(
            source=source,
            gather_index=torch.where(self.valid, flat, 0),
            scatter_index=torch.where(self.valid, flat, total),
            counts=self.counts().flatten()[source],
            positions=self.positions,
            valid=self.valid,
            num_rows=self.num_rows,
        )


def layout_from_keys(keys: Tensor, positions: Tensor, valid: Tensor) -> tuple[VirtualLayout, Tensor]:
    """Rows from one key per virtual position: the positions that share a key share a row.

    A multimodal model's sequence is built this way: a text token's key is its own, every position
    of a merged visual token's group carries that token's key. Rows are numbered, in each sample, in
    the order of their key's first position, so the numbering does not depend on the batch-mates.

    Args:
        keys: ``[B, N]`` long, ``>= 0``; a key never occurs in two samples.
        positions: ``[B, N]`` long RoPE positions (or ``[A, B, N]``: M-RoPE), passed on as they are.
        valid: ``[B, N]`` bool, False for padding.

    Returns:
        The layout, and ``[B, N_un]`` long: the key behind each row (-1 for the padding rows of
        samples with fewer rows).
    """
    batch, length = keys.shape
    flat = keys.flatten()
    order = torch.arange(batch * length, device=keys.device)
    # the first position of every key (keys that occur nowhere keep a value past the end)
    first = torch.full((int(flat.max()) + 1,), batch * length, dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, flat, order, reduce="amin")
    opens = (first[flat] == order).view(batch, length)  # [B, N]: the position that opens a row
    rank = opens.long().cumsum(1) - 1  # a row's number within its sample, read at its first position
    row_of_key = torch.zeros_like(first)
    row_of_key[keys[opens]] = rank[opens]
    num_rows = int(opens.sum(1).max())
    row_key = torch.full((batch, num_rows), -1, dtype=torch.long, device=keys.device)
    sample = torch.arange(batch, device=keys.device)[:, None].expand(-1, length)
    row_key[sample[opens], rank[opens]] = keys[opens]
    return VirtualLayout(row_of_key[keys], positions, valid, num_rows), row_key


@dataclass(frozen=True)
class PackedLayout:
    """A :class:`VirtualLayout` whose rows are packed: only the rows some valid position uses, all
    samples in one ``[T]`` sequence, so that a batch is not padded to its sample with most rows.

    Attributes:
        source: ``[T]`` long, where each packed row sits in the padded rows, as ``b * N_un + r``.
        gather_index: ``[B, N]`` long, the packed row behind each position (row 0 for padding).
        scatter_index: ``[B, N]`` long, the same with padding positions sent to a scratch row ``T``.
        counts: ``[T]`` float, valid positions per packed row (at least 1).
        positions, valid: ``[B, N]``, as in the layout.
        num_rows: ``N_un`` of the padded rows.
    """

    source: Tensor
    gather_index: Tensor
    scatter_index: Tensor
    counts: Tensor
    positions: Tensor
    valid: Tensor
    num_rows: int

    @cached_property
    def padded(self) -> bool:
        return not bool(self.valid.all())

    @property
    def total(self) -> int:
        """``T``, the packed rows."""
        return self.source.numel()

    def pack(self, rows: Tensor) -> Tensor:
        """``[B, N_un, *F]`` padded rows -> ``[T, *F]``."""
        return rows.flatten(0, 1).index_select(0, self.source)

    def unpack(self, packed: Tensor) -> Tensor:
        """``[T, *F]`` -> ``[B, N_un, *F]``, zeros in the rows no position uses."""
        batch = self.valid.shape[0]
        rows = packed.new_zeros(batch * self.num_rows, *packed.shape[1:]).index_copy_(0, self.source, packed)
        return rows.unflatten(0, (batch, self.num_rows))

    def to_positions(self, packed: Tensor) -> Tensor:
        """``[T, *F]`` -> ``[B, N, *F]``: copy each row to its positions."""
        return packed.index_select(0, self.gather_index.flatten()).unflatten(0, self.gather_index.shape)

    def to_rows(self, values: Tensor) -> Tensor:
        """``[B, N, *F]`` -> ``[T, *F]``: the mean over each row's valid positions. Padding positions add
        into a scratch row that is dropped, so no weighted copy of ``values`` is made."""
        sums = values.new_zeros(self.total + 1, *values.shape[2:])
        sums.index_add_(0, self.scatter_index.flatten(), values.flatten(0, 1))
        return sums[: self.total] / self.counts.to(values.dtype).reshape(-1, *([1] * (values.dim() - 2)))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x``: ``[B, H, N, d]``; ``cos``, ``sin``: ``[B, N, d]`` for the virtual positions.

    RoPE in the Llama-family convention (dimension i pairs with i + d/2), ``x * cos + rotate_half(x) *
    sin``, written as in-place multiply-adds into one output: the textbook form allocates three more
    tensors of the size of ``x``.
    """
    half = x.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def vtu_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: VirtualLayout | PackedLayout, cos: Tensor, sin: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of the rows as if they were expanded to their virtual positions.

    Args:
        q: ``[*R, Hq, d]`` query rows (before RoPE), ``*R`` = ``B, N_un`` for a :class:`VirtualLayout`
            or ``T`` for a :class:`PackedLayout`.
        k, v: ``[*R, Hkv, d]`` key and value rows (before RoPE); Hq is a multiple of Hkv (GQA).
        layout: rows -> virtual positions.
        cos, sin: ``[B, N, d]`` RoPE tables at the virtual positions.
        scale: logit scale.

    Returns:
        ``[*R, Hq * d]``: for each row, the mean attention output over its positions; and the keys
        (after RoPE) and values at the virtual positions, ``[B, Hkv, N, d]`` each: exactly what the
        stock model's KV cache would hold for the full sequence.
    """
    # one unrotated copy at a time: each is freed as soon as its rotation exists
    q = apply_rope(layout.to_positions(q).transpose(1, 2), cos, sin)  # [B, Hq, N, d]
    k = apply_rope(layout.to_positions(k).transpose(1, 2), cos, sin)  # [B, Hkv, N, d]
    v = layout.to_positions(v).transpose(1, 2)
    mask = causal_mask(layout.valid, q.shape[2]) if layout.padded else None
    # CUDA's fused kernels take grouped-query heads only without a mask
    out = causal_attention(q, k, v, mask, scale, repeat_heads=mask is not None and q.is_cuda)
    rows = layout.to_rows(out.transpose(1, 2))  # [*R, Hq, d]
    return rows.flatten(-2), k, v


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, repeat_heads: bool = False
) -> Tensor:
    """SDPA over ``[B, H, N, d]`` with the causal ``mask`` (None: plain causal attention).

    ``repeat_heads`` copies each key-value head to its query heads first, as the host model does when
    it passes a mask on CUDA: SDPA's fused CUDA kernels refuse masked grouped-query attention, and its
    math kernel would build ``[B, Hq, N, N]`` float32 scores instead.
    """
    gqa = q.shape[1] != k.shape[1]
    if gqa and repeat_heads:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)


def decode_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    layout: VirtualLayout,
    cos: Tensor,
    sin: Tensor,
    scale: float,
    mask: Tensor | None = None,
) -> Tensor:
    """The last ``t`` positions of ``layout`` (new singleton rows) attend over every virtual position.

    The logits need each key at its own position (RoPE makes a row's positions differ), so keys are
    kept rotated, one per position, as in the stock cache. The values need not be: the attention
    weights of a row's positions are summed, and each row's value is read once. This is exactly the
    attention over the N virtual positions: ``sum_j p_j v[row(j)] = sum_r (sum_{j in r} p_j) v[r]``.

    Args:
        q: ``[B, t, Hq, d]`` queries of the new tokens (before RoPE).
        keys: ``[B, Hkv, N, d]`` keys after RoPE at every virtual position, the new ones last.
        values: ``[B, Hkv, N_un, d]`` values of every row, the new ones last.
        layout: rows -> virtual positions, ``N`` positions and ``N_un`` rows, the new tokens last.
        cos, sin: ``[B, t, d]`` RoPE tables at the new tokens' positions.
        scale: logit scale.
        mask: ``causal_mask(layout.valid, t)``, if the caller has it already (it is the same for
            every layer).

    Returns:
        ``[B, t, Hq * d]``.
    """
    batch, new, heads, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads  # query heads per key-value head, consecutive as in the host's repeat_kv
    q = apply_rope(q.transpose(1, 2), cos, sin).reshape(batch, kv_heads, group * new, dim)
    logits = torch.matmul(q * scale, keys.transpose(-1, -2))  # [B, Hkv, g * t, N]
    # the mask is [B, 1, 1, t, N]: small next to the logits, and applying it always spares a host sync
    mask = causal_mask(layout.valid, new) if mask is None else mask
    logits = logits.view(batch, kv_heads, group, new, length).masked_fill(~mask[:, :, None], float("-inf"))
    # the softmax in at least float32, as SDPA's kernels keep it
    weights = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights = weights.view(batch, kv_heads, group * new, length)
    index = layout.expand[:, None, None, :].expand_as(weights)
    row_weights = weights.new_zeros(*weights.shape[:3], values.shape[2]).scatter_add_(-1, index, weights)
    out = torch.matmul(row_weights.to(values.dtype), values)  # [B, Hkv, g * t, d]
    return out.view(batch, heads, new, dim).transpose(1, 2).flatten(2)
