"""HF transformers vision towers: CLIPVisionModel, SiglipVisionModel and Dinov2Model.

All three are pre-norm ViTs with separate q/k/v projections; they differ in module names, in
where the final norm sits and in whether a CLS token leads the sequence.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from dymu_lightning.assets.paths import dinov2_small_dir
from dymu_lightning.backbones.base import Backbone, TinyConfig, local_dir
from dymu_lightning.core import BlockParts
from dymu_lightning.core.widened import AttentionLinears, plain_linears

_TINY = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 3,
    "image_size": 64,
    "patch_size": 8,
}


class HFVisionBackbone(Backbone):
    """Shared loading, building and preprocessing for HF vision towers."""

    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]

    def __init__(self, default_source: str | os.PathLike[str] | None = None) -> None:
        self.default_source = default_source

    def load(self, source: str | os.PathLike[str] | None = None) -> nn.Module:
        source = source if source is not None else self.default_source
        if source is None:
            raise ValueError(f"backbone '{self.name}' needs a hub id or a local directory to load from")
        source = local_dir(source) or source  # a directory given as ~/... is still a directory
        try:
            model = self.model_class.from_pretrained(str(source), attn_implementation="sdpa")
        except OSError as error:
            raise OSError(
                f"backbone '{self.name}' could not load {str(source)!r}: no local directory of that name, "
                "and the hub is unreachable or has no such model. Point the source at a local "
                "save_pretrained directory instead."
            ) from error
        return model.eval()

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        model_config = self.config_class(**config)
        model_config._attn_implementation = "sdpa"
        return self.model_class(model_config).eval()

    def tiny_configs(self) -> Sequence[TinyConfig]:
        return [TinyConfig("tiny", dict(_TINY))]

    def preprocess(self, model: nn.Module, images: Sequence[Image.Image]) -> Tensor:
        return _ProcessorTransform(self._processor(model)).batch(images)

    def image_transform(self, model: nn.Module) -> Callable[[Image.Image], Tensor]:
        return _ProcessorTransform(self._processor(model))

    def _processor(self, model: nn.Module) -> Callable[..., Any]:
        # A saved model directory carries its own preprocessing config; a model built from a config
        # gets the family's standard one at the config's image size.
        source = getattr(model, "name_or_path", "") or ""
        directory = local_dir(source) if source else None
        if directory is not None and (Path(directory) / "preprocessor_config.json").is_file():
            return AutoImageProcessor.from_pretrained(str(directory))
        return self.default_processor(model.config.image_size)

    def default_processor(self, image_size: int) -> Callable[..., Any]:
        raise NotImplementedError

    def stock_features(self, model: nn.Module, pixels: Tensor) -> Tensor:
        return model(pixel_values=pixels).last_hidden_state

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    def blocks(self, model: nn.Module) -> list[BlockParts]:
        return [self.block_parts(layer) for layer in self.layers(model)]

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def block_parts(self, layer: nn.Module) -> BlockParts:
        raise NotImplementedError


class _ProcessorTransform:
    """An HF image processor as a per-image transform (picklable: the processor is plain data)."""

    def __init__(self, processor: Callable[..., Any]) -> None:
        self.processor = processor

    def batch(self, images: Sequence[Image.Image]) -> Tensor:
        return self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]

    def __call__(self, image: Image.Image) -> Tensor:
        return self.batch([image])[0]


def _split_heads(projection: nn.Linear, head_dim: int) -> Callable[[Tensor], Tensor]:
    """``[T, C] -> [T, H, d]`` through one projection."""
    return lambda h: projection(h).view(h.shape[0], -1, head_dim)


def _clip_like_parts(layer: nn.Module) -> BlockParts:
    """CLIP and SigLIP encoder layers share names: layer_norm1, self_attn, layer_norm2, mlp."""
    attn = layer.self_attn
    q, k, v = (_split_heads(p, attn.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    def attn_in(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = layer.layer_norm1(x)
        return q(h), k(h), v(h)

    return BlockParts(
        attn_in=attn_in,
        attn_out=attn.out_proj,
        mlp=lambda x: layer.mlp(layer.layer_norm2(x)),
        scale=attn.scale,
        linears=_linears(layer.layer_norm1, attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, None, attn.head_dim),
    )


def _linears(
    norm: Callable[[Tensor], Tensor],
    q: nn.Module,
    k: nn.Module,
    v: nn.Module,
    out: nn.Module,
    after_out: Callable[[Tensor], Tensor] | None,
    head_dim: int,
) -> AttentionLinears | None:
    """The attention as plain linears (widened heads fold into them), or None for wrapped ones (LoRA)."""
    if not plain_linears(q, k, v, out):
        return None
    return AttentionLinears(norm=norm, qkv=(q, k, v), out=out, after_out=after_out, head_dim=head_dim)


class HFCLIPVision(HFVisionBackbone):
    """``CLIPVisionModel``: CLS first, ``pre_layrnorm`` before the blocks; the last hidden state has
    no final norm (CLIP's ``post_layernorm`` only touches the pooled CLS)."""

    model_class = CLIPVisionModel
    config_class = CLIPVisionConfig

    def default_processor(self, image_size: int) -> Callable[..., Any]:
        return CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )

    def embed(self, model: nn.Module, pixels: Tensor) -> Tensor:
        return model.pre_layrnorm(model.embeddings(pixels))

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.encoder.layers

    def block_parts(self, layer: nn.Module) -> BlockParts:
        return _clip_like_parts(layer)

    def final_norm(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        return None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1


class HFSiglipVision(HFVisionBackbone):
    """``SiglipVisionModel``: no CLS; ``post_layernorm`` on every token."""

    model_class = SiglipVisionModel
    config_class = SiglipVisionConfig

    def default_processor(self, image_size: int) -> Callable[..., Any]:
        return SiglipImageProcessor(size={"height": image_size, "width": image_size})

    def embed(self, model: nn.Module, pixels: Tensor) -> Tensor:
        return model.embeddings(pixels)

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.encoder.layers

    def block_parts(self, layer: nn.Module) -> BlockParts:
        return _clip_like_parts(layer)

    def final_norm(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        return model.post_layernorm

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0


class HFDinov2(HFVisionBackbone):
    """``Dinov2Model``: CLS first, LayerScale on both branches, ``layernorm`` on every token."""

    model_class = Dinov2Model
    config_class = Dinov2Config

    def default_processor(self, image_size: int) -> Callable[..., Any]:
        return dinov2_image_processor(image_size)

    def tiny_configs(self) -> Sequence[TinyConfig]:
        return [TinyConfig("tiny", {**_TINY, "layerscale_value": 0.5})]

    def embed(self, model: nn.Module, pixels: Tensor) -> Tensor:
        return model.embeddings(pixels)

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.encoder.layer

    def block_parts(self, layer: nn.Module) -> BlockParts:
        attn = layer.attention
        q, k, v = (_split_heads(p, attn.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

        def attn_in(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            h = layer.norm1(x)
            return q(h), k(h), v(h)

        after_out = lambda y: layer.drop_path(layer.layer_scale1(y))  # noqa: E731
        return BlockParts(
            attn_in=attn_in,
            attn_out=lambda o: after_out(attn.o_proj(o)),
            mlp=lambda x: layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))),
            scale=attn.scaling,
            linears=_linears(layer.norm1, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, after_out, attn.head_dim),
        )

    def final_norm(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        return model.layernorm

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1


def dinov2_image_processor(crop: int, shortest_edge: int | None = None) -> BitImageProcessor:
    """DINOv2's preprocessing: shorter side to ``shortest_edge`` (bicubic), centre crop of ``crop``,
    ImageNet statistics. The default edge is DINOv2's evaluation ratio, 256/224 of the crop."""
    return BitImageProcessor(
        size={"shortest_edge": round(crop * 256 / 224) if shortest_edge is None else shortest_edge},
        crop_size={"height": crop, "width": crop},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


class OfflineDinov2Small(HFDinov2):
    """The real DINOv2 ViT-S/14, materialised from a PyPI package by ``python -m dymu_lightning assets``."""

    def __init__(self) -> None:
        super().__init__(default_source=dinov2_small_dir())

    def load(self, source: str | os.PathLike[str] | None = None) -> nn.Module:
        if source is None and not (Path(self.default_source) / "config.json").is_file():
            raise FileNotFoundError(
                f"backbone '{self.name}': no weights at {self.default_source}. Materialise them once "
                "with `python -m dymu_lightning assets` (or `make assets`)."
            )
        return super().load(source)
