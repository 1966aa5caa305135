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

import functools
import sys
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from dymu_lightning.core.attention import Backend, attention
from dymu_lightning.core.capacity import CapacityState, LaggedCounts, merge_step
from dymu_lightning.core.cuda_graph import GraphCache, can_capture, policy_key
from dymu_lightning.core.layout import TokenLayout
from dymu_lightning.core.matching import Edges, bipartite_edges
from dymu_lightning.core.packed_attention import (
    grid_attention,
    scatter_to_grid,
    varlen_available,
    varlen_widened,
    widened_grid_attention,
)
from dymu_lightning.core.policy import MergePolicy
from dymu_lightning.core.widened import (
    AttentionLinears,
    WidenedAttention,
    fold_attention,
    folded_weights,
    widen_per_call,
)

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
        linears: the same attention as plain linear maps, when the host's are, so that widened
            heads fold into the projection weights (:mod:`dymu_lightning.core.widened`); None
            widens per call.
    """

    attn_in: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    attn_out: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    scale: float
    linears: AttentionLinears | None = None


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
        taps: features read from intermediate blocks, each ``[T, C']`` packed like ``packed``: one
            row per output token, the mean over its group's original tokens (Qwen3-VL's DeepStack;
            see :func:`dymu_lightning.core.rotary_units.run_unit_blocks`). Empty for other hosts.
    """

    tokens: Tensor
    sizes: Tensor
    mask: Tensor
    group: Tensor
    tokens_per_layer: Tensor
    num_prefix: int
    packed: Tensor
    layout: TokenLayout
    taps: tuple[Tensor, ...] = ()

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
    compile_merge: bool = False,
    widened: bool | None = None,
    compile_blocks: bool = False,
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
        compile_merge: run matching and the merge step through ``torch.compile`` (see
            :func:`compiled_merge_steps`); the first forward pays the compilation.
        widened: proportional attention as widened heads (folded into the projection weights)
            instead of a log-size bias on the grid; None: where ``varlen_attn`` runs (CUDA, half
            precision, ``"sdpa"``). Elsewhere True runs the widened grid reference.
        compile_blocks: run each block through ``torch.compile`` (see :func:`compiled_block_steps`):
            its attention half with matching, its merge and its MLP half, host layers included;
            implies ``compile_merge``. Falls back to eager, with a warning, where compiling fails.

    The blocks run without a host read; building the returned :class:`MergedTokens` (exact host
    sizes) reads the final counts once, unless nothing merged.
    """
    static = choose_path(path, x.shape[0], x.device) == "static"
    widened = use_widened(widened, backend, x)
    if static and graphs is not None and can_capture(policy, x):

        def loop(x: Tensor) -> tuple[CapacityState, Tensor]:
            return run_capacity_blocks(
                x,
                blocks,
                policy,
                num_prefix,
                backend,
                static=True,
                compile_merge=compile_merge,
                widened=widened,
                compile_blocks=compile_blocks,
            )

        if widened:  # a graph holds the folded weights' addresses: refresh them in place first
            for parts in blocks:
                if parts.linears is not None:
                    folded_weights(parts.linears)
        key = policy_key(policy, (graph_key, backend, compile_merge, widened, compile_blocks))
        state, counts = graphs.run(key, loop, x)
    else:
        state, counts = run_capacity_blocks(
            x, blocks, policy, num_prefix, backend, static, counts_reader, compile_merge, widened, compile_blocks
        )
    return merged_tokens(state, counts, num_prefix, final)


def run_capacity_blocks(
    x: Tensor,
    blocks: Sequence[BlockParts],
    policy: MergePolicy,
    num_prefix: int,
    backend: Backend = "sdpa",
    static: bool = False,
    counts_reader: LaggedCounts | None = None,
    compile_merge: bool = False,
    widened: bool | None = None,
    compile_blocks: bool = False,
) -> tuple[CapacityState, Tensor]:
    """The block loop on capacity buffers. Sync-free: on the static path it runs under
    ``FakeTensorMode`` (tests/test_engine.py); the dynamic path only reads counts whose copy finished.
    ``compile_merge``, ``widened``, ``compile_blocks``: see :func:`run_blocks`.

    Returns:
        The final :class:`CapacityState` and ``[B, num_blocks + 1]`` token counts per image.
    """
    widened = use_widened(widened, backend, x)
    state = CapacityState.start(x, num_prefix)
    reader = None if static else (counts_reader or LaggedCounts())
    if reader is not None:
        reader.start()  # counts from an earlier forward bound nothing here
    counts = [state.lengths]
    attend, match, merge, feed = _block_steps(compile_merge, compile_blocks)
    for layer, parts in enumerate(blocks):
        state = _maybe_shrink(state, reader)
        merges = policy.merges_at(layer) and state.max_len >= 2
        # Widened heads fold (or find cached) the projection weights here, outside any compiled
        # graph: the fold cache is host bookkeeping that Dynamo cannot trace.
        attn = widened_attention(parts) if widened and not state.dense else None
        state, edges, valid = attend(parts, state, backend, merges, attn, num_prefix, match)
        if merges:
            # The decision stays eager: thresholds and callbacks differ per layer (a compiled graph
            # would specialise on each), and it is one comparison in threshold mode.
            decision = policy.select(layer, edges, state.lengths)
            if policy.on_layer is not None:
                policy.on_layer(decision)
            state = merge(state, edges.partner, decision.merge, valid)
            if reader is not None:
                reader.request(state.lengths)
                state = _maybe_shrink(state, reader)  # before the MLP, when the count is already there
        state = feed(parts, state)
        counts.append(state.lengths)
    return state, torch.stack(counts, dim=1)


def attend_and_match(
    parts: BlockParts,
    state: CapacityState,
    backend: Backend,
    merges: bool,
    attn: WidenedAttention | None = None,
    num_prefix: int = 0,
    match: Callable[[CapacityState, Tensor, int], tuple[Edges, Tensor]] | None = None,
) -> tuple[CapacityState, Edges | None, Tensor | None]:
    """A block's first half: the attention residual branch, then (if ``merges``) matching on its keys.

    Args:
        attn: the block's attention in widened heads (:func:`widened_attention`), None for the bias
            form (or while the state is dense).
        match: the matching step (default :func:`match_edges`).

    Returns:
        The state after the residual add, and the :class:`Edges` and live-cell mask (None without
        ``merges``).
    """
    branch, keys = _attention_branch(parts, state, backend, merges, attn)
    state = replace(state, x=state.x + branch)
    if not merges:
        return state, None, None
    edges, valid = (match or match_edges)(state, keys, num_prefix)
    return state, edges, valid


def feed_forward(parts: BlockParts, state: CapacityState) -> CapacityState:
    """A block's second half: the MLP residual branch."""
    return replace(state, x=state.x + parts.mlp(state.x))


