"""VTU in HF Llama-family language models (Llama, Qwen2, Mistral in transformers 5.x).

Their decoder layers share one shape: ``input_layernorm -> self_attn (q/k/v/o_proj, RoPE) ->
residual -> post_attention_layernorm -> mlp -> residual``, with ``model.rotary_emb`` giving the RoPE
tables and ``model.norm`` at the end. VTU runs everything but the attention product on the unique
rows; the host's own modules do the work, so nothing of the host is copied.
"""

from __future__ import annotations

from torch import Tensor, nn

from dymu_lightning.core.vtu import VirtualLayout, vtu_attention


def vtu_decoder_layer(layer: nn.Module, rows: Tensor, layout: VirtualLayout, cos: Tensor, sin: Tensor) -> Tensor:
    """One decoder layer on ``[B, N_un, C]`` rows; attention spans the virtual positions."""
    attn = layer.self_attn
    batch, num_rows, _ = rows.shape
    x = layer.input_layernorm(rows)
    q, k, v = (proj(x).view(batch, num_rows, -1, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    rows = rows + attn.o_proj(vtu_attention(q, k, v, layout, cos, sin, attn.scaling))
    return rows + layer.mlp(layer.post_attention_layernorm(rows))


def vtu_forward(model: nn.Module, rows: Tensor, layout: VirtualLayout) -> Tensor:
    """The base model (``LlamaModel``, ``Qwen2Model``, ``MistralModel``) on embedded rows.

    Args:
        model: the host base model (not the ``...ForCausalLM`` wrapper: pass ``.model``).
        rows: ``[B, N_un, C]`` input embeddings of the unique rows.
        layout: rows -> virtual positions, with the RoPE positions the full sequence would have.

    Returns:
        ``[B, N_un, C]`` final hidden states of the rows (after ``model.norm``).
    """
    cos, sin = model.rotary_emb(rows, layout.positions)
    for layer in model.layers:
        rows = vtu_decoder_layer(layer, rows, layout, cos, sin)
    return model.norm(rows)
