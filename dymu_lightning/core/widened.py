"""Proportional attention as widened heads, folded into the host's projection weights.

Bias-free attention kernels (``varlen_attn``) take proportional attention as widened heads:
``q' = [q, 1, 0...]``, ``k' = [k, log(s)/scale, 0...]``, ``v' = [v, 0...]``, head dim ``d -> dw``
(a multiple of 8, :func:`~dymu_lightning.core.packed_attention.widened_head_dim`). Built per call
that is a zero-padded copy of q, k and v per layer. Folded into the weights it is free: the qkv
projection gets zero rows where the extra columns go and a bias of 1 on q's column ``d``, so it
emits ``[T, 3, H, dw]`` directly; one strided write puts ``log(s)/scale`` into k's column ``d``; the
output projection gets zero weight columns, so it consumes ``[T, H * dw]`` as the kernel returns it.
The GEMMs grow by ``dw / d`` along one dimension (12.5% at d = 64).

The folded weights are a copy of the host's (``(3 + 1) * C * H * dw`` values per block), made once
and kept per host module while its weights stay the same tensors at the same version; under autograd
with weights that require grad they are folded on every call instead, so gradients reach the host.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from dymu_lightning.core.matching import accumulation_dtype
from dymu_lightning.core.packed_attention import DEAD_LOGIT, widened_head_dim


@dataclass(frozen=True)
class AttentionLinears:
    """The linear maps of one host attention, described so that widened heads fold into them.

    Attributes:
        norm: ``[T, C] -> [T, C]``, what precedes the projections (the block's first norm).
        qkv: the projections: one fused ``nn.Linear`` with ``3 * H * d`` outputs ordered
            (q|k|v, head, dim), or three ``nn.Linear`` (q, k, v) with ``H * d`` outputs each.
        out: the output projection, ``nn.Linear`` with ``H * d`` inputs.
        after_out: ``[T, C] -> [T, C]``, what follows ``out`` in the residual branch (layer scale,
            drop path), or None.
        head_dim: ``d``.
        q_norm, k_norm: per-head norms ``[T, H, d] -> [T, H, d]`` on q and k, or None.
    """

    norm: Callable[[Tensor], Tensor]
    qkv: Sequence[nn.Linear]
    out: nn.Linear
    after_out: Callable[[Tensor], Tensor] | None
    head_dim: int
    q_norm: Callable[[Tensor], Tensor] | None = None
    k_norm: Callable[[Tensor], Tensor] | None = None

    @property
    def heads(self) -> int:
        return self.out.in_features // self.head_dim


def plain_linears(*modules: nn.Module) -> bool:
    """True when every module is exactly ``nn.Linear``: its ``weight`` is the map it applies. A
    wrapper (LoRA, a quantised linear) is not, and keeps the per-call widening."""
    return all(type(module) is nn.Linear for module in modules)


@dataclass(frozen=True)
class FoldedWeights:
    """Widened copies of one attention's projection weights.

    Attributes:
        qkv_weight: ``[3 * H * dw, C]``, zero rows in each head's columns ``d..dw``.
        qkv_bias: ``[3 * H * dw]``, 1 in q's column ``d`` of every head.
        out_weight: ``[C, H * dw]``, zero columns in each head's columns ``d..dw``.
        out_bias: ``[C]`` or None.
    """

    qkv_weight: Tensor
    qkv_bias: Tensor
    out_weight: Tensor
    out_bias: Tensor | None


def fold_weights(linears: AttentionLinears) -> FoldedWeights:
    """The widened weights of ``linears`` (differentiable in the host's parameters)."""
    d, heads = linears.head_dim, linears.heads
    pad = widened_head_dim(d) - d
    weight = torch.cat([linear.weight for linear in linears.qkv]) if len(linears.qkv) > 1 else linears.qkv[0].weight
    channels = weight.shape[1]
    qkv_weight = F.pad(weight.view(3, heads, d, channels), (0, 0, 0, pad)).view(-1, channels)
    biases = [
        linear.bias if linear.bias is not None else weight.new_zeros(linear.out_features) for linear in linears.qkv
    ]
    bias = torch.cat(biases) if len(biases) > 1 else biases[0]
    qkv_bias = F.pad(bias.view(3, heads, d), (0, pad))
    qkv_bias[0, :, d] = 1.0  # q's 1: the kernel's scale times log(s)/scale gives back log(s)
    out = linears.out
    out_weight = F.pad(out.weight.view(out.out_features, heads, d), (0, pad)).view(out.out_features, -1)
    return FoldedWeights(qkv_weight, qkv_bias.view(-1), out_weight, out.bias)


# Folded weights per output projection (one per host block); an entry goes with its module.
_FOLDS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, FoldedWeights]] = weakref.WeakKeyDictionary()


def _parameters(linears: AttentionLinears) -> list[Tensor]:
    modules = (*linears.qkv, linears.out)
    return [p for m in modules for p in (m.weight, m.bias) if p is not None]


def _key(parameters: Sequence[Tensor]) -> tuple:
    # The storage itself (a weak reference: a freed storage's address may come back, with the same
    # version, after .double().float()) and its version (in-place updates: optimisers, load_state_dict).
    return tuple(
        (StorageWeakRef(p.untyped_storage()), p.storage_offset(), p.shape, p.stride(), p.dtype, p._version)
        for p in parameters
    )