def _block_steps(compile_merge: bool, compile_blocks: bool) -> tuple[Callable, Callable, Callable, Callable]:
    """``(attend, match, merge, feed)`` for the block loop: eager, or partly or wholly compiled."""
    if compile_blocks:
        attend, merge, feed = compiled_block_steps()
        return attend, match_edges, merge, feed  # matching runs inside the compiled attend
    if compile_merge:
        return (attend_and_match, *compiled_merge_steps(), feed_forward)
    return attend_and_match, match_edges, merge_step, feed_forward


def use_widened(widened: bool | None, backend: Backend, x: Tensor) -> bool:
    """Resolve ``widened=None``: widened heads exactly where ``varlen_attn`` runs them."""
    return backend == "sdpa" and varlen_available(x.device, x.dtype) if widened is None else widened


def match_edges(state: CapacityState, keys: Tensor, num_prefix: int) -> tuple[Edges, Tensor]:
    """Matching on a state's live cells.

    Args:
        keys: ``[B, Lc, d]`` keys averaged over heads, in the padded grid.

    Returns:
        The :class:`Edges` (``[B, Na]``) and the live-cell mask ``[B, Lc]`` bool (the merge reuses it).
    """
    valid, blocked = state.masks()  # one comparison each, against index rows made once per forward
    return bipartite_edges(keys, valid, num_prefix, blocked=blocked), valid


@functools.cache
def compiled_merge_steps() -> tuple[Callable, Callable]:
    """:func:`match_edges` and :func:`merge_step` through ``torch.compile``, built once per process.

    These two hold most of the small ops a merging block adds to the host block (docs/benchmarks.md),
    each a kernel launch on an eager GPU; Inductor fuses them into a few kernels. Shapes are dynamic
    (batch, capacity and grid width change between layers and forwards), so one graph each serves
    every layer, and ``fullgraph`` holds them to no graph break (no host read inside).
    """
    return (
        torch.compile(match_edges, dynamic=True, fullgraph=True),
        torch.compile(merge_step, dynamic=True, fullgraph=True),
    )


