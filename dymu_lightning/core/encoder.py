"""The DToMe forward: a host ViT's blocks, run on a packed batch that shrinks layer by layer.

Every block is pre-norm, ``x = x + attn(norm1(x))`` then ``x = x + mlp(norm2(x))``, and merging sits
between the two branches (as in ToMe). A backbone adapter exposes each host block as a
:class:`BlockParts`; this module owns everything else, so every host family shares one forward.

The batch lives in capacity buffers (:mod:`dymu_lightning.core.capacity`): position-wise layers run
on ``[Tc, C]`` rows, attention runs per image over the packed rows
(:mod:`dymu_lightning.core.packed_attention`), and no layer waits for the host. Two paths:

* dynamic: the buffers shrink whenever the host learns a newer (late) count, so the GEMMs follow
  the merges;
* static: the buffers keep their full capacity (dead rows have size 0), so every shape is fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from dymu_lightning.core.attention import Backend, attention
from dymu_lightning.core.capacity import CapacityState, LaggedCounts, merge_step
from dymu_lightning.core.cuda_graph import GraphCache, can_capture, policy_key
from dymu_lightning.core.layout import TokenLayout
from dymu_lightning.core.matching import bipartite_edges
from dymu_lightning.core.packed_attention import (
    grid_attention,
    scatter_to_grid,
    varlen_attention,
    varlen_available,
)
from dymu_lightning.core.policy import MergePolicy

EnginePath = Literal["auto", "dynamic", "static"]
PATHS: tuple[str, ...] = ("auto", "dynamic", "static")

#: On CUDA, batches up to this size take the static path (full capacity, no shrinking, every shape
#: fixed: capturable as one CUDA graph), because small batches are bound by kernel launches. A
#: placeholder until benchmarks/gpu_check.sh measures the crossover on a GPU.
STATIC_BATCH_CUTOFF = 4


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


def choose_path(path: EnginePath, batch: int, device: torch.device) -> Literal["dynamic", "static"]:
    """Resolve ``"auto"``: static for CUDA batches up to :data:`STATIC_BATCH_CUTOFF`, else dynamic."""
    if path not in PATHS:
        raise ValueError(f"unknown engine path {path!r}; expected one of {PATHS}")
    if path != "auto":
        return path
    return "static" if device.type == "cuda" and batch <= STATIC_BATCH_CUTOFF else "dynamic"


def run_blocks(
    x: Tensor,
    blocks: Sequence[BlockParts],
    policy: MergePolicy,
    num_prefix: int,
    final: Callable[[Tensor], Tensor] | None = None,
    backend: Backend = "sdpa",
    path: EnginePath = "auto",
    counts_reader: LaggedCounts | None = None,
    graphs: GraphCache | None = None,
    graph_key: Hashable = None,
) -> MergedTokens:
    """Run ``blocks`` on embedded tokens, merging as ``policy`` says.

    Args:
        x: ``[B, N, C]`` tokens after the host's embedding (prefix tokens first).
        blocks: the host blocks to run, in order.
        policy: where and how much to merge; validated by the caller.
        num_prefix: leading tokens that never merge.
        final: optional position-wise map after the last block (the host's final norm).
        backend: attention backend, ``"sdpa"`` or ``"eager"``.
        path: ``"dynamic"``, ``"static"`` or ``"auto"`` (see :func:`choose_path`).
        counts_reader: how late counts reach the host on the dynamic path (default: as soon as ready).
        graphs: where the static path keeps its CUDA graphs (None: never capture). ``graph_key``
            names what else fixes a graph besides the policy and the input (the model, the blocks).

    The blocks run without a host read; building the returned :class:`MergedTokens` (exact host
    sizes) reads the final counts once, unless nothing merged.
    """
    static = choose_path(path, x.shape[0], x.device) == "static"
    if static and graphs is not None and can_capture(policy, x):

        def loop(x: Tensor) -> tuple[CapacityState, Tensor]:
            return run_capacity_blocks(x, blocks, policy, num_prefix, backend, static=True)

        state, counts = graphs.run(policy_key(policy, (graph_key, backend)), loop, x)
    else:
        state, counts = run_capacity_blocks(x, blocks, policy, num_prefix, backend, static, counts_reader)
    return merged_tokens(state, counts, num_prefix, final)


def run_capacity_blocks(
    x: Tensor,
    blocks: Sequence[BlockParts],
    policy: MergePolicy,
    num_prefix: int,
    backend: Backend = "sdpa",
    static: bool = False,
    counts_reader: LaggedCounts | None = None,
) -> tuple[CapacityState, Tensor]:
    """The block loop on capacity buffers. Sync-free: on the static path it runs under
    ``FakeTensorMode`` (tests/test_engine.py); the dynamic path only reads counts whose copy finished.

    Returns:
        The final :class:`CapacityState` and ``[B, num_blocks + 1]`` token counts per image.
    """
    state = CapacityState.start(x, num_prefix)
    reader = None if static else (counts_reader or LaggedCounts())
    if reader is not None:
        reader.start()  # counts from an earlier forward bound nothing here
    counts = [state.lengths]
    for layer, parts in enumerate(blocks):
        state = _maybe_shrink(state, reader)
        branch, keys = _attention_branch(parts, state, backend)
        state = replace(state, x=state.x + branch)
        if policy.merges_at(layer) and state.max_len >= 2:
            keys = keys.mean(dim=1)  # [Tc, d], the similarity metric
            if state.dense:
                keys = keys.view(state.batch, state.max_len, -1)
            else:
                keys = scatter_to_grid(keys, state.slot, state.batch, state.max_len)
            valid = state.valid_mask()
            edges = bipartite_edges(keys, valid, num_prefix)
            decision = policy.select(layer, edges, state.lengths)
            if policy.on_layer is not None:
                policy.on_layer(decision)
            state = merge_step(state, edges.partner, decision.merge, valid)
            if reader is not None:
                reader.request(state.lengths)
                state = _maybe_shrink(state, reader)  # before the MLP, when the count is already there
        state = replace(state, x=state.x + parts.mlp(state.x))
        counts.append(state.lengths)
    return state, torch.stack(counts, dim=1)


def _maybe_shrink(state: CapacityState, reader: LaggedCounts | None) -> CapacityState:
    bounds = None if reader is None else reader.poll()
    return state if bounds is None else state.shrink(*bounds)


def merged_tokens(
    state: CapacityState, counts: Tensor, num_prefix: int, final: Callable[[Tensor], Tensor] | None = None
) -> MergedTokens:
    """The exact, host-sized :class:`MergedTokens` of a final state: one host read of the final
    counts (none while nothing has merged)."""
    if state.dense:
        total, max_len = state.capacity, state.max_len
    else:
        total, max_len = torch.stack([state.lengths.sum(), state.lengths.max()]).tolist()
    layout = TokenLayout.from_lengths(state.lengths, max_len, total)
    packed = state.x[:total]
    if final is not None:
        packed = final(packed)
    return MergedTokens(
        tokens=layout.pad(packed),
        sizes=layout.pad(state.sizes[:total]),
        mask=layout.valid_mask(),
        group=state.group,
        tokens_per_layer=counts,
        num_prefix=num_prefix,
        packed=packed,
        layout=layout,
    )


def _attention_branch(parts: BlockParts, state: CapacityState, backend: Backend) -> tuple[Tensor, Tensor]:
    """The attention residual branch on the buffer's rows.

    Returns:
        ``[Tc, C]`` branch output, and the keys ``[Tc, H, d]``.
    """
    q, k, v = parts.attn_in(state.x)
    if state.dense:
        # Nothing merged yet: every size is 1 and no image is padded, so plain attention on views is
        # exact and lets SDPA pick its fastest kernel (the memory layout the stock attention gets).
        batch, length = state.batch, state.max_len
        q_g, k_g, v_g = (t.view(batch, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = attention(q_g, k_g, v_g, parts.scale, None, backend).transpose(1, 2)
        out = out.reshape(state.capacity, -1)
    elif backend == "sdpa" and varlen_available(q.device, q.dtype):
        out = varlen_attention(q, k, v, state.sizes, state.cu_seqlens(), state.max_len, parts.scale).flatten(1)
    else:
        grid = (state.batch, state.max_len)
        out = grid_attention(q, k, v, state.sizes, state.slot, *grid, parts.scale, backend).flatten(1)
    return parts.attn_out(out), k
