"""A merged batch held in capacity buffers, so that merging never waits for the host.

Merging only removes tokens, so any count read earlier is an upper bound for every later layer. The
batch therefore lives in buffers of ``Tc`` rows (a host int that is *some* upper bound on the live
total), with per-image lengths kept on the device. Live rows come first, image after image in raster
order; the rows after them are dead (size 0, grid slot ``B * Lc``). Dead rows cost position-wise FLOPs
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

from dymu_lightning.core.matching import accumulation_dtype


@dataclass(frozen=True)
class CapacityState:
    """A merged batch between two blocks.

    Attributes:
        x: ``[Tc, C]`` rows; live rows first.
        sizes: ``[Tc]`` float32, original tokens each row stands for; 0 for dead rows.
        slot: ``[Tc]`` long, each row's cell ``b * Lc + p`` in the padded ``[B, Lc]`` grid (image b,
            position p); ``B * Lc``, one past the grid, for dead rows.
        lengths: ``[B]`` long, live tokens per image (on the device).
        group: ``[B, N0]`` long, for each original patch the buffer row of the token representing it
            (rows never move when the buffers shrink, so a merge updates it with one gather;
            :meth:`group_positions` gives positions within each image).
        max_len: ``Lc``, a host upper bound on ``lengths.max()``.
        dense: host flag, True while nothing has merged (row ``b * Lc + p`` is image b's token p).
        bounds: ``[B + 1]`` long, the image boundaries ``[0, cumsum(lengths)]`` when the merge
            that made this state had them for free (None: :meth:`cu_seqlens` computes them).
        positions: ``[2, N]`` long, made once per forward (each ``arange`` is a kernel launch on a
            GPU, and every merging block needs these): row 0 is ``0..N-1``, row 1 the same with the
            protected prefix replaced by ``N``, which no length exceeds, so that one comparison
            gives the cells matching skips (:meth:`masks`). None: built per call.
        cell_base: ``[B]`` long, ``b * Lc - 1`` for the current ``Lc``: image b's survivor count
            plus this is the survivor's new grid cell (:func:`merge_step`). None: built per call.
    """

    x: Tensor
    sizes: Tensor
    slot: Tensor
    lengths: Tensor
    group: Tensor
    max_len: int
    dense: bool = False
    bounds: Tensor | None = None
    positions: Tensor | None = None
    cell_base: Tensor | None = None

    @classmethod
    def start(cls, x: Tensor, num_prefix: int) -> CapacityState:
        """The state of ``[B, N, C]`` embedded tokens before any block."""
        batch, length, channels = x.shape
        device = x.device
        positions = torch.arange(length, device=device).repeat(2, 1)
        positions[1, :num_prefix] = length
        return cls(
            x=x.reshape(batch * length, channels),
            sizes=torch.ones(batch * length, dtype=torch.float32, device=device),
            slot=torch.arange(batch * length, device=device),
            lengths=torch.full((batch,), length, dtype=torch.long, device=device),
            group=torch.arange(num_prefix, length, device=device)
            + torch.arange(0, batch * length, length, device=device)[:, None],
            max_len=length,
            dense=True,
            positions=positions,
            cell_base=_cell_base(batch, length, device),
        )

    @classmethod
    def from_rows(
        cls, x: Tensor, sizes: Tensor, image: Tensor, position: Tensor, lengths: Tensor, group: Tensor, max_len: int
    ) -> CapacityState:
        """A state from each row's image (``B`` = dead) and position (tests, benchmarks); ``group``
        holds buffer rows, as :attr:`group` does."""
        batch = lengths.shape[0]
        slot = torch.where(image < batch, image * max_len + position, batch * max_len)
        return cls(x=x, sizes=sizes, slot=slot, lengths=lengths, group=group, max_len=max_len)

    @property
    def image(self) -> Tensor:
        """``[Tc]`` long, each row's image; ``B`` for dead rows."""
        return torch.div(self.slot, self.max_len, rounding_mode="floor")

    @property
    def position(self) -> Tensor:
        """``[Tc]`` long, each live row's position in its image (0 for dead rows)."""
        return self.slot % self.max_len

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.x.shape[0]

    def valid_mask(self) -> Tensor:
        """``[B, Lc]`` bool, True where the padded grid holds a live token."""
        return self._positions()[0, None, :] < self.lengths[:, None]

    def masks(self) -> tuple[Tensor, Tensor | None]:
        """``[B, Lc]`` bool: the live cells (:meth:`valid_mask`) and the cells matching skips
        (padding and the protected prefix), one comparison each; None for the second where the
        state does not know its protected prefix (built by :meth:`from_rows`)."""
        if self.positions is None:
            return self.valid_mask(), None
        return self.valid_mask(), self._positions()[1, None, :] >= self.lengths[:, None]

    def _positions(self) -> Tensor:
        if self.positions is None:
            return torch.arange(self.max_len, device=self.lengths.device)[None]
        return self.positions[:, : self.max_len]

    def group_positions(self) -> Tensor:
        """``[B, N0]`` long, for each original patch the position, within its image, of the token
        representing it."""
        starts = self.lengths.cumsum(0) - self.lengths
        return self.group - starts[:, None]

    def cu_seqlens(self) -> Tensor:
        """``[B + 1]`` int32, image boundaries in the buffer (for varlen attention)."""
        bounds = torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0)) if self.bounds is None else self.bounds
        return bounds.int()

    def shrink(self, capacity: int, max_len: int) -> CapacityState:
        """Drop dead rows past ``capacity`` and narrow the grid to ``max_len``: views, no copy.
        Both must be upper bounds of the live counts (any counts read since the last merge are)."""
        capacity, max_len = min(capacity, self.capacity), min(max_len, self.max_len)
        if capacity == self.capacity and max_len == self.max_len:
            return self
        slot = self.slot[:capacity]
        if max_len != self.max_len:  # the same cells in a narrower grid; dead rows stay one past it
            slot = self.image[:capacity] * max_len + self.position[:capacity]
        return CapacityState(
            x=self.x[:capacity],
            sizes=self.sizes[:capacity],
            slot=slot,
            lengths=self.lengths,
            group=self.group,
            max_len=max_len,
            dense=self.dense and capacity == self.capacity and max_len == self.max_len,
            bounds=self.bounds,  # live rows do not move
            positions=self.positions,  # sliced to the grid's width where used
            cell_base=self.cell_base if max_len == self.max_len else _cell_base(self.batch, max_len, slot.device),
        )


