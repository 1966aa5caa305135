"""timm ``VisionTransformer``: with or without CLS, registers, LayerScale, q/k-norm.

The host keeps its own modules; DToMe calls them on packed tokens: ``norm1``, ``attn.qkv``,
``attn.q_norm``/``k_norm``, ``attn.norm``, ``attn.proj``, ``ls1``/``ls2``, ``drop_path1/2``, ``mlp``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import timm
import torch
from PIL import Image
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from dymu_lightning.backbones.base import Backbone, TinyConfig, local_dir
from dymu_lightning.core import BlockParts
from dymu_lightning.core.widened import AttentionLinears, plain_linears

_TINY = {"embed_dim": 48, "depth": 3, "num_heads": 3, "img_size": 64, "patch_size": 8}


class TimmViT(Backbone):
    """Any timm ``VisionTransformer`` built from standard ``Block`` and ``Attention`` modules.

    ``build`` takes ``{"model_name": ..., **create_model_kwargs}``; ``load`` takes a timm model
    name (pretrained weights via timm's hub support), ``hf-hub:org/name``, or a local directory
    written by ``timm.models.save_for_hf``.
    """

    def load(self, source: str | os.PathLike[str]) -> nn.Module:
        directory = local_dir(source)
        name = f"local-dir:{directory}" if directory is not None else str(source)
        return _require_vit(timm.create_model(name, pretrained=True).eval())

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        kwargs = dict(config)
        model_name = kwargs.pop("model_name", "vit_base_patch16_224")
        return _require_vit(timm.create_model(model_name, pretrained=False, **kwargs).eval())

    def tiny_configs(self) -> Sequence[TinyConfig]:
        base = {"model_name": "vit_base_patch16_224", **_TINY}
        return [
            TinyConfig("cls", base),
            TinyConfig("no_cls", {**base, "class_token": False, "global_pool": "avg"}),
            TinyConfig("registers_layerscale", {**base, "reg_tokens": 2, "init_values": 0.1}),
            TinyConfig("qk_norm", {**base, "qk_norm": True}),
        ]

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def preprocess(self, model: nn.Module, images: Sequence[Image.Image]) -> Tensor:
        transform = self.image_transform(model)
        return torch.stack([transform(image) for image in images])

    def image_transform(self, model: nn.Module) -> Callable[[Image.Image], Tensor]:
        # The model's own geometry wins over its pretrained config: a model built at another
        # img_size keeps the pretrained config of its name.
        size = getattr(model.patch_embed, "img_size", None)
        overrides = {"input_size": (3, *size)} if size else {}
        config = timm.data.resolve_data_config(overrides, model=model)
        return _RGB(timm.data.create_transform(**config))

    def embed(self, model: nn.Module, pixels: Tensor) -> Tensor:
        x = model._pos_embed(model.patch_embed(pixels))
        return model.norm_pre(model.patch_drop(x))

    def blocks(self, model: nn.Module) -> list[BlockParts]:
        return [_block_parts(block, index) for index, block in enumerate(model.blocks)]

    def final_norm(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        return model.norm

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def stock_features(self, model: nn.Module, pixels: Tensor) -> Tensor:
        return model.forward_features(pixels)


class _RGB:
    """Convert to RGB, then apply ``transform`` (grey and RGBA photos are common in the wild)."""

    def __init__(self, transform: Callable[[Image.Image], Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> Tensor:
        return self.transform(image.convert("RGB"))


def _require_vit(model: nn.Module) -> nn.Module:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"backbone 'timm_vit' adapts timm VisionTransformer models, got {type(model).__name__}")
    return model


def _block_parts(block: nn.Module, index: int) -> BlockParts:
    # Variants that reorder the residual (ResPostBlock, ParallelBlock) or change attention
    # (RoPE, gating) need their own split; refuse them rather than run them wrong.
    if type(block) is not Block or type(block.attn) is not Attention or block.attn.gate is not None:
        raise TypeError(
            f"backbone 'timm_vit' supports timm Block with the standard Attention; block {index} is "
            f"{type(block).__name__} with {type(block.attn).__name__}"
        )
    attn = block.attn

    def attn_in(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = attn.qkv(block.norm1(x)).view(x.shape[0], 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.unbind(dim=1)
        return attn.q_norm(q), attn.k_norm(k), v

    def after_proj(y: Tensor) -> Tensor:
        return block.drop_path1(block.ls1(attn.proj_drop(y)))

    def attn_out(o: Tensor) -> Tensor:
        return after_proj(attn.proj(attn.norm(o)))

    def mlp(x: Tensor) -> Tensor:
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    linears = None
    # A norm between the heads and the projection (scale_norm) sees all of o: no folding there.
    if plain_linears(attn.qkv, attn.proj) and isinstance(attn.norm, nn.Identity):
        linears = AttentionLinears(
            norm=block.norm1,
            qkv=(attn.qkv,),
            out=attn.proj,
            after_out=after_proj,
            head_dim=attn.head_dim,
            q_norm=None if isinstance(attn.q_norm, nn.Identity) else attn.q_norm,
            k_norm=None if isinstance(attn.k_norm, nn.Identity) else attn.k_norm,
        )
    return BlockParts(attn_in=attn_in, attn_out=attn_out, mlp=mlp, scale=attn.scale, linears=linears)
