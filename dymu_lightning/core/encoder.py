"""The DToMe forward: a host ViT's blocks, run on a packed batch that shrinks layer by layer.

Every block is pre-norm, ``x = x + attn(norm1(x))`` then ``x = x + mlp(norm2(x))``, and merging sits
between the two branches (as in ToMe). A backbone adapter exposes each host block as a
:class:`BlockParts`; this module owns everything else, so every host family shares one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dymu_lightning.core.attention import Backend, attention
from dymu_lightning.core.layout import TokenLayout
from dymu_lightning.core.matching import bipartite_edges
from dymu_lightning.core.merge import TokenState, merge_tokens
from dymu_lightning.core.policy import MergePolicy


@dataclass(frozen=True)
class BlockParts:
    """One host transformer block, cut where DToMe needs to step in.

    Attributes:
        attn_in: ``[T, C] -> (q, k, v)``, each ``[T, H, d]``: the first norm, the projections and
            any q/k norms of the host attention.
        attn_out: ``[T, H * d] -> [T, C]``: what follows the attention product in the residual
            branch (output norm and projection, layer scale, drop path).
        mlp: ``[T, C] -> [T, C]``: the whole second residual branch (norm, MLP, layer scale, drop path).
        scale: the attention logit scale.
    """

    attn_in: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    attn_out: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    scale: float


@dataclass(frozen=True)
class MergedTokens:
    """What a patched encoder returns: a variable-length batch, padded and packed.

    Attributes:
        tokens: ``[B, L, C]``, zeros in the padding slots.
        sizes: ``[B, L]`` float32, original tokens each output token stands for; 0 in padding.
        mask: ``[B, L]`` bool, True for real tokens.
        group: ``[B, N0]`` long, for each original patch token the position (in its image's row)
            of the output token that represents it.
        tokens_per_layer: ``[B, num_blocks + 1]`` long, tokens per image before the first block and
            after each block.
        num_prefix: leading tokens of each image that never merge (CLS, registers).
        packed: ``[T, C]``, the real tokens only, image after image.
        layout: packed <-> padded index maps.
    """

    tokens: Tensor
    sizes: Tensor
    mask: Tensor
    group: Tensor
    tokens_per_layer: Tensor
    num_prefix: int
    packed: Tensor
    layout: TokenLayout

    @property
    def lengths(self) -> Tensor:
        """``[B]`` long, output tokens per image."""
        return self.layout.lengths


def run_blocks(
    x: Tensor,
    blocks: Sequence[BlockParts],
    policy: MergePolicy,
    num_prefix: int,
    final: Callable[[Tensor], Tensor] | None = None,
    backend: Backend = "sdpa",
) -> MergedTokens:
    """Run ``blocks`` on embedded tokens, merging as ``policy`` says.

    Args:
        x: ``[B, N, C]`` tokens after the host's embedding (prefix tokens first).
        blocks: the host blocks to run, in order.
        policy: where and how much to merge; validated by the caller.
        num_prefix: leading tokens that never merge.
        final: optional position-wise map after the last block (the host's final norm).
        backend: attention backend, ``"sdpa"`` or ``"eager"``.
    """
    state = TokenState.start(x, num_prefix)
    initial_total = state.layout.total
    counts = [state.layout.lengths]
    for layer, parts in enumerate(blocks):
        # Until something has merged every size is 1 and no image is padded: the plain,
        # unmasked attention is then exact and lets SDPA pick its fastest kernel.
        merged = state.layout.total < initial_total
        branch, keys = _attention_branch(parts, state, merged, backend)
        state = replace(state, x=state.x + branch)
        if policy.merges_at(layer) and state.layout.max_len >= 2:
            edges = bipartite_edges(keys.mean(dim=1), state.layout.valid_mask(), num_prefix)
            decision = policy.select(layer, edges, state.layout.lengths)
            if policy.on_layer is not None:
                policy.on_layer(decision)
            state = merge_tokens(state, edges.partner, decision.merge)
        state = replace(state, x=state.x + parts.mlp(state.x))
        counts.append(state.layout.lengths)

    packed = state.x if final is None else final(state.x)
    layout = state.layout
    return MergedTokens(
        tokens=layout.pad(packed),
        sizes=layout.pad(state.sizes),
        mask=layout.valid_mask(),
        group=state.group,
        tokens_per_layer=torch.stack(counts, dim=1),
        num_prefix=num_prefix,
        packed=packed,
        layout=layout,
    )


def _attention_branch(parts: BlockParts, state: TokenState, merged: bool, backend: Backend) -> tuple[Tensor, Tensor]:
    """The attention residual branch on packed tokens.

    Returns:
        ``[T, C]`` branch output, and the keys ``[B, H, L, d]`` in the padded grid (averaged over
        heads, they are the similarity metric for matching).
    """
    layout = state.layout
    q, k, v = parts.attn_in(state.x)
    if layout.is_dense:  # views: the same memory layout the stock attention gets
        q, k, v = (layout.pad(t).transpose(1, 2) for t in (q, k, v))
    else:  # [B, H, L, d] each, from one zero-filled buffer
        q, k, v = layout.pad_stack((q, k, v)).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if merged:
        log_sizes = layout.pad(state.sizes.to(q.dtype).log(), fill=float("-inf"))  # padding keys: -inf
        bias = log_sizes[:, None, None, :]
    out = attention(q, k, v, parts.scale, bias, backend)
    out = layout.pack(out.transpose(1, 2)).flatten(1)  # [T, H * d]
    return parts.attn_out(out), k
