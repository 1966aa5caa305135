"""DyMU in a whole Qwen2-VL / Qwen2.5-VL / Qwen3-VL, prefill only: the merged tower's tokens placed in the M-RoPE
language model with VTU.

The prompt is the stock one (one image or video placeholder per cell, as Qwen's processor writes it).
The tower merges cells (:mod:`dymu_lightning.backbones.hf_qwen_vl`), a video slice by slice; each image
or video slice then contributes one *row* per merged token instead of one per cell, and every
placeholder position reads the row of its cell's group. Positions are the host's own M-RoPE positions
of the full prompt (``get_rope_index``), so every cell keeps its (t, h, w) position (a video's cells
their slice's t) and the text keeps its own. Images and videos may share a prompt and a batch.

Decoding (:func:`qwen_vl_decode`) continues from a prefill's cache, one or more new text tokens at a
time: the compact cache through VTU's decoding, the expanded one through the stock language model.
New text continues after the prompt's largest M-RoPE position, on all three axes, as the host's rope
deltas say.

Qwen3-VL: its interleaved M-RoPE is the host's own rotary module, so VTU needs nothing new; its
DeepStack features (:attr:`MergedTokens.taps`, one per merged token) become rows added after the
first decoder layers (:attr:`QwenDymuInputs.deepstack`), where the stock model adds them at the
visual positions. Each row's feature is the mean of its positions' features (docs/concepts.md).

:func:`qwen_dymu_inputs` is the shared first half (tower, rows, layout), on the processor's patches:
``generate()`` with DyMU (:mod:`~dymu_lightning.backbones.hf_qwen_vl_generate`, through ``apply_dymu``)
calls it from the patched forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dymu_lightning.backbones.hf_llm import CacheKind, HFCompactCache, vtu_decode, vtu_prefill
from dymu_lightning.backbones.registry import find_backbone
from dymu_lightning.core import MergedTokens, MergePolicy
from dymu_lightning.core.vtu import VirtualLayout, layout_from_keys


@dataclass(frozen=True)
class QwenDymuPrefill:
    """What :func:`qwen_vl_prefill` computes.

    Attributes:
        logits: ``[B, N_un, V]`` per row (text tokens and merged visual tokens).
        layout: rows -> the N positions of the full prompt, with ``[3, B, N]`` M-RoPE positions.
        merged: the tower's output (cells as tokens).
        rope_deltas: ``[B, 1]`` the host's M-RoPE offset of the next text position.
        cache: the language model's cache, if one was asked for.
    """

    logits: Tensor
    layout: VirtualLayout
    merged: MergedTokens
    rope_deltas: Tensor
    cache: object | None

    def position_logits(self) -> Tensor:
        """``[B, N, V]``: each position's row's logits (what the stock model gives per position when
        nothing merged)."""
        return self.layout.to_positions(self.logits)


def qwen_vl_prefill(
    model: nn.Module,
    input_ids: Tensor,
    images: Sequence[Tensor],
    policy: MergePolicy,
    attention_mask: Tensor | None = None,
    rotary: str = "exact",
    cache: CacheKind | None = None,
    videos: Sequence[Tensor] = (),
    second_per_grid_ts: Tensor | None = None,
) -> QwenDymuPrefill:
    """The prompt through a ``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL) with DyMU.

    Args:
        model: the whole model.
        input_ids: ``[B, N]`` with one ``image_token_id`` per cell of each image and one
            ``video_token_id`` per cell of each video (all slices), each kind in the order of its list.
        images: each ``[3, H, W]``, already normalised, sides multiples of 28 px (patch x merge).
        policy: the tower's merging policy.
        attention_mask: ``[B, N]`` (left padding), or None.
        rotary: the tower's rotary mode (``"exact"`` or ``"mean"``).
        cache: None, ``"expanded"`` or ``"compact"`` (see :mod:`dymu_lightning.backbones.hf_llm`).
        videos: each ``[F, 3, H, W]``, already normalised, ``F`` a multiple of ``temporal_patch_size``.
        second_per_grid_ts: ``[V]`` seconds per slice of each video (Qwen2.5-VL's temporal spacing).
    """
    tower = model.model.visual
    backbone = find_backbone(tower)
    image_inputs = backbone.patchify(tower, images) if images else (None, None)
    video_inputs = backbone.patchify_videos(tower, videos) if videos else (None, None)
    inputs = qwen_dymu_inputs(
        model, input_ids, *image_inputs, policy, attention_mask, rotary, *video_inputs, second_per_grid_ts
    )
    hidden, store = vtu_prefill(model.model.language_model, inputs.rows, inputs.layout, cache, inputs.deepstack)
    return QwenDymuPrefill(model.lm_head(hidden), inputs.layout, inputs.merged, inputs.rope_deltas, store)


@dataclass(frozen=True)
class QwenDymuInputs:
    """The language model's input after DToMe.

    Attributes:
        rows: ``[B, N_un, C]`` embeddings of the rows (text tokens and merged visual tokens), numbered
            per sample by first position, zeros past a sample's own rows.
        layout: rows -> the N positions of the full prompt, with ``[3, B, N]`` M-RoPE positions.
        merged: the tower's output (cells as tokens; a row per image, then per video slice).
        rope_deltas: ``[B, 1]`` the host's M-RoPE offset of the next text position.
        deepstack: Qwen3-VL's DeepStack features as rows, ``[B, N_un, C]`` each (zeros in text
            rows), added after the language model's first layers; empty for Qwen2-VL and 2.5-VL.
    """

    rows: Tensor
    layout: VirtualLayout
    merged: MergedTokens
    rope_deltas: Tensor
    deepstack: tuple[Tensor, ...] = ()


def qwen_dymu_inputs(
    model: nn.Module,
    input_ids: Tensor,
    patches: Tensor | None,
    grid_thw: Tensor | None,
    policy: MergePolicy,
    attention_mask: Tensor | None = None,
    rotary: str = "exact",
    video_patches: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid_ts: Tensor | None = None,
) -> QwenDymuInputs:
    """The tower with DToMe, and the rows and layout of the prompt ``input_ids`` (``[B, N]``, one
    placeholder per cell).

    Args:
        patches, grid_thw: the images as Qwen's image processor cuts them (``[P, D]``, ``[I, 3]``), or None.
        video_patches, video_grid_thw: the videos as its video processor cuts them, or None.
        second_per_grid_ts: ``[V]`` (Qwen2.5-VL), passed on to the host's ``get_rope_index``.

    The tower runs once over the images then the videos; :attr:`QwenDymuInputs.merged` has one row
    per image and per video slice, in that order.
    """
    tower = model.model.visual
    backbone = find_backbone(tower)
    config = model.config
    kinds = [  # (placeholder id, modality type of get_rope_index, patches, grid, noun)
        (config.image_token_id, 1, patches, grid_thw, "image"),
        (config.video_token_id, 2, video_patches, video_grid_thw, "video"),
    ]
    types = torch.zeros_like(input_ids, dtype=torch.int)
    cell_counts = []
    for token_id, kind, _, grid, noun in kinds:
        placeholder = input_ids == token_id
        types[placeholder] = kind
        cells = 0 if grid is None else int(grid.prod(1).sum()) // backbone.unit(tower)
        found = int(placeholder.sum())
        if found != cells:
            raise ValueError(f"input_ids hold {found} {noun} placeholders; the {noun}s have {cells} cells")
        cell_counts.append(cells)
    present = [(p, g) for _, _, p, g, _ in kinds if g is not None]
    if not present:
        raise ValueError("qwen_dymu_inputs needs images or videos (patches with their grid_thw)")
    all_patches, all_grid = (torch.cat(parts) for parts in zip(*present, strict=True))
    merged = backbone.merged_forward_patches(tower, all_patches, all_grid, policy, rotary=rotary)
    rope_options = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
    positions, deltas = model.model.get_rope_index(
        input_ids,
        types,
        image_grid_thw=grid_thw,
        video_grid_thw=video_grid_thw,
        attention_mask=attention_mask,
        **rope_options,
    )
    # Keys: a cell's key is its merged token's index among the packed tokens (image slices, then video
    # slices, in order, as the tower packs them), so a group's placeholders share a row; a text
    # position's key is its own, after all visual ones. layout_from_keys numbers the rows per sample
    # by first position.
    first_token = merged.lengths.cumsum(0) - merged.lengths  # [S]
    token_of_cell = (first_token[:, None] + merged.group)[merged.group >= 0]  # slice after slice, cell order
    keys = torch.empty_like(input_ids)
    image_keys, video_keys = token_of_cell.split(cell_counts)
    keys[types == 1] = image_keys
    keys[types == 2] = video_keys
    batch, length = input_ids.shape
    text_keys = merged.packed.shape[0] + torch.arange(batch * length, device=input_ids.device)
    text = types == 0
    keys[text] = text_keys.view(batch, length)[text]
    valid = torch.ones_like(text) if attention_mask is None else attention_mask.bool()
    layout, row_key = layout_from_keys(keys, positions, valid)

    embeds = model.get_input_embeddings()(input_ids)  # the placeholders' embeddings go unused
    table = torch.cat([merged.packed.to(embeds.dtype), embeds.flatten(0, 1)])  # indexed by key
    rows = torch.where(row_key[..., None] >= 0, table[row_key.clamp(min=0)], 0)  # [B, N_un, C]
    # DeepStack (Qwen3-VL): a visual row reads its merged token's tap feature, a text row zeros.
    visual = merged.packed.shape[0]
    is_visual = ((row_key >= 0) & (row_key < visual))[..., None]
    deepstack = tuple(
        torch.where(is_visual, tap.to(embeds.dtype)[row_key.clamp(0, visual - 1)], 0) for tap in merged.taps
    )
    return QwenDymuInputs(rows, layout, merged, deltas, deepstack)


def next_positions(positions: Tensor, valid: Tensor, new: int) -> Tensor:
    """``[3, B, new]``: M-RoPE positions of ``new`` text tokens after a sequence whose positions are
    ``positions`` (``[3, B, N]``) and validity ``valid`` (``[B, N]``): one past its largest valid
    position, on every axis (what the host's rope deltas give)."""
    last = positions.masked_fill(~valid[None], -1).amax(dim=(0, 2))  # [B]
    steps = torch.arange(1, new + 1, device=positions.device)
    return (last[:, None] + steps).expand(3, -1, -1)


def qwen_vl_decode(model: nn.Module, cache: object, input_ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
    """New text tokens after :func:`qwen_vl_prefill` (the cache is updated in place).

    Args:
        model: the whole model.
        cache: the prefill's cache (``"compact"``: VTU decoding; ``"expanded"``: the stock language
            model on its own cache, which holds every virtual position).
        input_ids: ``[B, t]`` new tokens.
        positions: ``[3, B, t]`` their M-RoPE positions (:func:`next_positions`).
        valid: ``[B, N + t]`` validity of every position so far.

    Returns:
        ``[B, t, V]`` logits.
    """
    embeds = model.get_input_embeddings()(input_ids)
    language = model.model.language_model
    if isinstance(cache, HFCompactCache):
        hidden = vtu_decode(language, embeds, cache, positions, valid)
    else:
        hidden = language(
            inputs_embeds=embeds, position_ids=positions, attention_mask=valid.long(), cache=cache
        ).last_hidden_state
    return model.lm_head(hidden)
