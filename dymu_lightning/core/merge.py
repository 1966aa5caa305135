"""Carry out one layer's merges on a packed variable-length batch.

Each merged A token is absorbed into its B partner by a size-weighted mean; several A tokens may
land on the same B token. Survivors keep their raster order, so each image's result depends only on
its own tokens. The group map (original patch -> current token) is updated with one gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dymu_lightning.core.layout import TokenLayout


@dataclass(frozen=True)
class TokenState:
    """A merged batch between two blocks.

    Attributes:
        x: ``[T, C]`` packed tokens.
        sizes: ``[T]`` float32, original patches (or prefix tokens) each token stands for.
        layout: where the packed tokens sit in the padded ``[B, L]`` grid.
        group: ``[B, N0]`` long, for each original patch token the position (within its image)
            of the token that now represents it.
    """

    x: Tensor
    sizes: Tensor
    layout: TokenLayout
    group: Tensor

    @classmethod
    def start(cls, x: Tensor, num_prefix: int) -> TokenState:
        """The state of ``[B, N, C]`` embedded tokens before any block; the first ``num_prefix``
        tokens of each image are prefix tokens, the rest are the ``N0`` patches."""
        batch, length, channels = x.shape
        layout = TokenLayout.dense(batch, length, x.device)
        group = torch.arange(num_prefix, length, device=x.device).expand(batch, -1)
        sizes = torch.ones(batch * length, dtype=torch.float32, device=x.device)
        return cls(x.reshape(batch * length, channels), sizes, layout, group)


def merge_tokens(state: TokenState, partner: Tensor, merge: Tensor) -> TokenState:
    """Merge the selected A tokens into their B partners.

    Args:
        state: the batch before the merge.
        partner: ``[B, Na]`` long, each A token's B partner (index among the B tokens).
        merge: ``[B, Na]`` bool, the A tokens that merge.

    The image must hold at least one B token (``L >= 2``).

    Returns:
        The batch after the merge. Costs one host synchronisation, to size the new packed buffer.
    """
    layout = state.layout
    valid = layout.valid_mask()
    keep = valid.clone()
    keep[:, 0::2] &= ~merge
    # Survivors close ranks in raster order; merged A tokens follow their partner.
    new_position = keep.long().cumsum(dim=-1) - 1  # [B, L]
    destination = new_position.clone()
    partner_position = new_position[:, 1::2].gather(1, partner)
    destination[:, 0::2] = torch.where(merge, partner_position, new_position[:, 0::2])

    new_lengths = keep.sum(dim=-1)
    total, max_len = torch.stack([new_lengths.sum(), new_lengths.max()]).tolist()
    new_layout = TokenLayout.from_lengths(new_lengths, max_len, total)

    packed_destination = new_layout.starts()[layout.batch_index] + destination[layout.batch_index, layout.pos_index]
    sizes = state.sizes.new_zeros(total).index_add_(0, packed_destination, state.sizes)
    # Accumulate in at least float32: bf16 sums of several tokens lose the weights' precision.
    weighted = state.x.to(torch.promote_types(state.x.dtype, torch.float32)) * state.sizes[:, None]
    x = weighted.new_zeros(total, weighted.shape[1]).index_add_(0, packed_destination, weighted)
    x = (x / sizes[:, None]).to(state.x.dtype)
    group = destination.gather(1, state.group)
    return TokenState(x=x, sizes=sizes, layout=new_layout, group=group)
