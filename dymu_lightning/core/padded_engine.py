"""Today's engine before the capacity buffers, kept as a reference for tests and benchmarks.

Exact per-layer shapes: after each merging layer it reads the new token counts on the host (one
sync per merging layer) and runs attention on a padded ``[B, L]`` grid with a float bias.
:func:`dymu_lightning.core.encoder.run_blocks` must agree with it (tests/test_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from dymu_lightning.core.attention import Backend, attention
from dymu_lightning.core.encoder import BlockParts, MergedTokens
from dymu_lightning.core.matching import bipartite_edges
from dymu_lightning.core.merge import TokenState, merge_tokens
from dymu_lightning.core.policy import MergePolicy


def run_blocks_padded(
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
