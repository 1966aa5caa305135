"""Where each token of a variable-length batch lives, packed and padded.

After merging, the images of a batch hold different numbers of tokens. The position-wise layers
(norms, projections, MLP) run on the *packed* tokens, ``[T, ...]`` with ``T`` the total over the batch,
so no compute is spent on padding. Attention needs each image's tokens together, so it runs on a
*padded* grid ``[B, L, ...]`` with ``L`` the longest image. A :class:`TokenLayout` converts between the
two with one gather or scatter.

Within an image, tokens are kept in their original raster order, and they always occupy the first
``lengths[b]`` slots of the image's padded row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    """Packed <-> padded index maps for one variable-length batch.

    Attributes:
        lengths: ``[B]`` long, tokens per image (on the tokens' device).
        max_len: ``L``, the longest image, as a host int.
        total: ``T = lengths.sum()``, as a host int.
        batch_index: ``[T]`` long, the image each packed token belongs to.
        pos_index: ``[T]`` long, the token's position within its image.
    """

    lengths: Tensor
    max_len: int
    total: int
    batch_index: Tensor
    pos_index: Tensor

    @classmethod
    def dense(cls, batch: int, length: int, device: torch.device) -> TokenLayout:
        """Every image holds ``length`` tokens (the layout before any merge)."""
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)
        positions = torch.arange(length, device=device)
        return cls(
            lengths=lengths,
            max_len=length,
            total=batch * length,
            batch_index=torch.arange(batch, device=device).repeat_interleave(length),
            pos_index=positions.repeat(batch),
        )

    @classmethod
    def from_lengths(cls, lengths: Tensor, max_len: int, total: int) -> TokenLayout:
        """Build the index maps from per-image lengths; ``max_len`` and ``total`` are host ints
        the caller already synchronised, so building a layout never waits on the device."""
        batch = lengths.shape[0]
        images = torch.arange(batch, device=lengths.device)
        batch_index = torch.repeat_interleave(images, lengths, output_size=total)
        starts = torch.cumsum(lengths, 0) - lengths
        pos_index = torch.arange(total, device=lengths.device) - starts[batch_index]
        return cls(lengths, max_len, total, batch_index, pos_index)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def is_dense(self) -> bool:
        """True when no image is shorter than another, so padded and packed share memory order."""
        return self.total == self.batch * self.max_len

    def starts(self) -> Tensor:
        """``[B]`` long, the packed index of each image's first token."""
        return torch.cumsum(self.lengths, 0) - self.lengths

    def valid_mask(self) -> Tensor:
        """``[B, L]`` bool, True where the padded grid holds a real token."""
        positions = torch.arange(self.max_len, device=self.lengths.device)
        return positions[None, :] < self.lengths[:, None]

    def flat_index(self) -> Tensor:
        """``[T]`` long, each packed token's index in the flattened ``[B * L]`` padded grid."""
        return self.batch_index * self.max_len + self.pos_index

    def pad(self, packed: Tensor, fill: float = 0.0) -> Tensor:
        """``[T, *F]`` -> ``[B, L, *F]``, with ``fill`` in the padding slots."""
        features = packed.shape[1:]
        if self.is_dense:
            return packed.reshape(self.batch, self.max_len, *features)
        padded = packed.new_full((self.batch * self.max_len, *features), fill)
        padded.index_copy_(0, self.flat_index(), packed)
        return padded.reshape(self.batch, self.max_len, *features)

    def pad_stack(self, packed: Sequence[Tensor]) -> Tensor:
        """``k x [T, *F]`` -> ``[B, L, k, *F]``: one zero-filled buffer for several tensors (attention's
        q, k and v), so the padding is written once, not once per tensor."""
        features = packed[0].shape[1:]
        padded = packed[0].new_zeros(self.batch * self.max_len, len(packed), *features)
        index = self.flat_index()
        for slot, tensor in enumerate(packed):
            padded[:, slot].index_copy_(0, index, tensor)
        return padded.reshape(self.batch, self.max_len, len(packed), *features)

    def pack(self, padded: Tensor) -> Tensor:
        """``[B, L, *F]`` -> ``[T, *F]``, dropping the padding slots. ``padded`` may be a strided view
        (e.g. a transposed attention output): the gather reads it in place."""
        if self.is_dense:
            return padded.reshape(self.total, *padded.shape[2:])
        return padded[self.batch_index, self.pos_index]
