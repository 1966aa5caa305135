"""DyMU in HF ``LlavaForConditionalGeneration``: DToMe in the vision tower, VTU in the language model.

:func:`apply_dymu` sets three instance attributes on the model (``forward``, generate()'s
``_expand_inputs_for_generation`` and the patch state), and :func:`remove_dymu` deletes them: nothing
inside the model changes, so removing restores the stock model exactly. While applied:

* a forward with ``pixel_values`` (the prefill of ``generate()``) runs the vision tower with DToMe up to
  LLaVA's feature layer, drops the CLS token as LLaVA's "default" strategy does, runs the projector on
  the merged tokens only, and prefills the language model with VTU. Each image keeps its own number
  of visual rows; the text keeps the positions it has with the full grid of placeholders;
* later forwards (decoding) run the stock model on the expanded cache, or :func:`vtu_decode` on the
  compact one.

``input_ids`` still hold one placeholder per patch, as LLaVA's processor writes them: they are the
virtual positions, which is why ``generate()``'s bookkeeping (attention mask, positions, cache length)
needs no change.

``LlavaNextForConditionalGeneration`` and ``LlavaOnevisionForConditionalGeneration`` (AnyRes crops)
take the same path: each crop is merged on its own and the virtual sequence is the model's native
layout (unpadding, ``image_newline`` rows, OneVision's downsampling), built by
:mod:`~dymu_lightning.backbones.hf_llava_next`.

This module attaches and removes the patch and checks what it is given. The vision side and the
language model's rows are :mod:`~dymu_lightning.backbones.hf_llava_inputs`; the patched ``forward``
and ``generate()``'s hook are :mod:`~dymu_lightning.backbones.hf_llava_generate`. Every public name of
those two is importable from here too.
"""

from __future__ import annotations

import math
import os
import types
from pathlib import Path

from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.backbones.hf_llava_generate import (
    EXPAND_ATTRIBUTE,
    EXPAND_PARAMETERS,
    EXPAND_TESTED_WITH,
    check_expand_hook,
    dymu_forward,
    expand_inputs_for_generation,
)
from dymu_lightning.backbones.hf_llava_inputs import (
    STATE_ATTRIBUTE,
    DymuInputs,
    LlavaPatch,
    dymu_inputs,
    next_token_logits,
)
from dymu_lightning.backbones.hf_llava_next import ANYRES_MODELS, is_anyres
from dymu_lightning.backbones.hf_llm import CACHE_KINDS, CacheKind
from dymu_lightning.backbones.hf_qwen_vl_generate import QWEN_MODELS, QwenPatch, qwen_methods
from dymu_lightning.backbones.registry import find_backbone, get_backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.core import MergePolicy

# The names this module has always offered; the code behind them lives in the two modules above.
__all__ = [
    "EXPAND_ATTRIBUTE",
    "EXPAND_PARAMETERS",
    "EXPAND_TESTED_WITH",
    "STATE_ATTRIBUTE",
    "DymuInputs",
    "LlavaPatch",
    "apply_dymu",
    "check_expand_hook",
    "dymu_inputs",
    "is_dymu",
    "last_prefill",
    "next_token_logits",
    "remove_dymu",
]


