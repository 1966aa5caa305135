"""VTU in HF Llama-family language models (Llama, Qwen2, Mistral in transformers 5.x).

Their decoder layers share one shape: ``input_layernorm -> self_attn (q/k/v/o_proj, RoPE) ->
residual -> post_attention_layernorm -> mlp -> residual``, with ``model.rotary_emb`` giving the RoPE
tables and ``model.norm`` at the end. VTU runs everything but the attention product on the unique
rows; the host's own modules do the work, so nothing of the host is copied.

Generation has two caches:

* ``"expanded"``: a stock ``DynamicCache`` holding keys and values at every virtual position, exactly
  what the stock model would have cached for the full sequence. Decoding is then the stock model's
  own forward.
* ``"compact"``: :class:`HFCompactCache`, one entry per row plus the layout. Decoding runs
  :func:`vtu_decode`, which rotates the stored keys per position as it reads them.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn
from transformers import DynamicCache

from dymu_lightning.core.vtu import CompactKVCache, VirtualLayout, decode_attention, vtu_attention

CacheKind = Literal["expanded", "compact"]
CACHE_KINDS: tuple[str, ...] = ("expanded", "compact")


class HFCompactCache(CompactKVCache):
    """:class:`CompactKVCache` with the few methods ``generate()`` asks of a cache."""

    is_compileable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.keys)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.select(beam_idx)


def _project(layer: nn.Module, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[B, n, C]`` -> q ``[B, n, Hq, d]``, k and v ``[B, n, Hkv, d]``, before RoPE."""
    attn = layer.self_attn
    x = layer.input_layernorm(rows)
    return tuple(proj(x).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def _finish(layer: nn.Module, rows: Tensor, attended: Tensor) -> Tensor:
    """The rest of the decoder layer after the attention product, on rows."""
    rows = rows + layer.self_attn.o_proj(attended)
    return rows + layer.mlp(layer.post_attention_layernorm(rows))


def _check_window(model: nn.Module, length: int) -> None:
    window = getattr(model.config, "sliding_window", None)
    if getattr(model.config, "use_sliding_window", True) and window is not None and length > window:
        raise NotImplementedError(
            f"VTU implements full causal attention; this {type(model).__name__} uses a sliding window of "
            f"{window} positions, shorter than the {length}-position sequence"
        )


def vtu_prefill(
    model: nn.Module, rows: Tensor, layout: VirtualLayout, cache: CacheKind | None = None
) -> tuple[Tensor, DynamicCache | HFCompactCache | None]:
    """The base model (``LlamaModel``, ``Qwen2Model``, ``MistralModel``) on embedded rows.

    Args:
        model: the host base model (not the ``...ForCausalLM`` wrapper: pass ``.model``).
        rows: ``[B, N_un, C]`` input embeddings of the unique rows.
        layout: rows -> virtual positions, with the RoPE positions the full sequence would have.
        cache: None, ``"expanded"`` or ``"compact"`` (see the module docstring).

    Returns:
        ``[B, N_un, C]`` final hidden states of the rows (after ``model.norm``), and the cache.
    """
    if cache is not None and cache not in CACHE_KINDS:
        raise ValueError(f"unknown cache {cache!r}; expected one of {CACHE_KINDS}")
    _check_window(model, layout.expand.shape[1])
    store: DynamicCache | HFCompactCache | None = None
    if cache == "expanded":
        store = DynamicCache(config=model.config)
    elif cache == "compact":
        store = HFCompactCache(layout)
    cos, sin = model.rotary_emb(rows, layout.positions)
    for index, layer in enumerate(model.layers):
        q, k, v = _project(layer, rows)
        attended, k_positions, v_positions = vtu_attention(q, k, v, layout, cos, sin, layer.self_attn.scaling)
        if isinstance(store, HFCompactCache):
            store.store(index, k, v)
        elif store is not None:
            store.update(k_positions, v_positions, index)
        rows = _finish(layer, rows, attended)
    return model.norm(rows), store


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
        positions: ``[B, t]`` RoPE positions of the new tokens.
        valid: ``[B, N + t]`` attention mask over every position so far (None: all valid).

    Returns:
        ``[B, t, C]`` final hidden states of the new tokens.
    """
    layout = cache.layout.extend(positions, valid)
    _check_window(model, layout.expand.shape[1])
    cos, sin = model.rotary_emb(embeds, layout.positions)
    rows = embeds
    for index, layer in enumerate(model.layers):
        q, k, v = _project(layer, rows)
        keys, values = cache.store(index, k, v)
        rows = _finish(layer, rows, decode_attention(q, keys, values, layout, cos, sin, layer.self_attn.scaling))
    cache.layout = layout
    return model.norm(rows)
