"""VTU in HF Llama-family language models (Llama, Qwen2, Mistral in transformers 5.x), and in the
language model of Qwen2-VL (``Qwen2VLTextModel``), whose M-RoPE takes ``[3, B, N]`` (t, h, w)
positions: a layout holding such positions gives every member of a merged visual row its own.

Their decoder layers share one shape: ``input_layernorm -> self_attn (q/k/v/o_proj, RoPE) ->
residual -> post_attention_layernorm -> mlp -> residual``, with ``model.rotary_emb`` giving the RoPE
tables and ``model.norm`` at the end. VTU runs everything but the attention product on the unique
rows, packed across the batch; the host's own modules do the work, so nothing of the host is copied.

Generation has two caches:

* ``"expanded"``: a stock ``DynamicCache`` holding keys and values at every virtual position, exactly
  what the stock model would have cached for the full sequence. Decoding is then the stock model's
  own forward.
* ``"compact"``: :class:`HFCompactCache`, a ``transformers.Cache`` whose layers hold the keys at every
  position (rotated, as stock) but the values once per row, plus the layout. Decoding runs
  :func:`vtu_decode`, which sums the attention weights of each row's positions and reads its value
  once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from dymu_lightning.core.vtu import VirtualLayout, apply_rope, causal_mask, decode_attention, vtu_attention

CacheKind = Literal["expanded", "compact"]
CACHE_KINDS: tuple[str, ...] = ("expanded", "compact")


class CompactLayer(DynamicLayer):
    """One decoder layer of :class:`HFCompactCache`.

    ``keys``: ``[B, Hkv, N, d]`` after RoPE, one per virtual position, as in ``DynamicLayer``.
    ``values``: ``[B, Hkv, N_un, d]``, one per row (a merged token's value is the same at each of its
    positions). ``DynamicLayer``'s growth (concatenation on dim -2), sequence length (the keys'
    positions), beam reordering and batch selection apply unchanged; cropping does not (the last
    values are rows, not positions), so it is refused.
    """

    is_croppable = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the compact VTU cache cannot be cropped (values are stored per row)")


class HFCompactCache(Cache):
    """A ``transformers.Cache`` of :class:`CompactLayer` (one per decoder layer) and the layout shared by every layer
    (rows -> virtual positions), which follows the batch when generate() reorders or copies it."""

    def __init__(self, layout: VirtualLayout) -> None:
        super().__init__(layer_class_to_replicate=CompactLayer)
        self.layout = layout

    @property
    def seq_length(self) -> int:
        """Virtual positions covered so far (prompt and generated tokens)."""
        return self.layout.expand.shape[1]

    def nbytes(self) -> int:
        """Bytes held: keys, values and the layout maps."""
        lay = self.layout
        tensors = [t for layer in self.layers for t in (layer.keys, layer.values)]
        return sum(t.numel() * t.element_size() for t in [*tensors, lay.expand, lay.positions, lay.valid])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        self.layout = self.layout.select(beam_idx.to(self.layout.expand.device))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self.layout = self.layout.select(indices.to(self.layout.expand.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        index = torch.arange(self.layout.expand.shape[0], device=self.layout.expand.device)
        self.layout = self.layout.select(index.repeat_interleave(repeats))


def _project(layer: nn.Module, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[B, n, C]`` -> q ``[B, n, Hq, d]``, k and v ``[B, n, Hkv, d]``, before RoPE (after the per-head
    q/k norms of Qwen3-family attention, where the host has them)."""
    attn = layer.self_attn
    x = layer.input_layernorm(rows)
    q, k, v = (proj(x).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return q if q_norm is None else q_norm(q), k if k_norm is None else k_norm(k), v


def _finish(layer: nn.Module, rows: Tensor, attended: Tensor) -> Tensor:
    """The rest of the decoder layer after the attention product, on rows."""
    rows = rows + layer.self_attn.o_proj(attended)
    return rows + layer.mlp(layer.post_attention_layernorm(rows))


def stock_unless_dymu(model: nn.Module, visual: bool, cache: Any, **arguments: Any) -> Any:
    """The stock forward's output of a patched VLM when DyMU has nothing to do: no pixels to merge and
    no compact cache to decode from (text only, or decoding with the expanded cache); None when DyMU
    runs, after refusing what it cannot do. ``arguments`` are the forward's keywords."""
    if not visual and not isinstance(cache, HFCompactCache):
        return type(model).forward(model, cache=cache, **arguments)
    if arguments.get("labels") is not None:
        raise NotImplementedError("DyMU computes no training loss; remove_dymu() before training")
    if arguments.get("input_ids") is None:
        raise ValueError("DyMU needs input_ids (with the image placeholders), not inputs_embeds")
    return None


def positions_kept(length: int, logits_to_keep: int | Tensor, device: torch.device) -> Tensor:
    """The positions whose logits are returned, as HF's ``logits_to_keep`` selects them."""
    if isinstance(logits_to_keep, Tensor):
        return logits_to_keep.to(device)
    start = length - logits_to_keep if logits_to_keep else 0
    return torch.arange(start, length, device=device)


def _check_window(model: nn.Module, length: int) -> None:
    window = getattr(model.config, "sliding_window", None)
    if getattr(model.config, "use_sliding_window", True) and window is not None and length > window:
        raise NotImplementedError(
            f"VTU implements full causal attention; this {type(model).__name__} uses a sliding window of "
            f"{window} positions, shorter than the {length}-position sequence"
        )


def vtu_prefill(
    model: nn.Module,
    rows: Tensor,
    layout: VirtualLayout,
    cache: CacheKind | None = None,
    residuals: Sequence[Tensor] = (),
) -> tuple[Tensor, DynamicCache | HFCompactCache | None]:
    """The base model (``LlamaModel``, ``Qwen2Model``, ``MistralModel``) on embedded rows.

    The rows that some valid position uses are packed into one sequence for the position-wise
    layers (:meth:`VirtualLayout.pack`), so a batch costs the sum of its samples' rows.

    Args:
        model: the host base model (not the ``...ForCausalLM`` wrapper: pass ``.model``).
        rows: ``[B, N_un, C]`` input embeddings of the unique rows.
        layout: rows -> virtual positions, with the RoPE positions the full sequence would have.
        cache: None, ``"expanded"`` or ``"compact"`` (see the module docstring).
        residuals: ``[B, N_un, C]`` each, added to the rows' hidden states after the first decoder
            layers, one per layer (Qwen3-VL's DeepStack: zeros in text rows).

    Returns:
        ``[B, N_un, C]`` final hidden states of the rows (after ``model.norm``; zeros in rows no valid
        position uses), and the cache.
    """
    if cache is not None and cache not in CACHE_KINDS:
        raise ValueError(f"unknown cache {cache!r}; expected one of {CACHE_KINDS}")
    _check_window(model, layout.expand.shape[1])
    store: DynamicCache | HFCompactCache | None = None
    if cache == "expanded":
        store = DynamicCache(config=model.config)
    elif cache == "compact":
        store = HFCompactCache(layout)
    packed = layout.pack()
    hidden = packed.pack(rows)  # [T, C]
    cos, sin = model.rotary_emb(hidden, layout.positions)
    for index, layer in enumerate(model.layers):
        q, k, v = _project(layer, hidden)
        attended, k_positions, v_positions = vtu_attention(q, k, v, packed, cos, sin, layer.self_attn.scaling)
        if isinstance(store, HFCompactCache):
            store.update(k_positions, packed.unpack(v).transpose(1, 2), index)  # values per row
        elif store is not None:
            store.update(k_positions, v_positions, index)
        del k_positions, v_positions  # the cache holds copies; free these before the MLP runs
        hidden = _finish(layer, hidden, attended)
        if index < len(residuals):
            hidden = hidden + packed.pack(residuals[index].to(hidden.dtype))
    return packed.unpack(model.norm(hidden)), store


def vtu_forward(model: nn.Module, rows: Tensor, layout: VirtualLayout) -> Tensor:
    """:func:`vtu_prefill` without a cache: ``[B, N_un, C]`` rows -> ``[B, N_un, C]`` hidden states."""
    return vtu_prefill(model, rows, layout)[0]


def vtu_decode(
    model: nn.Module, embeds: Tensor, cache: HFCompactCache, positions: Tensor, valid: Tensor | None = None
) -> Tensor:
    """New tokens after a prefill with the compact cache (which is updated in place).

    Args:
        model: the host base model.
        embeds: ``[B, t, C]`` input embeddings of the new tokens.
        cache: from :func:`vtu_prefill` with ``cache="compact"``.
        positions: ``[B, t]`` RoPE positions of the new tokens (``[3, B, t]`` for M-RoPE, as the layout's).
        valid: ``[B, N + t]`` attention mask over every position so far (None: all valid).

    Returns:
        ``[B, t, C]`` final hidden states of the new tokens.
    """
    layout = cache.layout.extend(positions, valid)
    _check_window(model, layout.expand.shape[1])
    cos, sin = model.rotary_emb(embeds, positions)  # [B, t, d]: only the new tokens are rotated
    mask = causal_mask(layout.valid, positions.shape[-1])  # [B, 1, t, N], the same for every layer
    rows = embeds
    for index, layer in enumerate(model.layers):
        q, k, v = _project(layer, rows)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, Hkv, t, d], at the new positions
        keys, values = cache.update(k, v.transpose(1, 2), index)
        attended = decode_attention(q, keys, values, layout, cos, sin, layer.self_attn.scaling, mask)
        rows = _finish(layer, rows, attended)
    cache.layout = layout
    return model.norm(rows)
