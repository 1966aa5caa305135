"""DToMe for towers with rotary attention that hand their tokens on in units (Qwen2-VL, Qwen2.5-VL).

Such a tower differs from a plain ViT in three ways, and each has an answer here:

* **Units.** A patch merger after the last block folds every ``k`` consecutive tokens (a 2x2 window
  of patches, one language-model cell) into one output token. Merging therefore works on whole
  units: a unit is ``k`` tokens that always move together, a merge averages two units sub-token by
  sub-token (size-weighted), and sizes and the group map count units. The fold after the last block
  stays exact: every merged row still holds ``k`` sub-tokens, and its group map is already in the
  language model's own cell grid.
* **Rotary positions.** Every token is rotated by its own position inside attention, so a merged
  token has no single position. ``"exact"`` mode attends over the *virtual full grid*: every
  original token carries its group's features (q, k, v) rotated by its own position, attention runs
  over all original tokens as in the stock tower, and a group's output is the mean of its members'
  outputs (the VTU rule). With every group a singleton this is the stock tower. ``"mean"`` mode is
  the cheap approximation: attention over the merged rows only, each rotated at its members' mean
  position, with the proportional ``log(size)`` key bias; its gap to ``"exact"`` is measured in
  tests/test_qwen_vl.py. Only ``"exact"`` saves nothing in attention (it spans the full grid); both
  run the projections and the MLP on merged rows.
* **Windows.** Blocks may attend only inside windows of units (Qwen2.5). Units carry a window id;
  matching pairs units of the same window only, so no group crosses a window, and windowed blocks
  run every window of every image as its own attention sequence (as the host's window lengths do).
* **Taps.** A tower may also hand on features of intermediate blocks (Qwen3-VL's DeepStack: each
  through its own patch merger, added to the language model's hidden states at the visual
  positions). A tap at block ``k`` sees the rows of block ``k``, more than the output has; merging
  is hierarchical, so every output group is a union of block-``k`` groups, and the tap's feature for
  an output row is the mean over its original units of the tap's output for the block-``k`` row that
  held the unit: exactly the mean of what the stock tower's units would have received if each read
  its block-``k`` row. With nothing merged it is the stock tap.

Images of different unit counts share one packed batch; each image merges on its own (matching,
ranking and caps are per image), so its result does not depend on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dymu_lightning.core.attention import Backend, attention
from dymu_lightning.core.encoder import MergedTokens
from dymu_lightning.core.layout import TokenLayout
from dymu_lightning.core.matching import bipartite_edges
from dymu_lightning.core.merge import TokenState, merge_tokens
from dymu_lightning.core.policy import MergePolicy

RotaryMode = Literal["exact", "mean"]
ROTARY_MODES: tuple[str, ...] = ("exact", "mean")


@dataclass(frozen=True)
class RotaryBlockParts:
    """One host block whose attention rotates q and k by token positions.

    Attributes:
        attn_in: ``[T, C] -> (q, k, v)``, each ``[T, H, d]``, *before* the rotation: the first norm
            and the q/k/v projection.
        attn_out: ``[T, H * d] -> [T, C]``: the output projection (and whatever else follows the
            attention product in the residual branch).
        mlp: ``[T, C] -> [T, C]``: the whole second residual branch.
        scale: the attention logit scale.
        windowed: True if the block attends only within windows (the units' ``windows`` ids).
    """

    attn_in: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    attn_out: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    scale: float
    windowed: bool = False


@dataclass(frozen=True)
class Rotary:
    """The host's rotary embedding, in two steps.

    Attributes:
        angles: ``positions [N, P]`` (float, possibly fractional) ``-> (cos, sin)``, each ``[N, d]``.
        rotate: ``(q, k, cos, sin) -> (q, k)`` with q, k ``[N, H, d]``: the host's own rotation
            (in the host's precision).
    """

    angles: Callable[[Tensor], tuple[Tensor, Tensor]]
    rotate: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class UnitBatch:
    """Embedded tokens of several images, packed, in units of ``unit`` consecutive tokens.

    Attributes:
        x: ``[N, C]`` tokens, image after image; each image's tokens in the host's order, where the
            ``unit`` tokens of one unit are consecutive.
        units: ``[B]`` long, units per image (``N = unit * units.sum()``).
        unit: tokens per unit (4 for a 2x2 patch merger).
        positions: ``[N, P]`` float, each token's rotary position.
        windows: optional ``[U]`` long (``U = units.sum()``), each unit's attention window within its
            image; None when no block is windowed.
    """

    x: Tensor
    units: Tensor
    unit: int
    positions: Tensor
    windows: Tensor | None = None


def run_unit_blocks(
    batch: UnitBatch,
    blocks: Sequence[RotaryBlockParts],
    policy: MergePolicy,
    rotary: Rotary,
    mode: RotaryMode = "exact",
    final: Callable[[Tensor], Tensor] | None = None,
    backend: Backend = "sdpa",
    taps: Mapping[int, Callable[[Tensor], Tensor]] | None = None,
) -> MergedTokens:
    """Run ``blocks`` on a :class:`UnitBatch`, merging units as ``policy`` says.

    Args:
        batch: the embedded images.
        blocks: the host blocks to run, in order.
        policy: where and how much to merge (validated by the caller); edges are between units.
        rotary: the host's rotary embedding.
        mode: ``"exact"`` (attention over the virtual full grid) or ``"mean"`` (over merged rows,
            rotated at the mean member position).
        final: optional map ``[T, unit * C] -> [T, C']`` after the last block (the patch merger).
        backend: ``"sdpa"`` or ``"eager"`` attention.
        taps: block index -> map ``[T, unit * C] -> [T, C'']`` read after that block (the whole
            block, merge included); each tap's output is averaged into the output rows (module
            docstring) and returned in :attr:`MergedTokens.taps`, in block order.

    Returns:
        :class:`MergedTokens` whose tokens are units: ``tokens`` ``[B, L, C']`` (``[B, L, unit * C]``
        without ``final``), sizes in units, ``group`` ``[B, U0]`` with ``U0`` the most units of any
        image (``-1`` past an image's own units), ``num_prefix`` 0. One host read per merging layer.
    """
    if mode not in ROTARY_MODES:
        raise ValueError(f"unknown rotary mode {mode!r}; expected one of {ROTARY_MODES}")
    if any(block.windowed for block in blocks) and batch.windows is None:
        raise ValueError("a windowed block needs the units' window ids (UnitBatch.windows)")
    k = batch.unit
    tokens, channels = batch.x.shape
    units = batch.units
    total, longest = torch.stack([units.sum(), units.max()]).tolist()
    if tokens != total * k:
        raise ValueError(f"{tokens} tokens are not {total} units of {k}")
    layout = TokenLayout.from_lengths(units, longest, total)
    # The original units: where each sits, and which are real (images with fewer units are padded).
    unit_valid = layout.valid_mask()  # [B, U0]
    group = torch.arange(longest, device=units.device).expand(units.shape[0], -1) * unit_valid
    state = TokenState(batch.x.reshape(total, k * channels), torch.ones(total, device=units.device), layout, group)
    original = _OriginalGrid.build(batch, layout, rotary, mode)

    counts = [units]
    taps = taps or {}
    tapped = []  # per tap: [U, C''] each original unit's feature (the tap on the row holding it)
    for layer, parts in enumerate(blocks):
        rows = state.x.view(-1, channels)  # [T * k, C]
        q, key, v = parts.attn_in(rows)
        token_rows = original.token_rows(state)  # [N], each original token's row
        if mode == "exact":
            out = _virtual_grid_attention(q, key, v, token_rows, state, original, parts, rotary, backend)
        else:
            out = _mean_position_attention(q, key, v, token_rows, state, original, parts, rotary, backend)
        state = _with_x(state, state.x + parts.attn_out(out.flatten(1)).view(state.x.shape))
        if policy.merges_at(layer) and state.layout.max_len >= 2:
            # The similarity metric: unrotated keys (a merged unit has no single position), averaged
            # over heads, the unit's k sub-tokens side by side.
            keys = state.layout.pad(key.mean(dim=1).reshape(state.x.shape[0], -1))
            windows = None if original.windows is None else state.layout.pad(original.row_windows(state, token_rows))
            edges = bipartite_edges(keys, state.layout.valid_mask(), 0, windows)
            decision = policy.select(layer, edges, state.layout.lengths)
            if policy.on_layer is not None:
                policy.on_layer(decision)
            state = merge_tokens(state, edges.partner, decision.merge)
        state = _with_x(state, state.x + parts.mlp(state.x.view(-1, channels)).view(state.x.shape))
        counts.append(state.layout.lengths)
        if layer in taps:
            tapped.append(taps[layer](state.x)[original.unit_rows(state)])

    packed = state.x if final is None else final(state.x)
    out_layout = state.layout
    rows = original.unit_rows(state)
    return MergedTokens(
        tokens=out_layout.pad(packed),
        sizes=out_layout.pad(state.sizes),
        mask=out_layout.valid_mask(),
        group=state.group.masked_fill(~unit_valid, -1),
        tokens_per_layer=torch.stack(counts, dim=1),
        num_prefix=0,
        packed=packed,
        layout=out_layout,
        taps=tuple(_members_mean(feature, rows, state.x.shape[0]) for feature in tapped),
    )


def _with_x(state: TokenState, x: Tensor) -> TokenState:
    return TokenState(x=x, sizes=state.sizes, layout=state.layout, group=state.group)


@dataclass(frozen=True)
class _OriginalGrid:
    """The tokens as the stock tower holds them, fixed for the whole forward.

    Attributes:
        layout: ``[B, Nmax]`` grid of original tokens (``unit`` per original unit).
        unit_index: ``[U]`` long, each real original unit's ``(image, unit)`` cell in ``[B, U0]``.
        cos, sin: ``[N, d]`` each original token's rotation (``"exact"`` mode only).
        positions: ``[N, P]`` original positions (``"mean"`` mode).
        windows: ``[U]`` each original unit's window, or None.
        unit: tokens per unit.
    """

    layout: TokenLayout
    unit_index: Tensor
    cos: Tensor | None
    sin: Tensor | None
    positions: Tensor
    windows: Tensor | None
    unit: int

    @classmethod
    def build(cls, batch: UnitBatch, units: TokenLayout, rotary: Rotary, mode: RotaryMode) -> _OriginalGrid:
        k = batch.unit
        layout = TokenLayout.from_lengths(units.lengths * k, units.max_len * k, units.total * k)
        cos = sin = None
        if mode == "exact":
            cos, sin = rotary.angles(batch.positions)
        return cls(layout, units.flat_index(), cos, sin, batch.positions, batch.windows, k)

    def unit_rows(self, state: TokenState) -> Tensor:
        """``[U]`` long: the packed row (of ``[T]``) that holds each original unit."""
        group_flat = state.group.flatten()[self.unit_index]  # [U], position within the image
        images = torch.div(self.unit_index, state.group.shape[1], rounding_mode="floor")
        return state.layout.starts()[images] + group_flat

    def token_rows(self, state: TokenState) -> Tensor:
        """``[N]`` long: the packed sub-token row (of ``[T * k]``) that each original token reads."""
        unit_rows = self.unit_rows(state)
        return (unit_rows[:, None] * self.unit + torch.arange(self.unit, device=unit_rows.device)).flatten()

    def row_windows(self, state: TokenState, token_rows: Tensor) -> Tensor:
        """``[T]`` each merged unit's window (its members share one: matching never crosses)."""
        rows = token_rows[:: self.unit] // self.unit
        return torch.zeros_like(state.sizes, dtype=torch.long).scatter_(0, rows, self.windows)

    def token_windows(self) -> Tensor:
        """``[N]`` each original token's window."""
        return self.windows.repeat_interleave(self.unit)


def _members_mean(out: Tensor, token_rows: Tensor, rows: int) -> Tensor:
    """``[N, *F]`` values of the original tokens (or units) -> ``[rows, *F]`` means over each row's
    members (``token_rows``: ``[N]``, each one's row)."""
    summed = out.new_zeros(rows, *out.shape[1:]).index_add_(0, token_rows, out)
    members = torch.bincount(token_rows, minlength=rows).clamp(min=1).to(out.dtype)
    return summed / members.view(-1, *[1] * (out.dim() - 1))


def _grid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    key_bias: Tensor | None,
    windows: Tensor | None,
    scale: float,
    backend: Backend,
) -> Tensor:
    """Per-image attention on the padded grid of ``layout``; keys of other windows and padding masked.

    Args:
        q, k, v: ``[T, H, d]`` packed.
        key_bias: optional ``[T]`` additive key bias (``log(size)``).
        windows: optional ``[T]`` window ids (attention stays inside a window).

    Returns:
        ``[T, H, d]``.
    """
    if windows is not None:
        return _window_attention(q, k, v, layout, key_bias, windows, scale, backend)
    q_g, k_g, v_g = layout.pad_stack([q, k, v]).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, d]
    if key_bias is None and layout.is_dense:
        # no padding, no windows, no sizes: plain attention, as the stock tower runs it
        return layout.pack(attention(q_g, k_g, v_g, scale, None, backend).transpose(1, 2))
    valid = layout.valid_mask()  # [B, L]
    allowed = valid[:, None, :].expand(-1, layout.max_len, -1)
    # A padding query sees itself, so no softmax row is empty (its output is never read).
    allowed = allowed | torch.eye(layout.max_len, dtype=torch.bool, device=allowed.device)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    if key_bias is not None:
        bias = bias + layout.pad(key_bias.to(q.dtype))[:, None, :]
    out = attention(q_g, k_g, v_g, scale, bias[:, None], backend)  # [B, H, L, d]
    return layout.pack(out.transpose(1, 2))


def _window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    key_bias: Tensor | None,
    windows: Tensor,
    scale: float,
    backend: Backend,
) -> Tensor:
    """:func:`_grid_attention` within windows: every (image, window) becomes its own sequence, as the
    host's ``cu_window_seqlens`` make them, so the cost is the sum of the windows' squares, not the
    images' (a mask over the whole image would spend ``L^2`` on products it then discards). Tokens
    are grouped by window stably, so each window keeps its tokens' order. Returns ``[T, H, d]``."""
    segment = layout.batch_index * (int(windows.max()) + 1) + windows  # [T], one id per (image, window)
    order = torch.argsort(segment, stable=True)
    _, lengths = torch.unique_consecutive(segment[order], return_counts=True)
    windowed = TokenLayout.from_lengths(lengths, int(lengths.max()), layout.total)
    bias = None if key_bias is None else key_bias[order]
    out = _grid_attention(q[order], k[order], v[order], windowed, bias, None, scale, backend)
    return torch.empty_like(out).index_copy_(0, order, out)


