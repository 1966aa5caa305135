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
"""

from __future__ import annotations

import inspect
import math
import os
import types
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.backbones.hf_llm import CACHE_KINDS, CacheKind, HFCompactCache, vtu_decode, vtu_prefill
from dymu_lightning.backbones.registry import find_backbone, get_backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.core import MergedTokens, MergePolicy
from dymu_lightning.core.vtu import VirtualLayout

STATE_ATTRIBUTE = "_dymu_llava"
# generate()'s hook that copies each sample for beams and returned sequences (see its override below).
# It is private: the override is written against this version's parameters, checked by apply_dymu and
# pinned by tests/test_llava.py.
EXPAND_ATTRIBUTE = "_expand_inputs_for_generation"
EXPAND_TESTED_WITH = "5.24"
EXPAND_PARAMETERS = ("self", "expand_size", "is_encoder_decoder", "input_ids", "model_kwargs")


@dataclass(frozen=True)
class LlavaPatch:
    """What :func:`apply_dymu` attaches to a LLaVA model.

    Attributes:
        backbone: the adapter of the vision tower.
        policy: DToMe's merging policy for the tower.
        num_blocks: tower blocks run before LLaVA reads its features (from ``vision_feature_layer``).
        drop_prefix: True for LLaVA's "default" strategy, which drops the CLS token.
        cache: ``"expanded"`` or ``"compact"``, the KV cache ``generate()`` decodes with.
        last: what the latest prefill produced (see :func:`last_prefill`).
    """

    backbone: Backbone
    policy: MergePolicy
    num_blocks: int
    drop_prefix: bool
    cache: CacheKind
    last: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class DymuInputs:
    """The language model's input after DToMe.

    Attributes:
        rows: ``[B, N_un, C]`` embeddings of the unique rows, in sequence order (text tokens and
            merged visual tokens), padded with zeros to the longest sample.
        layout: rows -> the ``N`` virtual positions of ``input_ids``.
        merged: the vision tower's output (all images of the batch, in order).
        visual_rows: ``[num_images]`` long, visual rows per image.
    """

    rows: Tensor
    layout: VirtualLayout
    merged: MergedTokens
    visual_rows: Tensor


def apply_dymu(
    model: nn.Module,
    thresholds: str | os.PathLike[str] | ThresholdsFile | MergePolicy,
    *,
    cache: CacheKind = "expanded",
    backbone: str | Backbone | None = None,
    max_merges: int | None = None,
    min_tokens: int | None = None,
) -> nn.Module:
    """Make a ``LlavaForConditionalGeneration`` run with DyMU; returns the same model.

    Args:
        model: the LLaVA model.
        thresholds: a ``thresholds.json`` path, a loaded :class:`ThresholdsFile`, or a ready policy.
        cache: the KV cache of ``generate()``: ``"expanded"`` (the stock cache of the full sequence;
            decoding is the stock model's) or ``"compact"`` (keys per position as stock, values once
            per row: a smaller cache, whose decoding reads each row's value once).
        backbone: the vision tower's adapter (a registry name or instance); by default the one the
            thresholds file names, or else the first registered adapter that handles the tower.
        max_merges, min_tokens: per-image caps on top of the thresholds.

    Raises:
        ValueError: thresholds calibrated for another tower or another depth, an unknown cache kind,
            or a feature layer LLaVA-DyMU cannot read (a list of layers).
        RuntimeError: a transformers whose private generate() hook differs from the one overridden
            (see :func:`check_expand_hook`).
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"unknown cache {cache!r}; expected one of {CACHE_KINDS}")
    tower = _llava_tower(model)
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
            f"backbone '{backbone.name}' does not adapt this LLaVA's vision tower ({type(tower).__name__})"
        )
    num_blocks = _feature_blocks(model.config.vision_feature_layer, backbone.num_layers(tower))
    if isinstance(thresholds, ThresholdsFile):
        # Tower, depth and image size (image_seq_length patches a side, as the processor feeds them:
        # a DINOv2 tower's config keeps its pretraining size); warns on a partial calibration.
        side = math.isqrt(model.config.image_seq_length) * tower.config.patch_size
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
    object.__setattr__(model, "forward", types.MethodType(_dymu_forward, model))
    object.__setattr__(model, EXPAND_ATTRIBUTE, types.MethodType(_expand_inputs_for_generation, model))
    return model


def _llava_tower(model: nn.Module) -> nn.Module:
    """The vision tower of a LLaVA; a TypeError naming the model otherwise (a Qwen2-VL has its tower
    at ``model.visual``, and the end-to-end path for it is not written yet)."""
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    if tower is not None:
        return tower
    hint = ""
    if getattr(getattr(model, "model", None), "visual", None) is not None:
        hint = (
            " DyMU end to end in a Qwen2-VL / Qwen2.5-VL (generation with the merged tower's tokens in its M-RoPE"
            " language model) is not implemented yet; its vision tower merges with the backbones 'hf_qwen2_vl'"
            " and 'hf_qwen2_5_vl', and hf_qwen_vl_lm.qwen_vl_prefill / qwen_vl_decode run the model step by"
            " step (docs/vtu.md)."
        )
    raise TypeError(f"apply_dymu takes a LlavaForConditionalGeneration, not a {type(model).__name__}.{hint}")


