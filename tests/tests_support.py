"""Small builders shared by tests that need one concrete model rather than the whole registry."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralModel, Qwen2Config, Qwen2Model

from dymu_lightning.backbones import get_backbone
from dymu_lightning.core.vtu import VirtualLayout

# A 3-block timm ViT: 64 patches of 8 px + CLS at 64 px.
TINY_TIMM_ARCH = {
    "model_name": "vit_base_patch16_224",
    "embed_dim": 48,
    "depth": 3,
    "num_heads": 3,
    "img_size": 64,
    "patch_size": 8,
}


def tiny_timm(batch: int, seed: int = 0):
    """A 3-block timm ViT (64 patches + CLS) and ``batch`` images, half smooth, half noisy."""
    backbone = get_backbone("timm_vit")
    torch.manual_seed(seed)
    model = backbone.build(TINY_TIMM_ARCH)
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(batch, 3, 2, 2, generator=generator), size=64, mode="bilinear")
    noisy = torch.randn(batch, 3, 64, 64, generator=generator)
    pixels = torch.where(torch.arange(batch)[:, None, None, None] % 2 == 0, smooth, noisy)
    return backbone, model, pixels


# A tiny Llama-family language model, for VTU tests.
TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, as in SmolLM2
    "max_position_embeddings": 128,
}
FAMILIES = {
    "llama": (LlamaConfig, LlamaModel),
    "qwen2": (Qwen2Config, Qwen2Model),
    "mistral": (MistralConfig, MistralModel),
}


def naive_reference(model: torch.nn.Module, rows: torch.Tensor, layout: VirtualLayout) -> torch.Tensor:
    """Per layer: copy rows to positions, run the host's own attention module with RoPE at the
    original positions and a causal mask, average its outputs per row; norms and MLP on the rows."""
    length = layout.expand.shape[1]
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & layout.valid[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding queries see themselves
    additive = torch.zeros(allowed.shape, dtype=rows.dtype).masked_fill(~allowed, float("-inf"))[:, None]
    for layer in model.layers:
        expanded = layout.to_positions(rows)
        embeddings = model.rotary_emb(expanded, layout.positions)
        out, _ = layer.self_attn(
            layer.input_layernorm(expanded), position_embeddings=embeddings, attention_mask=additive
        )
        means = []
        for b in range(rows.shape[0]):
            sample = torch.zeros_like(rows[b])
            for r in range(layout.num_rows):
                members = (layout.expand[b] == r) & layout.valid[b]
                if members.any():
                    sample[r] = out[b, members].mean(dim=0)
            means.append(sample)
        rows = rows + torch.stack(means)
        rows = rows + layer.mlp(layer.post_attention_layernorm(rows))
    return model.norm(rows)