def _virtual_grid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    token_rows: Tensor,
    state: TokenState,
    original: _OriginalGrid,
    parts: RotaryBlockParts,
    rotary: Rotary,
    backend: Backend,
) -> Tensor:
    """Exact: every original token carries its row's q, k, v, rotated at its own position; attention
    over the original tokens as the stock tower runs it; each row gets its members' mean output.
    Sizes need no bias here: a group of s members is s keys. Returns ``[T * k, H, d]``."""
    q_e, k_e = rotary.rotate(q[token_rows], k[token_rows], original.cos, original.sin)
    windows = original.token_windows() if parts.windowed else None
    out = _grid_attention(q_e, k_e, v[token_rows], original.layout, None, windows, parts.scale, backend)
    return _members_mean(out, token_rows, q.shape[0])


def _mean_position_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    token_rows: Tensor,
    state: TokenState,
    original: _OriginalGrid,
    parts: RotaryBlockParts,
    rotary: Rotary,
    backend: Backend,
) -> Tensor:
    """Approximate: attention over the merged rows, each rotated at its members' mean position, with
    the proportional ``log(size)`` key bias. Returns ``[T * k, H, d]``."""
    rows = q.shape[0]
    positions = original.positions.to(torch.float64)
    summed = positions.new_zeros(rows, positions.shape[1]).index_add_(0, token_rows, positions)
    members = torch.bincount(token_rows, minlength=rows).clamp(min=1)
    cos, sin = rotary.angles((summed / members[:, None]).to(original.positions.dtype))
    q_r, k_r = rotary.rotate(q, k, cos, sin)
    k_units = state.layout
    layout = TokenLayout.from_lengths(k_units.lengths * original.unit, k_units.max_len * original.unit, rows)
    sizes = state.sizes.repeat_interleave(original.unit)
    windows = None
    if parts.windowed:
        windows = original.row_windows(state, token_rows).repeat_interleave(original.unit)
    return _grid_attention(q_r, k_r, v, layout, sizes.log(), windows, parts.scale, backend)