def _cell_base(batch: int, max_len: int, device: torch.device) -> Tensor:
    """``[B]`` long, ``b * Lc - 1``."""
    return torch.arange(-1, batch * max_len - 1, max_len, device=device)


def merge_step(state: CapacityState, partner: Tensor, merge: Tensor, valid: Tensor | None = None) -> CapacityState:
    """Merge the selected A tokens into their B partners, with no host read.

    Args:
        state: the batch before the merge (needs ``Lc >= 2``).
        partner: ``[B, Na]`` long, each A token's B partner (index among the B tokens).
        merge: ``[B, Na]`` bool, the A tokens that merge.
        valid: ``state.valid_mask()``, if the caller has it already.

    Returns:
        The batch after the merge, in buffers of the same capacity and ``Lc``. Each token is the
        size-weighted mean of what merged into it, survivors keep their raster order.

    Every op here is a kernel launch on an eager GPU, so the step is written for few of them
    (docs/benchmarks.md counts them): the grid holds the images one after the other, as the buffer
    does, so one cumsum over the flattened grid gives every survivor's new row, and one along each
    image its new position.
    """
    batch, max_len, capacity = state.batch, state.max_len, state.capacity
    # The flattened grid with one empty cell before it and one after it: the one after is where dead
    # rows' slot (B * Lc) points, the one before makes the survivor count up to each cell's
    # predecessor (its new row) a view of one cumsum.
    valid = state.valid_mask() if valid is None else valid
    cells = torch.nn.functional.pad(valid.reshape(-1), (1, 1))  # [B * Lc + 2]
    keep = cells[1:-1].view(batch, max_len)
    keep[:, 0::2].masked_fill_(merge, False)
    kept = keep.cumsum(dim=-1)  # [B, Lc] long: survivors up to and including each cell
    new_lengths = kept[:, -1]
    count = cells.cumsum(dim=0)  # [B * Lc + 2]: survivors up to and including each padded cell
    # Each survivor's new row is the count before it; every other cell (and the extra one) points
    # at the trash row. Indexed by grid slot: row[b * Lc + p].
    row = torch.where(cells[1:], count[:-1], capacity)  # [B * Lc + 1]
    # A survivor's new cell is b * Lc + (its new position); the -1 turns a count into a position.
    base = _cell_base(batch, max_len, keep.device) if state.cell_base is None else state.cell_base
    cell = kept + base[:, None]
    slot = torch.full((capacity + 1,), batch * max_len, device=keep.device)
    slot = slot.scatter_(0, row[:-1], cell.view(-1))[:capacity]
    # Merged A tokens follow their partner, a survivor (in place: the slots above are written).
    grid_row = row[:-1].view(batch, max_len)
    a_rows, partner_rows = grid_row[:, 0::2], grid_row[:, 1::2].gather(1, partner)
    if torch.compiler.is_compiling():  # Dynamo refuses a strided out=; Inductor fuses the copy anyway
        a_rows.copy_(torch.where(merge, partner_rows, a_rows))
    else:  # eager: one kernel, writing over its own input element for element
        torch.where(merge, partner_rows, a_rows, out=a_rows)
    destination = row[state.slot]  # [Tc]: each buffer row's new row

    # One scatter carries the size-weighted sums and the sizes, accumulated in at least float32
    # (bf16 sums of several tokens lose the weights' precision). A half-precision x times float32
    # sizes promotes to float32 in the multiply itself: no separate cast.
    channels = state.x.shape[1]
    sizes = state.sizes.to(accumulation_dtype(state.x.dtype))[:, None]
    weighted = torch.cat([state.x * sizes, sizes], dim=1)  # [Tc, C + 1], differentiable
    summed = weighted.new_zeros(capacity + 1, channels + 1).index_add_(0, destination, weighted)[:capacity]
    sizes = summed[:, channels]
    # Rows nobody lands in are dead: size 0, value 0 (the clamp only guards the division; a NaN
    # there would reach the weights' gradients through 0 * NaN).
    x = (summed[:, :channels] / sizes.clamp(min=1.0)[:, None]).to(state.x.dtype)

    return CapacityState(
        x=x,
        sizes=sizes.float(),
        slot=slot,
        lengths=new_lengths,
        group=destination[state.group],
        max_len=max_len,
        bounds=count[0 : batch * max_len + 1 : max_len],  # [0, end of image 0, ...]: a view, no op
        positions=state.positions,
        cell_base=state.cell_base,
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