def check_expand_hook(model_class: type) -> None:
    """Refuse a transformers whose private ``_expand_inputs_for_generation`` is not the one our
    override wraps (its parameters changed): beam search would otherwise mix up a prompt's images."""
    stock = getattr(model_class, EXPAND_ATTRIBUTE, None)
    found = tuple(inspect.signature(stock).parameters) if stock is not None else ()
    if found != EXPAND_PARAMETERS:
        raise RuntimeError(
            f"transformers {transformers.__version__}: {model_class.__name__}.{EXPAND_ATTRIBUTE} takes {found}, "
            f"not {EXPAND_PARAMETERS} as in transformers {EXPAND_TESTED_WITH}, which DyMU's override of it "
            "(backbones/hf_llava.py) was written against; update the override for this version"
        )


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
    language model's rows and valid positions per sample."""
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


def dymu_inputs(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> DymuInputs:
    """Run the vision side with DToMe and lay out the language model's rows.

    Args:
        model: a LLaVA model with DyMU applied.
        input_ids: ``[B, N]`` with one ``image_token_id`` placeholder per patch of each image.
        pixel_values: ``[num_images, 3, H, W]``, the images in placeholder order.
        attention_mask: ``[B, N]`` (0 for padding), or None.
        position_ids: ``[B, N]`` RoPE positions, or None for ``0..N-1``.
    """
    state: LlavaPatch = getattr(model, STATE_ATTRIBUTE)
    tower = model.model.vision_tower
    merged = state.backbone.merged_forward(
        tower, pixel_values.to(tower.dtype), state.policy, num_blocks=state.num_blocks
    )
    prefix = merged.num_prefix if state.drop_prefix else 0
    keep = merged.layout.pos_index >= prefix
    visual = model.model.multi_modal_projector(merged.packed[keep])  # [T', C], projected once per row
    visual_rows = merged.lengths - prefix  # [num_images]
    groups = merged.group - prefix  # [num_images, P]: the row of each patch (placeholder) within its image

    placeholder = input_ids == model.config.image_token_id
    num_images, per_image = groups.shape
    found = int(placeholder.sum())
    if found != num_images * per_image:
        raise ValueError(
            f"input_ids hold {found} image placeholders; {num_images} images need {per_image} each "
            f"({num_images * per_image})"
        )
    embeds = model.get_input_embeddings()(input_ids)  # the placeholders' embeddings go unused
    batch, length = input_ids.shape

    # Rows in sequence order: a text token adds one row, an image its visual rows at its first patch.
    ordinal = placeholder.flatten().cumsum(0).view(batch, length) - 1
    image = (ordinal // per_image).clamp(min=0)
    patch = ordinal % per_image
    first = placeholder & (patch == 0)
    image_rows = visual_rows[image]
    added = torch.where(placeholder, torch.where(first, image_rows, 0), 1)
    start = added.cumsum(1) - added  # rows before each position
    in_image = groups[image, patch] - torch.where(first, 0, image_rows)
    expand = torch.where(placeholder, start + in_image, start)  # [B, N]
    num_rows = int(added.sum(1).max())

    rows = embeds.new_zeros(batch * num_rows, embeds.shape[-1])
    sample = torch.arange(batch, device=input_ids.device)[:, None].expand(-1, length)
    flat = sample * num_rows + expand
    rows[flat[~placeholder]] = embeds[~placeholder]
    # [num_images], in placeholder order = pixel order: the row where each image's first placeholder
    # opens its rows, not that placeholder's own row (without a prefix token, an image's first patch
    # is an A token and may merge into a later one)
    image_base = (sample * num_rows + start)[first]
    # each kept token: its image, and its place among that image's visual rows
    token_image, token_offset = merged.layout.batch_index[keep], merged.layout.pos_index[keep] - prefix
    rows[image_base[token_image] + token_offset] = visual.to(rows.dtype)

    valid = torch.ones_like(placeholder) if attention_mask is None else attention_mask.bool()
    positions = position_ids if position_ids is not None else torch.arange(length, device=input_ids.device)
    layout = VirtualLayout(expand, positions.expand(batch, -1), valid, num_rows)
    counts = layout.counts()
    state.last.update(
        visual_rows=visual_rows,
        visual_positions=torch.full_like(visual_rows, per_image),
        rows=(counts > 0).sum(1),
        positions=counts.sum(1).long(),
    )
    return DymuInputs(rows.view(batch, num_rows, -1), layout, merged, visual_rows)


def next_token_logits(
    model: nn.Module, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None, vtu: bool = True
) -> Tensor:
    """``[B, V]`` logits of the token after the prompt, with DyMU applied.

    ``vtu=False`` is the ablation without virtual unmerging: the rows are fed to the stock language
    model as a shorter sequence, each row at one position of its own (a merged visual token takes the
    place of its whole group). This is what a VLM sees when merged tokens are passed on as they are.
    """
    if vtu:
        return model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, logits_to_keep=1
        ).logits[:, -1]
    inputs = dymu_inputs(model, input_ids, pixel_values, attention_mask)
    used = inputs.layout.counts() > 0  # [B, N_un]: rows behind a valid position (padding rows are not)
    positions = (used.long().cumsum(1) - 1).clamp(min=0)
    hidden = model.model.language_model(
        inputs_embeds=inputs.rows, attention_mask=used.long(), position_ids=positions
    ).last_hidden_state
    last = inputs.layout.expand[:, -1]  # the row of the prompt's last position
    return model.lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


def _expand_inputs_for_generation(
    self: nn.Module, expand_size: int = 1, input_ids: Tensor | None = None, **model_kwargs: object
) -> tuple[Tensor | None, dict[str, object]]:
    """``generate()`` copies each sample ``expand_size`` times (beams, ``num_return_sequences``).

    The stock LLaVA encodes the images first and copies each sample's group of image features. Our
    forward takes ``pixel_values`` instead, which generate() would copy image by image: ``[A, B]``
    for one sample would become ``[A, A, B, B]``, and its first copy would see image A twice. This
    copies each sample's group of images whole (``[A, B, A, B]``), in the order of the copied
    samples; everything else is copied as generate() does.
    """
    pixel_values = model_kwargs.pop("pixel_values", None)
    input_ids, model_kwargs = type(self)._expand_inputs_for_generation(
        self, expand_size=expand_size, input_ids=input_ids, **model_kwargs
    )
    if pixel_values is not None and expand_size > 1 and input_ids is not None:
        placeholders = (input_ids[::expand_size] == self.config.image_token_id).sum(1)  # [B], one copy each
        per_image = int(placeholders.sum()) // max(pixel_values.shape[0], 1)
        images = (placeholders // max(per_image, 1)).tolist()  # images per sample
        starts = accumulate(images, initial=0)  # each sample's first image
        order = [s + i for s, n in zip(starts, images, strict=False) for _ in range(expand_size) for i in range(n)]
        pixel_values = pixel_values[torch.tensor(order, dtype=torch.long, device=pixel_values.device)]
    if pixel_values is not None:
        model_kwargs["pixel_values"] = pixel_values
    return input_ids, model_kwargs


def _positions_kept(length: int, logits_to_keep: int | Tensor, device: torch.device) -> Tensor:
    """The positions whose logits are returned, as HF's ``logits_to_keep`` selects them."""
    if isinstance(logits_to_keep, Tensor):
        return logits_to_keep.to(device)
    start = length - logits_to_keep if logits_to_keep else 0
    return torch.arange(start, length, device=device)


def _dymu_forward(
    self: nn.Module,
    input_ids: Tensor | None = None,
    pixel_values: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    cache: object | None = None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    logits_to_keep: int | Tensor = 0,
    use_cache: bool | None = None,
    **kwargs: object,
) -> LlavaCausalLMOutputWithPast:
    state: LlavaPatch = getattr(self, STATE_ATTRIBUTE)
    language = self.model.language_model
    if pixel_values is None and not isinstance(cache, HFCompactCache):
        # Text only, or decoding with the expanded cache: exactly the stock model.
        return type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            logits_to_keep=logits_to_keep,
            use_cache=use_cache,
            **kwargs,
        )
    if labels is not None:
        raise NotImplementedError("DyMU computes no training loss; remove_dymu() before training")
    if input_ids is None:
        raise ValueError("DyMU needs input_ids (with the image placeholders), not inputs_embeds")

    if pixel_values is None:  # decoding with the compact cache
        positions = position_ids
        if positions is None:
            positions = cache.seq_length + torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        total = cache.seq_length + input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape[1] != total:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions; the cache and the new tokens {total}"
            )
        hidden = vtu_decode(language, self.get_input_embeddings()(input_ids), cache, positions, attention_mask)
        kept = _positions_kept(hidden.shape[1], logits_to_keep, hidden.device)
        return LlavaCausalLMOutputWithPast(logits=self.lm_head(hidden[:, kept]), cache=cache)

    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("DyMU prefills from an empty cache; continuing a cached prompt with images is not supported")
    inputs = dymu_inputs(self, input_ids, pixel_values, attention_mask, position_ids)
    use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
    hidden, store = vtu_prefill(language, inputs.rows, inputs.layout, state.cache if use_cache else None)
    kept = _positions_kept(input_ids.shape[1], logits_to_keep, hidden.device)
    rows = inputs.layout.expand[:, kept]  # [B, K]: the row behind each kept position
    hidden = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    return LlavaCausalLMOutputWithPast(logits=self.lm_head(hidden), cache=store)