def apply_dymu(
    model: nn.Module,
    thresholds: str | os.PathLike[str] | ThresholdsFile | MergePolicy,
    *,
    cache: CacheKind = "expanded",
    backbone: str | Backbone | None = None,
    max_merges: int | None = None,
    min_tokens: int | None = None,
) -> nn.Module:
    """Make a LLaVA (or a Qwen2-VL, 2.5-VL, 3-VL) run with DyMU; returns the same model.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` or
            ``LlavaOnevisionForConditionalGeneration`` (AnyRes crops, see
            :mod:`~dymu_lightning.backbones.hf_llava_next`), or a ``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration`` (images and
            videos; see :mod:`~dymu_lightning.backbones.hf_qwen_vl_generate`).
        thresholds: a ``thresholds.json`` path, a loaded :class:`ThresholdsFile`, or a ready policy.
        cache: the KV cache of ``generate()``: ``"expanded"`` (the stock cache of the full sequence;
            decoding is the stock model's) or ``"compact"`` (keys per position as stock, values once
            per row: a smaller cache, whose decoding reads each row's value once).
        backbone: the vision tower's adapter (a registry name or instance); by default the one the
            thresholds file names, or else the first registered adapter that handles the tower.
        max_merges, min_tokens: per-image caps on top of the thresholds.

    Raises:
        TypeError: another model class.
        ValueError: thresholds calibrated for another tower or another depth, on whole images at
            another size or on another crop grid than an AnyRes model's, an unknown cache kind,
            or a feature layer LLaVA-DyMU cannot read (a list of layers).
        RuntimeError: a transformers whose private generate() hook differs from the one overridden
            (see :func:`check_expand_hook`).
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"unknown cache {cache!r}; expected one of {CACHE_KINDS}")
    qwen = isinstance(model, QWEN_MODELS)
    if not qwen and not isinstance(model, (LlavaForConditionalGeneration, *ANYRES_MODELS)):
        raise TypeError(_unsupported_model(model))
    tower = model.model.visual if qwen else model.model.vision_tower
    check_expand_hook(type(model))
    if isinstance(thresholds, (str, os.PathLike)):
        thresholds = ThresholdsFile.load(Path(thresholds))
    if isinstance(backbone, str):
        backbone = get_backbone(backbone)
    if isinstance(thresholds, ThresholdsFile):
        backbone = backbone if backbone is not None else get_backbone(thresholds.backbone)
    backbone = backbone if backbone is not None else find_backbone(tower)
    if not backbone.handles(tower):
        raise ValueError(
            f"backbone '{backbone.name}' does not adapt this {type(model).__name__ if qwen else 'LLaVA'}'s vision "
            f"tower ({type(tower).__name__})"
        )
    if qwen:
        return _apply_qwen(model, tower, thresholds, backbone, cache, max_merges, min_tokens)
    num_blocks = _feature_blocks(model.config.vision_feature_layer, backbone.num_layers(tower))
    if isinstance(thresholds, ThresholdsFile):
        # Tower, depth and image size (image_seq_length patches a side, as the processor feeds them:
        # a DINOv2 tower's config keeps its pretraining size); warns on a partial calibration.
        side = (
            tower.config.image_size  # AnyRes: every crop is fed at the tower's size
            if is_anyres(model)
            else math.isqrt(model.config.image_seq_length) * tower.config.patch_size
        )
        if is_anyres(model):  # crops, not whole images: calibrated on the same crops, or said why not
            video = isinstance(model, LlavaOnevisionForConditionalGeneration)
            thresholds.check_inputs(type(model).__name__, side, model.config.image_grid_pinpoints, video)
        thresholds.check_fits(backbone, tower, side, num_blocks)
        policy = thresholds.policy(max_merges=max_merges, min_tokens=min_tokens)
    else:
        policy = thresholds
        if max_merges is not None or min_tokens is not None:
            raise ValueError("pass caps inside the MergePolicy when giving a policy")
    policy.validate(backbone.num_layers(tower), backbone.name)
    strategy = model.config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    state = LlavaPatch(backbone, policy, num_blocks, strategy == "default", cache)
    object.__setattr__(model, STATE_ATTRIBUTE, state)
    object.__setattr__(model, "forward", types.MethodType(dymu_forward, model))
    object.__setattr__(model, EXPAND_ATTRIBUTE, types.MethodType(expand_inputs_for_generation, model))
    return model


def _unsupported_model(model: nn.Module) -> str:
    """Why :func:`apply_dymu` refuses this model."""
    supported = ", ".join(c.__name__ for c in (LlavaForConditionalGeneration, *ANYRES_MODELS, *QWEN_MODELS))
    return f"apply_dymu takes {supported}; not {type(model).__name__}."


def _apply_qwen(
    model: nn.Module,
    tower: nn.Module,
    thresholds: ThresholdsFile | MergePolicy,
    backbone: Backbone,
    cache: CacheKind,
    max_merges: int | None,
    min_tokens: int | None,
) -> nn.Module:
    """:func:`apply_dymu` for a Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the whole tower merges (no feature layer to
    read), at native resolution (no single image size to check the thresholds against)."""
    if isinstance(thresholds, ThresholdsFile):
        thresholds.check_matches(backbone, tower)
        thresholds.check_native(type(model).__name__)  # images at their own sizes: calibrated so, or said
        policy = thresholds.policy(max_merges=max_merges, min_tokens=min_tokens)
    else:
        policy = thresholds
        if max_merges is not None or min_tokens is not None:
            raise ValueError("pass caps inside the MergePolicy when giving a policy")
    policy.validate(backbone.num_layers(tower), backbone.name)
    state = QwenPatch(backbone, policy, cache)
    forward, expand = qwen_methods(state)
    object.__setattr__(model, STATE_ATTRIBUTE, state)
    object.__setattr__(model, "forward", types.MethodType(forward, model))
    object.__setattr__(model, EXPAND_ATTRIBUTE, types.MethodType(expand, model))
    return model


def remove_dymu(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_dymu`: the stock model again, exactly."""
    if not is_dymu(model):
        raise ValueError(f"DyMU is not applied to this {type(model).__name__}")
    object.__delattr__(model, "forward")
    object.__delattr__(model, EXPAND_ATTRIBUTE)
    object.__delattr__(model, STATE_ATTRIBUTE)
    return model


def is_dymu(model: nn.Module) -> bool:
    return STATE_ATTRIBUTE in vars(model)


def last_prefill(model: nn.Module) -> dict[str, Tensor]:
    """Token accounting of the latest prefill (or :func:`dymu_inputs` call) with DyMU.

    ``visual_rows`` (``[num_images]``): rows each image became; ``visual_positions``
    (``[num_images]``): the placeholders each image had; ``rows`` and ``positions`` (``[B]``): the
    language model's rows and valid positions per sample; for OneVision's videos, ``video_rows`` and
    ``video_positions`` (``[num_videos]``) too. AnyRes images count their cells as positions."""
    if not is_dymu(model):
        raise ValueError(f"DyMU is not applied to this {type(model).__name__}")
    return dict(getattr(model, STATE_ATTRIBUTE).last)


def _feature_blocks(feature_layer: int | list[int], num_layers: int) -> int:
    """Blocks run before ``hidden_states[feature_layer]`` (index 0 is the embedding output)."""
    if not isinstance(feature_layer, int):
        raise ValueError(f"DyMU reads one vision feature layer; this LLaVA concatenates {feature_layer}")
    blocks = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= blocks <= num_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} selects no block of a {num_layers}-layer tower")
    return blocks
