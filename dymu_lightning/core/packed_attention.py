"""Proportional attention over packed tokens with per-image boundaries, without a host sync.

The tokens of a batch sit in one capacity buffer ``[Tc, ...]``: each image's live tokens in raster
order, image after image, then dead rows (size 0) up to the capacity. Two kernels compute the same
attention on it:

* CUDA: ``torch.nn.attention.varlen.varlen_attn`` with ``cu_seqlens``. It takes no bias, so the
  ``log(size)`` term rides in *widened heads*: ``q' = [q, 1, 0...]``, ``k' = [k, log(s)/scale, 0...]``,
  ``v' = [v, 0...]``, head dim padded to a multiple of 8, so that ``scale * q'.k' = scale * q.k + log s``.
* CPU (and the reference): a padded ``[B, Lc]`` grid built by one scatter, with ``log(size)`` as an
  additive key bias. ``Lc`` is any upper bound on the longest image (a key beyond an image's end has
  bias ``-inf``, so it draws exactly nothing), which is why the grid needs no host read.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu_lightning.core.attention import Backend, attention
from dymu_lightning.core.matching import accumulation_dtype

#: Logit of a dead key in the widened column: large and finite, because ``0 * -inf`` is NaN in the
#: zero columns of q'. ``exp(-3e4)`` is 0 in every float format.
DEAD_LOGIT = -3.0e4
#: Flash kernels need the head dim to be a multiple of this.
HEAD_DIM_MULTIPLE = 8


def widened_head_dim(head_dim: int) -> int:
    """The head dim with one extra column, rounded up to a multiple of 8 (64 -> 72)."""
    return -(-(head_dim + 1) // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


def key_log_sizes(sizes: Tensor) -> Tensor:
    """``[T]`` ``log(size)``, and :data:`DEAD_LOGIT` for dead rows (size 0)."""
    return torch.where(sizes > 0, sizes.log(), DEAD_LOGIT)


def widen_heads(q: Tensor, k: Tensor, v: Tensor, sizes: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Fold proportional attention into the heads: bias-free attention on the result, with the same
    ``scale``, equals ``softmax(scale * q.k + log s) v`` on the first ``d`` output columns.

    Args:
        q, k, v: ``[T, H, d]``.
        sizes: ``[T]``, tokens each key stands for (0 = dead row).
        scale: the logit scale the kernel will apply.

    Returns:
        q', k', v', each ``[T, H, dw]`` with ``dw = widened_head_dim(d)``; the extra output columns
        are zero.
    """
    head_dim = q.shape[-1]
    # One copy of q, k and v into the zero-padded widths (3 kernels fewer than zeros + 3 writes).
    widened = F.pad(torch.stack((q, k, v)), (0, widened_head_dim(head_dim) - head_dim))  # [3, T, H, dw]
    widened[0, :, :, head_dim] = 1.0
    # Divided in at least float32 before the cast: the product with q's 1 is exact in the accumulator.
    log_sizes = key_log_sizes(sizes.to(accumulation_dtype(q.dtype)))
    widened[1, :, :, head_dim] = (log_sizes / scale).to(q.dtype)[:, None]
    return widened[0], widened[1], widened[2]


def scatter_to_grid(packed: Tensor, slots: Tensor, batch: int, max_len: int) -> Tensor:
    """``[T, *F]`` -> ``[B, Lc, *F]``, zeros where no live row lands (one scatter, no host read)."""
    features = packed.shape[1:]
    grid = packed.new_zeros(batch * max_len + 1, *features)
    grid.index_copy_(0, slots, packed)
    return grid[:-1].view(batch, max_len, *features)