def _same(old: tuple, new: tuple) -> bool:
    return all(o[0] == n[0] and not o[0].expired() and o[1:] == n[1:] for o, n in zip(old, new, strict=True))


def folded_weights(linears: AttentionLinears) -> FoldedWeights:
    """The folded weights of ``linears``, from the cache while the host's weights are unchanged.

    A stale entry is refreshed *in place* when the shapes, dtypes and devices still match, so a CUDA
    graph that captured the folded tensors sees the host's new weights (the engine refreshes every
    block before a replay). Under autograd with weights that require grad, a fresh differentiable fold.
    """
    parameters = _parameters(linears)
    if torch.is_grad_enabled() and any(p.requires_grad for p in parameters):
        return fold_weights(linears)
    key = _key(parameters)
    cached = _FOLDS.get(linears.out)
    if cached is not None and _same(cached[0], key):
        return cached[1]
    # Plain tensors even inside inference mode: the cache outlives the mode it was filled in.
    with torch.inference_mode(False), torch.no_grad():
        fresh = fold_weights(linears)
        if type(fresh.qkv_weight) is not torch.Tensor:  # a fake or traced tensor: never cache it
            return fresh
        if cached is not None and _same_layout(cached[1], fresh):
            for old, new in zip(_tensors(cached[1]), _tensors(fresh), strict=True):
                old.copy_(new)
            fresh = FoldedWeights(*_tensors(cached[1]), out_bias=fresh.out_bias)
    _FOLDS[linears.out] = (key, fresh)
    return fresh


def _tensors(folded: FoldedWeights) -> list[Tensor]:
    # out_bias is the host's own tensor, never a copy: nothing to refresh there.
    return [folded.qkv_weight, folded.qkv_bias, folded.out_weight]


def _same_layout(old: FoldedWeights, new: FoldedWeights) -> bool:
    return all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        for a, b in zip(_tensors(old), _tensors(new), strict=True)
    )


def log_size_column(sizes: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``[T]`` k's extra column: ``log(size) / scale``, and ``DEAD_LOGIT / scale`` for dead rows
    (finite: ``0 * -inf`` would be NaN in q's zero columns). Divided before any cast to a half
    type, so that the product with q's 1 is exact in the kernel's accumulator."""
    return sizes.to(accumulation_dtype(dtype)).log().clamp_(min=DEAD_LOGIT).div_(scale)


@dataclass(frozen=True)
class WidenedAttention:
    """One block's attention in widened heads: projections in, projection out.

    Attributes:
        qkv: ``(x [T, C], sizes [T]) -> (h [T, 3, H, dw], d)``: q', k' (with the log-size column)
            and v', and the real head dim ``d``.
        out: ``[T, H, dw] -> [T, C]``: the rest of the attention's residual branch.
    """

    qkv: Callable[[Tensor, Tensor], tuple[Tensor, int]]
    out: Callable[[Tensor], Tensor]


def fold_attention(linears: AttentionLinears, scale: float) -> WidenedAttention:
    """Widened heads through folded weights: no per-call copy of q, k or v (one with q/k norms)."""
    folded = folded_weights(linears)
    d = linears.head_dim

    def qkv(x: Tensor, sizes: Tensor) -> tuple[Tensor, int]:
        h = F.linear(linears.norm(x), folded.qkv_weight, folded.qkv_bias)
        h = h.view(x.shape[0], 3, linears.heads, -1)
        if linears.q_norm is not None or linears.k_norm is not None:
            # Per-head norms see the d real columns only; this variant pays one copy.
            q, k, v = h.unbind(1)
            h = torch.stack((_norm_first(q, linears.q_norm, d), _norm_first(k, linears.k_norm, d), v), dim=1)
        h[:, 1, :, d] = log_size_column(sizes, scale, h.dtype)[:, None]
        return h, d

    def out(o: Tensor) -> Tensor:
        y = F.linear(o.flatten(1), folded.out_weight, folded.out_bias)
        return y if linears.after_out is None else linears.after_out(y)

    return WidenedAttention(qkv=qkv, out=out)


def _norm_first(t: Tensor, norm: Callable[[Tensor], Tensor] | None, d: int) -> Tensor:
    return t if norm is None else torch.cat([norm(t[..., :d]), t[..., d:]], dim=-1)


def widen_per_call(
    attn_in: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    attn_out: Callable[[Tensor], Tensor],
    scale: float,
) -> WidenedAttention:
    """Widened heads for a block whose projections cannot be folded (no :class:`AttentionLinears`):
    the host's q, k, v are copied into widened heads on every call, and the output sliced back."""
    head_dim: list[int] = []  # the real d, learnt from the host's q (out always follows qkv)

    def qkv(x: Tensor, sizes: Tensor) -> tuple[Tensor, int]:
        q, k, v = attn_in(x)
        d = q.shape[-1]
        h = F.pad(torch.stack((q, k, v), dim=1), (0, widened_head_dim(d) - d))  # [T, 3, H, dw]
        h[:, 0, :, d] = 1.0
        h[:, 1, :, d] = log_size_column(sizes, scale, h.dtype)[:, None]
        head_dim[:] = [d]
        return h, d

    def out(o: Tensor) -> Tensor:
        # The extra columns are v's zeros; the host's projection takes the d real ones.
        return attn_out(o[..., : head_dim[0]].flatten(1))

    return WidenedAttention(qkv=qkv, out=out)