@functools.cache
def compiled_block_steps() -> tuple[Callable, Callable, Callable]:
    """:func:`attend_and_match`, :func:`merge_step` and :func:`feed_forward` through ``torch.compile``,
    built once per process: the whole block, host layers included, in three graphs around the two
    places that stay eager (the policy's decision, and the dynamic path's shrink between the merge
    and the MLP). Inductor can then fuse the norms, residual adds and GELU with DyMU's own small ops
    (the widened column's write, the masks, the weighted scatter and its division).

    The graphs serve every block: Dynamo lifts each block's weights as inputs rather than baking
    them in, so only a new structure recompiles (the dense first block, widened heads or not, a
    layer that does not merge). Shapes are dynamic (batch, capacity and grid width change between
    layers and forwards). Each step falls back to eager, with one warning, where compiling fails
    (:class:`CompiledOrEager`).
    """
    return (
        CompiledOrEager(attend_and_match),
        CompiledOrEager(merge_step, fullgraph=True),
        CompiledOrEager(feed_forward),
    )


class CompiledOrEager:
    """``torch.compile(fn, dynamic=True)``, or ``fn`` itself where that cannot run.

    Compiling happens at the first call (and again for a new structure), so that is where it fails
    (no C++ compiler for Inductor's CPU kernels, no Triton for CUDA, an unsupported Python): then
    ``fn`` runs eagerly on the same arguments; if it succeeds the failure was the compiler's, and
    every later call runs eagerly after one warning. An error eager raises too is the caller's, and
    propagates. The steps have no side effects on their inputs, so running one again is safe.
    """

    def __init__(self, fn: Callable, fullgraph: bool = False) -> None:
        self.fn = fn
        self.compiled: Callable | None = None
        reason = compile_unavailable()
        if reason is None:
            self.compiled = torch.compile(fn, dynamic=True, fullgraph=fullgraph)
        else:
            self._fall_back(reason)

    def __call__(self, *args):
        if self.compiled is None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as error:  # eager decides below whose error it was
            result = self.fn(*args)
            self._fall_back(f"{type(error).__name__}: {error}".splitlines()[0])
            return result

    def _fall_back(self, reason: str) -> None:
        self.compiled = None
        warnings.warn(
            f"torch.compile is unavailable for {self.fn.__name__}, running it eagerly: {reason}", stacklevel=3
        )


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot run in this process (None: it can, as far as can be told
    without compiling)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        from torch import _dynamo
    except ImportError as error:
        return f"torch._dynamo does not import: {error}"
    if not _dynamo.is_dynamo_supported():
        return f"Dynamo does not support Python {sys.version_info.major}.{sys.version_info.minor} on this platform"
    return None


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
        group=state.group_positions(),
        tokens_per_layer=counts,
        num_prefix=num_prefix,
        packed=packed,
        layout=layout,
    )


def _attention_branch(
    parts: BlockParts, state: CapacityState, backend: Backend, with_keys: bool, attn: WidenedAttention | None = None
) -> tuple[Tensor, Tensor | None]:
    """The attention residual branch on the buffer's rows; ``attn``: the block's attention in
    widened heads (None: the bias form on the grid).

    Returns:
        ``[Tc, C]`` branch output, and (if ``with_keys``) the similarity metric for matching: the
        keys averaged over heads in the padded grid, ``[B, Lc, d]``, zero in empty cells.
    """
    batch, length = state.batch, state.max_len
    if state.dense:
        # Nothing merged yet: every size is 1 and no image is padded, so plain attention on views is
        # exact and lets SDPA pick its fastest kernel (the memory layout the stock attention gets).
        q, k, v = parts.attn_in(state.x)
        q_g, k_g, v_g = (t.view(batch, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = attention(q_g, k_g, v_g, parts.scale, None, backend).transpose(1, 2)
        return parts.attn_out(out.reshape(state.capacity, -1)), (k_g.mean(dim=1) if with_keys else None)
    if attn is not None:
        h, d = attn.qkv(state.x, state.sizes)  # [Tc, 3, H, dw]
        if backend == "sdpa" and varlen_available(h.device, h.dtype):
            out = varlen_widened(h, d, state.cu_seqlens(), length, parts.scale)
            keys = scatter_to_grid(h[:, 1, :, :d].mean(dim=1), state.slot, batch, length) if with_keys else None
        else:
            out, k_g = widened_grid_attention(h, d, state.slot, batch, length, parts.scale, backend)
            keys = k_g[..., :d].mean(dim=1) if with_keys else None
        return attn.out(out), keys
    # The bias form on the reference grid, which already holds the keys: matching reads them there.
    q, k, v = parts.attn_in(state.x)
    out, k_g = grid_attention(q, k, v, state.sizes, state.slot, batch, length, parts.scale, backend, with_keys=True)
    return parts.attn_out(out.flatten(1)), (k_g.mean(dim=1) if with_keys else None)


def widened_attention(parts: BlockParts) -> WidenedAttention:
    """``parts`` in widened heads: folded into the weights where the adapter describes its linears."""
    if parts.linears is not None:
        return fold_attention(parts.linears, parts.scale)
    return widen_per_call(parts.attn_in, parts.attn_out, parts.scale)