def grid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sizes: Tensor,
    slots: Tensor,
    batch: int,
    max_len: int,
    scale: float,
    backend: Backend = "sdpa",
    with_keys: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The reference: attention per image on a padded grid with a ``log(size)`` key bias.

    Args:
        q, k, v: ``[T, H, d]`` packed rows.
        sizes: ``[T]`` row sizes (0 = dead row).
        slots: ``[T]`` each row's grid cell ``b * Lc + p``; ``B * Lc`` for dead rows.
        batch, max_len: the grid ``[B, Lc]``; ``Lc`` may exceed the longest image.
        scale: logit scale.
        with_keys: also return the keys in the grid (matching reads them there, so it needs no
            scatter of its own).

    Returns:
        ``[T, H, d]``; dead rows hold a copy of some live row's output (never read as live data).
        With ``with_keys``, also the keys ``[B, H, Lc, d]``, zero in empty cells.
    """
    heads, head_dim = q.shape[1:]
    cells = batch * max_len
    # One zero-filled buffer and one scatter for q, k and v: the padding is written once.
    stacked = q.new_zeros(cells + 1, 3, heads, head_dim)
    stacked.index_copy_(0, slots, torch.stack((q, k, v), dim=1))
    q_g, k_g, v_g = stacked[:-1].view(batch, max_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    # Empty cells keep size 0, so their key bias is log 0 = -inf: padding masks itself.
    bias = scatter_to_grid(sizes.to(q.dtype), slots, batch, max_len).log()[:, None, None, :]
    out = attention(q_g, k_g, v_g, scale, bias, backend).transpose(1, 2)  # [B, Lc, H, d]
    out = out.reshape(cells, heads, head_dim)[slots.clamp(max=cells - 1)]
    return (out, k_g) if with_keys else out


def widened_grid_attention(
    h: Tensor,
    head_dim: int,
    slots: Tensor,
    batch: int,
    max_len: int,
    scale: float,
    backend: Backend = "sdpa",
) -> tuple[Tensor, Tensor]:
    """The reference for widened heads: bias-free attention per image on a padded grid.

    Args:
        h: ``[T, 3, H, dw]`` q', k', v' packed rows (k's column ``head_dim`` holds ``log(s)/scale``).
        slots, batch, max_len, scale, backend: as for :func:`grid_attention`.

    Returns:
        ``[T, H, dw]`` (dead rows hold a copy of some live row's output) and the keys
        ``[B, H, Lc, dw]``.
    """
    heads, width = h.shape[2:]
    cells = batch * max_len
    stacked = h.new_zeros(cells + 1, 3, heads, width)
    # Empty cells are keys that draw nothing: the dead logit in k's extra column (the grid's bias
    # of -inf in the other form).
    stacked[:, 1, :, head_dim] = DEAD_LOGIT / scale
    stacked.index_copy_(0, slots, h)
    q_g, k_g, v_g = stacked[:-1].view(batch, max_len, 3, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q_g, k_g, v_g, scale, None, backend).transpose(1, 2)  # [B, Lc, H, dw]
    return out.reshape(cells, heads, width)[slots.clamp(max=cells - 1)], k_g


#: What the flash and cuDNN varlen kernels take; float32/float64 stay on the grid reference.
VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where ``varlen_attn`` has a kernel: CUDA, half precision, torch >= 2.10."""
    if device.type != "cuda" or dtype not in VARLEN_DTYPES:
        return False
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, sizes: Tensor, cu_seqlens: Tensor, max_len: int, scale: float
) -> Tensor:
    """CUDA: packed attention with heads widened per call and ``varlen_attn``. ``max_len`` may be
    an upper bound on the longest image; rows past ``cu_seqlens[-1]`` are not inputs and their
    outputs are never read as live data. (The engine folds the widening into the projection weights
    instead, :mod:`dymu_lightning.core.widened`, and calls :func:`varlen_widened`.)

    Args:
        q, k, v: ``[T, H, d]`` packed rows.
        sizes: ``[T]`` (0 = dead row).
        cu_seqlens: ``[B + 1]`` int32, image boundaries on the device.

    Returns:
        ``[T, H, d]``.
    """
    head_dim = q.shape[-1]
    widened = torch.stack(widen_heads(q, k, v, sizes, scale), dim=1)
    return varlen_widened(widened, head_dim, cu_seqlens, max_len, scale)[..., :head_dim]


def varlen_widened(h: Tensor, head_dim: int, cu_seqlens: Tensor, max_len: int, scale: float) -> Tensor:
    """CUDA: ``varlen_attn`` on widened heads.

    Args:
        h: ``[T, 3, H, dw]`` q', k', v' (k's column ``head_dim`` holds ``log(s)/scale``).
        head_dim: the real head dim ``d``.
        cu_seqlens: ``[B + 1]`` int32; ``max_len`` any upper bound on the longest image.

    Returns:
        ``[T, H, dw]``; the columns past ``d`` are zero.
    """
    from torch.nn.attention.varlen import varlen_attn

    options = _varlen_options()
    q_w, k_w, v_w = h.unbind(1)
    kwargs = {}
    if "scale" in options:
        kwargs["scale"] = scale
    else:  # torch 2.10/2.11: the kernel applies dw ** -0.5; rescale q (and the log-size column) to match
        ratio = scale / h.shape[-1] ** -0.5
        q_w = q_w * ratio
        q_w[..., head_dim] = 1.0
        k_w = k_w.clone()
        k_w[..., head_dim] *= ratio
    if "num_splits" in options:
        kwargs["num_splits"] = 1  # one sequence's output does not depend on its batch-mates
    return varlen_attn(q_w, k_w, v_w, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


@functools.cache
def _varlen_options() -> frozenset[str]:
    """Keyword arguments this torch's ``varlen_attn`` accepts (they grew between 2.10 and 2.12)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def widened_dense_attention(q: Tensor, k: Tensor, v: Tensor, sizes: Tensor, scale: float) -> Tensor:
    """Widened heads through bias-free SDPA for one image (``[L, H, d]`` each): the CPU check that the
    widened form equals the bias form."""
    q_w, k_w, v_w = (t.transpose(0, 1) for t in widen_heads(q, k, v, sizes, scale))
    return F.scaled_dot_product_attention(q_w, k_w, v_w, scale=scale).transpose(0, 1)[..., : q.shape[-1]]
