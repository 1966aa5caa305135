"""A merged batch held in capacity buffers, so that merging never waits for the host.

Merging only removes tokens, so any count read earlier is an upper bound for every later layer. The
batch therefore lives in buffers of ``Tc`` rows (a host int that is *some* upper bound on the live
total), with per-image lengths kept on the device. Live rows come first, image after image in raster
order; the rows after them are dead (size 0, image index ``B``). Dead rows cost position-wise FLOPs
but never change a live result: no op mixes rows except the merge scatter, which sends them to a
trash row, and attention, which gives them no weight.

Shrinking the buffers needs a host number; :class:`LaggedCounts` delivers it whenever the device has
got there (on CUDA: a non-blocking copy and an event), never by waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class CapacityState:
    """A merged batch between two blocks.

    Attributes:
        x: ``[Tc, C]`` rows; live rows first.
        sizes: ``[Tc]`` float32, original tokens each row stands for; 0 for dead rows.
        image: ``[Tc]`` long, each row's image; ``B`` for dead rows.
        position: ``[Tc]`` long, each live row's position within its image (dead rows: anything).
        lengths: ``[B]`` long, live tokens per image (on the device).
        group: ``[B, N0]`` long, for each original patch the position of the token representing it.
        max_len: ``Lc``, a host upper bound on ``lengths.max()``.
        dense: host flag, True while nothing has merged (row ``b * Lc + p`` is image b's token p).
    """

    x: Tensor
    sizes: Tensor
    image: Tensor
    position: Tensor
    lengths: Tensor
    group: Tensor
    max_len: int
    dense: bool = False

    @classmethod
    def start(cls, x: Tensor, num_prefix: int) -> CapacityState:
        """The state of ``[B, N, C]`` embedded tokens before any block."""
        batch, length, channels = x.shape
        device = x.device
        return cls(
            x=x.reshape(batch * length, channels),
            sizes=torch.ones(batch * length, dtype=torch.float32, device=device),
            image=torch.arange(batch, device=device).repeat_interleave(length, output_size=batch * length),
            position=torch.arange(length, device=device).repeat(batch),
            lengths=torch.full((batch,), length, dtype=torch.long, device=device),
            group=torch.arange(num_prefix, length, device=device).expand(batch, -1),
            max_len=length,
            dense=True,
        )

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.x.shape[0]

    def valid_mask(self) -> Tensor:
        """``[B, Lc]`` bool, True where the padded grid holds a live token."""
        positions = torch.arange(self.max_len, device=self.lengths.device)
        return positions[None, :] < self.lengths[:, None]

    def cu_seqlens(self) -> Tensor:
        """``[B + 1]`` int32, image boundaries in the buffer (for varlen attention)."""
        return torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0)).int()

    def shrink(self, capacity: int, max_len: int) -> CapacityState:
        """Drop dead rows past ``capacity`` and narrow the grid to ``max_len``: views, no copy.
        Both must be upper bounds of the live counts (any counts read since the last merge are)."""
        capacity, max_len = min(capacity, self.capacity), min(max_len, self.max_len)
        if capacity == self.capacity and max_len == self.max_len:
            return self
        return CapacityState(
            x=self.x[:capacity],
            sizes=self.sizes[:capacity],
            image=self.image[:capacity],
            position=self.position[:capacity],
            lengths=self.lengths,
            group=self.group,
            max_len=max_len,
            dense=self.dense and capacity == self.capacity and max_len == self.max_len,
        )


def merge_step(state: CapacityState, partner: Tensor, merge: Tensor) -> CapacityState:
    """Merge the selected A tokens into their B partners, with no host read.

    Args:
        state: the batch before the merge (needs ``Lc >= 2``).
        partner: ``[B, Na]`` long, each A token's B partner (index among the B tokens).
        merge: ``[B, Na]`` bool, the A tokens that merge.

    Returns:
        The batch after the merge, in buffers of the same capacity and ``Lc``. Each token is the
        size-weighted mean of what merged into it, survivors keep their raster order.
    """
    batch, max_len, capacity = state.batch, state.max_len, state.capacity
    keep = state.valid_mask()
    keep[:, 0::2] &= ~merge
    # Survivors close ranks in raster order; merged A tokens follow their partner.
    new_position = keep.long().cumsum(dim=-1) - 1  # [B, Lc]
    destination = new_position.clone()
    partner_position = new_position[:, 1::2].gather(1, partner)
    destination[:, 0::2] = torch.where(merge, partner_position, new_position[:, 0::2])
    new_lengths = keep.sum(dim=-1)
    new_starts = new_lengths.cumsum(0) - new_lengths

    live = state.image < batch
    image, position = state.image.clamp(max=batch - 1), state.position.clamp(max=max_len - 1)
    row = torch.where(live, new_starts[image] + destination[image, position], capacity)  # dead -> trash row

    # One scatter carries the size-weighted sums and the sizes, accumulated in at least float32
    # (bf16 sums of several tokens lose the weights' precision).
    channels = state.x.shape[1]
    accumulate = torch.promote_types(state.x.dtype, torch.float32)
    sizes = state.sizes.to(accumulate)[:, None]
    weighted = torch.cat([state.x.to(accumulate) * sizes, sizes], dim=1)  # [Tc, C + 1], differentiable
    summed = weighted.new_zeros(capacity + 1, channels + 1).index_add_(0, row, weighted)[:capacity]
    sizes = summed[:, channels]
    # Rows nobody lands in are dead: size 0, value 0 (the clamp only guards the division).
    x = (summed[:, :channels] / sizes.clamp(min=1.0)[:, None]).to(state.x.dtype)

    boundaries = new_lengths.cumsum(0)
    rows = torch.arange(capacity, device=row.device)
    new_image = torch.searchsorted(boundaries, rows, right=True)  # == B past the last live row
    new_position = rows - (boundaries - new_lengths).gather(0, new_image.clamp(max=batch - 1))
    return CapacityState(
        x=x,
        sizes=sizes.float(),
        image=new_image,
        position=new_position,
        lengths=new_lengths,
        group=destination.gather(1, state.group),
        max_len=max_len,
    )


@dataclass
class _Pending:
    host: Tensor  # [2] long: total and longest image, on the host (pinned on CUDA)
    ready: Callable[[], bool]


@dataclass
class LaggedCounts:
    """Upper bounds on the live counts that reach the host late, never by waiting.

    After a merge, :meth:`request` starts copying ``(total, longest)`` to the host; :meth:`poll`
    returns the newest pair whose copy has finished, if at least ``every`` merges have passed since
    the last one it returned. On CUDA the copy is non-blocking into pinned memory and "finished" is
    ``Event.query()``; on CPU the numbers are already on the host. ``ready`` replaces the readiness
    test (tests and the CPU proxy simulate a device that lags behind).

    Args:
        every: merges between two shrinks at least.
        ready: ``(request number) -> bool``, overrides the device's own readiness test.
    """

    every: int = 1
    ready: Callable[[int], bool] | None = None
    pending: list[_Pending] = field(default_factory=list)
    requests: int = 0
    since_shrink: int = 0
    #: how many host reads of counts happened (each one non-blocking: the copy had finished)
    reads: int = 0

    def start(self) -> None:
        """Forget pending copies: a new forward begins."""
        self.pending.clear()
        self.since_shrink = 0

    def request(self, lengths: Tensor) -> None:
        """Start the copy of ``(lengths.sum(), lengths.max())`` right after a merge."""
        stats = torch.stack([lengths.sum(), lengths.max()])
        number = self.requests
        self.requests += 1
        self.since_shrink += 1
        if stats.device.type == "cuda":
            host = torch.empty(2, dtype=stats.dtype, pin_memory=True)
            host.copy_(stats, non_blocking=True)  # pinned: a pageable target would silently sync
            event = torch.cuda.Event()
            event.record()
            ready = event.query
        else:
            host, ready = stats, (lambda: True)
        if self.ready is not None:
            ready = lambda number=number: self.ready(number)  # noqa: E731
        self.pending.append(_Pending(host, ready))

    def poll(self) -> tuple[int, int] | None:
        """``(capacity, max_len)`` to shrink to, or None (nothing new, or too soon)."""
        if self.since_shrink < self.every:
            return None
        newest = None
        while self.pending and self.pending[0].ready():  # copies finish in stream order
            newest = self.pending.pop(0)
        if newest is None:
            return None
        self.since_shrink = 0
        self.reads += 1
        # numpy() reads host memory the finished copy wrote: no device access, no dispatcher op.
        total, longest = (int(value) for value in newest.host.numpy())
        return total, longest
