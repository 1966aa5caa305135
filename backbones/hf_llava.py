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
from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.backbones.hf_llava_next import (
    ANYRES_MODELS,
    Cells,
    anyres_cells,
    crop_pixels,
    crops_per_image,
    image_lengths,
    is_anyres,
    video_cells,
)
from dymu_lightning.backbones.hf_llm import (
    CACHE_KINDS,
    CacheKind,
    HFCompactCache,
    positions_kept,
    vtu_decode,
    vtu_prefill,
)
from dymu_lightning.backbones.hf_qwen_vl_generate import QWEN_MODELS, QwenPatch, qwen_methods
from dymu_lightning.backbones.registry import find_backbone, get_backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.core import MergedTokens, MergePolicy
from dymu_lightning.core.vtu import VirtualLayout, layout_from_keys

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
        memo: AnyRes cell supports by (crops, image size), computed once each.
    """

    backbone: Backbone
    policy: MergePolicy
    num_blocks: int
    drop_prefix: bool
    cache: CacheKind
    last: dict[str, Tensor] = field(default_factory=dict)
    memo: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DymuInputs:
    """The language model's input after DToMe.

    Attributes:
        rows: ``[B, N_un, C]`` embeddings of the unique rows, in sequence order (text tokens and
            merged visual tokens), padded with zeros to the longest sample.
        layout: rows -> the ``N`` virtual positions of ``input_ids``.
        merged: the vision tower's output (all crops of the batch, in order; a LLaVA image is one crop).
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
    """Make a LLaVA (or a Qwen2-VL) run with DyMU; returns the same model.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` or
            ``LlavaOnevisionForConditionalGeneration`` (AnyRes crops, see
            :mod:`~dymu_lightning.backbones.hf_llava_next`), or a ``Qwen2VLForConditionalGeneration`` /
            ``Qwen2_5_VLForConditionalGeneration`` (images only; see
            :mod:`~dymu_lightning.backbones.hf_qwen_vl_generate`).
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
            thresholds.check_inputs(type(model).__name__, side, model.config.image_grid_pinpoints)
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
    """:func:`apply_dymu` for a Qwen2-VL / Qwen2.5-VL: the whole tower merges (no feature layer to
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


def dymu_inputs(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor | None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    image_sizes: Tensor | None = None,
    batch_num_images: Tensor | None = None,
    pixel_values_videos: Tensor | None = None,
) -> DymuInputs:
    """Run the vision side with DToMe and lay out the language model's rows.

    Args:
        model: a LLaVA model with DyMU applied.
        input_ids: ``[B, N]`` with one ``image_token_id`` placeholder per virtual position of each image
            (LLaVA: per patch; LLaVA-NeXT / OneVision: per cell of the stock layout), and one
            ``video_token_id`` placeholder per cell of each video (OneVision).
        pixel_values: ``[num_images, 3, H, W]``, the images in placeholder order (AnyRes:
            ``[num_images, max_crops, 3, H, W]`` or ``[total_crops, 3, H, W]``), or None.
        attention_mask: ``[B, N]`` (0 for padding), or None.
        position_ids: ``[B, N]`` RoPE positions, or None for ``0..N-1``.
        image_sizes: ``[num_images, 2]`` (AnyRes only), each image's (height, width).
        batch_num_images: ``[B]`` (OneVision only), images per sample.
        pixel_values_videos: ``[num_videos, frames, 3, H, W]`` (OneVision only), or None.
    """
    state: LlavaPatch = getattr(model, STATE_ATTRIBUTE)
    anyres = is_anyres(model)
    crops: list[int] = []
    pixels = []
    if pixel_values is not None:
        if anyres:
            if image_sizes is None:
                raise ValueError(f"{type(model).__name__} needs image_sizes with pixel_values")
            crops = crops_per_image(model, image_sizes, batch_num_images)
            pixel_values = crop_pixels(pixel_values, crops)
        else:
            crops = [1] * pixel_values.shape[0]
        pixels.append(pixel_values)
    if pixel_values_videos is not None:
        pixels.append(pixel_values_videos.flatten(0, 1))  # every frame is merged on its own
    tower = model.model.vision_tower
    merged = state.backbone.merged_forward(
        tower, torch.cat(pixels).to(tower.dtype), state.policy, num_blocks=state.num_blocks
    )
    prefix = merged.num_prefix if state.drop_prefix else 0
    keep = merged.layout.pos_index >= prefix
    visual = model.model.multi_modal_projector(merged.packed[keep])  # [T', C], projected once per token
    tokens_per_crop = merged.lengths - prefix  # [crops]
    # [crops, P]: each patch's merged token, as a row of `visual` (tokens are packed crop after crop)
    token_of_patch = (tokens_per_crop.cumsum(0) - tokens_per_crop)[:, None] + merged.group - prefix
    image_tokens, video_tokens = token_of_patch[: sum(crops)], token_of_patch[sum(crops) :]

    parts: dict[str, tuple[int, Cells]] = {}  # "image" / "video" -> (placeholder id, cells)
    if pixel_values is not None and anyres:
        parts["image"] = (
            model.config.image_token_id,
            anyres_cells(model, visual, image_tokens, crops, image_sizes, state.memo),
        )
    elif pixel_values is not None:  # LLaVA: the placeholders are the patches, image after image
        lengths = torch.full((len(crops),), image_tokens.shape[1], device=visual.device)
        parts["image"] = (model.config.image_token_id, Cells(image_tokens.flatten(), visual[:0], lengths))
    if pixel_values_videos is not None:
        frames = pixel_values_videos.shape[1]
        parts["video"] = (model.config.video_token_id, video_cells(model, visual, video_tokens, frames, state.memo))

    # Keys: a merged token's key is its row of `visual`; cells with a row of their own follow them;
    # a text position's key is its own, after all visual ones.
    batch, length = input_ids.shape
    keys = torch.empty_like(input_ids)
    text = torch.ones_like(input_ids, dtype=torch.bool)
    own_tables, next_key, visual_keys = [], visual.shape[0], {}
    for kind, (token_id, cells) in parts.items():
        placeholder = input_ids == token_id
        found = int(placeholder.sum())
        if found != cells.token.numel():
            images = cells.lengths.numel()
            need = (
                f"need {image_tokens.shape[1]} each ({cells.token.numel()})"
                if not anyres
                else f"take {cells.token.numel()} in this model's layout"
            )
            raise ValueError(f"input_ids hold {found} {kind} placeholders; {images} {kind}s {need}")
        own_key = next_key + (cells.token < 0).long().cumsum(0) - 1
        visual_keys[kind] = torch.where(cells.token >= 0, cells.token, own_key)  # [L], placeholder order
        keys[placeholder] = visual_keys[kind]
        text &= ~placeholder
        own_tables.append(cells.own)
        next_key += cells.own.shape[0]
    keys[text] = next_key + torch.arange(batch * length, device=input_ids.device).view(batch, length)[text]
    valid = torch.ones_like(text) if attention_mask is None else attention_mask.bool()
    positions = position_ids if position_ids is not None else torch.arange(length, device=input_ids.device)
    layout, row_key = layout_from_keys(keys, positions.expand(batch, -1), valid)

    embeds = model.get_input_embeddings()(input_ids)  # the placeholders' embeddings go unused
    table = torch.cat([t.to(embeds.dtype) for t in (visual, *own_tables)] + [embeds.flatten(0, 1)])
    rows = torch.where(row_key[..., None] >= 0, table[row_key.clamp(min=0)], 0)  # [B, N_un, C]

    counts = layout.counts()
    state.last.clear()
    state.last.update(rows=(counts > 0).sum(1), positions=counts.sum(1).long())
    for kind, (_, cells) in parts.items():
        # rows per image (video): the distinct keys among its cells
        owner = torch.repeat_interleave(torch.arange(cells.lengths.numel(), device=visual.device), cells.lengths)
        pairs = torch.unique(torch.stack([owner, visual_keys[kind]]), dim=1)
        state.last["visual_rows" if kind == "image" else "video_rows"] = torch.bincount(
            pairs[0], minlength=cells.lengths.numel()
        )
        state.last["visual_positions" if kind == "image" else "video_positions"] = cells.lengths
    visual_rows = state.last.get("visual_rows", state.last.get("video_rows"))
    return DymuInputs(rows, layout, merged, visual_rows)


def next_token_logits(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor | None,
    attention_mask: Tensor | None = None,
    vtu: bool = True,
    **visual: Tensor | None,
) -> Tensor:
    """``[B, V]`` logits of the token after the prompt, with DyMU applied.

    ``vtu=False`` is the ablation without virtual unmerging: the rows are fed to the stock language
    model as a shorter sequence, each row at one position of its own (a merged visual token takes the
    place of its whole group). This is what a VLM sees when merged tokens are passed on as they are.
    ``visual``: LLaVA-NeXT / OneVision's ``image_sizes``, ``batch_num_images`` and ``pixel_values_videos``.
    """
    if vtu:
        return model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, logits_to_keep=1, **visual
        ).logits[:, -1]
    inputs = dymu_inputs(model, input_ids, pixel_values, attention_mask, **visual)
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
    # per-image (per-video) tensors, copied below sample by sample; batch_num_images is per sample
    # (the stock hook copies it)
    per_image = {
        key: model_kwargs.pop(key) for key in ("pixel_values", "image_sizes") if model_kwargs.get(key) is not None
    }
    videos = model_kwargs.pop("pixel_values_videos", None)
    batch_num_images = model_kwargs.get("batch_num_images")
    input_ids, model_kwargs = type(self)._expand_inputs_for_generation(
        self, expand_size=expand_size, input_ids=input_ids, **model_kwargs
    )
    if expand_size > 1 and input_ids is not None:
        first = input_ids[::expand_size]  # [B], one copy of each sample
        if "pixel_values" in per_image:
            placeholders = (first == self.config.image_token_id).sum(1)
            images = _images_per_sample(self, placeholders, per_image, batch_num_images)
            per_image = {key: _copy_per_sample(value, images, expand_size) for key, value in per_image.items()}
        if videos is not None:  # every video of a batch has the same frames, so the same placeholders
            placeholders = (first == self.config.video_token_id).sum(1)
            each = int(placeholders.sum()) // max(videos.shape[0], 1)
            videos = _copy_per_sample(videos, (placeholders // max(each, 1)).tolist(), expand_size)
    model_kwargs.update(per_image)
    if videos is not None:
        model_kwargs["pixel_values_videos"] = videos
    return input_ids, model_kwargs


def _copy_per_sample(items: Tensor, per_sample: list[int], expand_size: int) -> Tensor:
    """``[n, ...]`` items, ``per_sample[b]`` of them for sample b in order -> each sample's items copied
    ``expand_size`` times as a group: ``[A, B]`` of one sample becomes ``[A, B, A, B]``."""
    starts = accumulate(per_sample, initial=0)  # each sample's first item
    order = [s + i for s, n in zip(starts, per_sample, strict=False) for _ in range(expand_size) for i in range(n)]
    return items[torch.tensor(order, dtype=torch.long, device=items.device)]


def _images_per_sample(
    model: nn.Module, placeholders: Tensor, per_image: dict[str, Tensor], batch_num_images: Tensor | None
) -> list[int]:
    """Images of each sample, from its placeholders (``[B]``) and each image's placeholder count."""
    if batch_num_images is not None:
        return batch_num_images.tolist()
    pixel_values = per_image["pixel_values"]
    if is_anyres(model):
        sizes = per_image["image_sizes"]
        lengths = image_lengths(model, crops_per_image(model, sizes), sizes, getattr(model, STATE_ATTRIBUTE).memo)
    else:
        lengths = [int(placeholders.sum()) // max(pixel_values.shape[0], 1)] * pixel_values.shape[0]
    ends = torch.tensor(list(accumulate(lengths)))  # placeholders up to the end of each image
    last = torch.searchsorted(ends, placeholders.cumsum(0).cpu(), right=True)  # images ending in each sample
    return torch.diff(last, prepend=torch.zeros(1, dtype=last.dtype)).tolist()


def _refuse_unsupported(model: nn.Module, videos: Tensor | None, kwargs: dict[str, object]) -> None:
    """Inputs DyMU does not handle raise, rather than run the stock model or be dropped silently."""
    if videos is not None and not isinstance(model, LlavaOnevisionForConditionalGeneration):
        raise ValueError(f"{type(model).__name__} takes no video (pixel_values_videos)")
    for name in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
        if kwargs.get(name) is not None:
            raise ValueError(f"DyMU reads {name} from the model's config when applied; do not pass it to forward")
    if kwargs.get("mm_encoder_outputs"):
        raise ValueError("DyMU encodes pixel_values itself; precomputed mm_encoder_outputs are not supported")


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
    image_sizes: Tensor | None = None,
    batch_num_images: Tensor | None = None,
    pixel_values_videos: Tensor | None = None,
    **kwargs: object,
) -> LlavaCausalLMOutputWithPast:
    state: LlavaPatch = getattr(self, STATE_ATTRIBUTE)
    language = self.model.language_model
    _refuse_unsupported(self, pixel_values_videos, kwargs)
    if image_sizes is not None:  # the stock forwards of LLaVA-NeXT / OneVision take them
        kwargs["image_sizes"] = image_sizes
    if batch_num_images is not None:
        kwargs["batch_num_images"] = batch_num_images
    visual = pixel_values is not None or pixel_values_videos is not None
    if not visual and not isinstance(cache, HFCompactCache):
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

    if not visual:  # decoding with the compact cache
        positions = position_ids
        if positions is None:
            positions = cache.seq_length + torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        total = cache.seq_length + input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape[1] != total:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions; the cache and the new tokens {total}"
            )
        hidden = vtu_decode(language, self.get_input_embeddings()(input_ids), cache, positions, attention_mask)
        kept = positions_kept(hidden.shape[1], logits_to_keep, hidden.device)
        return LlavaCausalLMOutputWithPast(logits=self.lm_head(hidden[:, kept]), cache=cache)

    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("DyMU prefills from an empty cache; continuing a cached prompt with images is not supported")
    inputs = dymu_inputs(
        self, input_ids, pixel_values, attention_mask, position_ids, image_sizes, batch_num_images, pixel_values_videos
    )
    use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
    hidden, store = vtu_prefill(language, inputs.rows, inputs.layout, state.cache if use_cache else None)
    kept = positions_kept(input_ids.shape[1], logits_to_keep, hidden.device)
    rows = inputs.layout.expand[:, kept]  # [B, K]: the row behind each kept position
    hidden = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    return LlavaCausalLMOutputWithPast(logits=self.lm_head(hidden), cache=store)
