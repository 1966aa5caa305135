"""The vision side of DyMU in a HF LLaVA and the language model's rows: what a DyMU prefill feeds VTU.

:func:`dymu_inputs` runs the vision tower with DToMe (each image, AnyRes crop or video frame merged on
its own), projects the merged tokens once each, and lays out the language model's input: the unique
rows (text tokens and merged visual tokens) and the map from rows to the virtual positions of
``input_ids`` (:class:`~dymu_lightning.core.vtu.VirtualLayout`), in the model's native layout
(:mod:`~dymu_lightning.backbones.hf_llava_next` for LLaVA-NeXT / OneVision). :func:`next_token_logits`
is the one-step use of it, with or without VTU. :class:`LlavaPatch` is the state
:func:`~dymu_lightning.backbones.hf_llava.apply_dymu` attaches to the model, which both read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.backbones.hf_llava_next import (
    Cells,
    anyres_cells,
    crop_pixels,
    crops_per_image,
    is_anyres,
    video_cells,
)
from dymu_lightning.backbones.hf_llm import CacheKind
from dymu_lightning.core import MergedTokens, MergePolicy
from dymu_lightning.core.vtu import VirtualLayout, layout_from_keys

STATE_ATTRIBUTE = "_dymu_llava"


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
