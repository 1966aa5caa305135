"""DyMU in a whole Qwen2-VL / Qwen2.5-VL, prefill only: the merged tower's tokens placed in the M-RoPE
language model with VTU.

The prompt is the stock one (one image placeholder per cell, as Qwen's processor writes it). The
tower merges cells (:mod:`dymu_lightning.backbones.hf_qwen_vl`); each image then contributes one
*row* per merged token instead of one per cell, and every placeholder position reads the row of its
cell's group. Positions are the host's own M-RoPE positions of the full prompt (``get_rope_index``),
so every cell keeps its (t, h, w) position and the text keeps its own.

Decoding (:func:`qwen_vl_decode`) continues from a prefill's cache, one or more new text tokens at a
time: the compact cache through VTU's decoding, the expanded one through the stock language model.
New text continues after the prompt's largest M-RoPE position, on all three axes, as the host's rope
deltas say.

:func:`qwen_dymu_inputs` is the shared first half (tower, rows, layout), on the processor's patches:
``generate()`` with DyMU (:mod:`~dymu_lightning.backbones.hf_qwen_vl_generate`, through ``apply_dymu``)
calls it from the patched forward. Not done yet: videos.
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
) -> QwenDymuPrefill:
    """The prompt through a ``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL) with DyMU.

    Args:
        model: the whole model.
        input_ids: ``[B, N]`` with one ``image_token_id`` per cell of each image, images in order.
        images: each ``[3, H, W]``, already normalised, sides multiples of 28 px (patch x merge).
        policy: the tower's merging policy.
        attention_mask: ``[B, N]`` (left padding), or None.
        rotary: the tower's rotary mode (``"exact"`` or ``"mean"``).
        cache: None, ``"expanded"`` or ``"compact"`` (see :mod:`dymu_lightning.backbones.hf_llm`).
    """
    backbone = find_backbone(model.model.visual)
    patches, grid = backbone.patchify(model.model.visual, images)
    inputs = qwen_dymu_inputs(model, input_ids, patches, grid, policy, attention_mask, rotary)
    hidden, store = vtu_prefill(model.model.language_model, inputs.rows, inputs.layout, cache)
    return QwenDymuPrefill(model.lm_head(hidden), inputs.layout, inputs.merged, inputs.rope_deltas, store)


@dataclass(frozen=True)
class QwenDymuInputs:
    """The language model's input after DToMe.

    Attributes:
        rows: ``[B, N_un, C]`` embeddings of the rows (text tokens and merged visual tokens), numbered
            per sample by first position, zeros past a sample's own rows.
        layout: rows -> the N positions of the full prompt, with ``[3, B, N]`` M-RoPE positions.
        merged: the tower's output (cells as tokens).
        rope_deltas: ``[B, 1]`` the host's M-RoPE offset of the next text position.
    """

    rows: Tensor
    layout: VirtualLayout
    merged: MergedTokens
    rope_deltas: Tensor


def qwen_dymu_inputs(
    model: nn.Module,
    input_ids: Tensor,
    patches: Tensor,
    grid_thw: Tensor,
    policy: MergePolicy,
    attention_mask: Tensor | None = None,
    rotary: str = "exact",
) -> QwenDymuInputs:
    """The tower with DToMe on ``patches`` (``[P, D]``, ``grid_thw`` ``[I, 3]``, as Qwen's processor cuts
    them), and the rows and layout of the prompt ``input_ids`` (``[B, N]``, one placeholder per cell)."""
    tower = model.model.visual
    backbone = find_backbone(tower)
    merged = backbone.merged_forward_patches(tower, patches, grid_thw, policy, rotary=rotary)
    placeholder = input_ids == model.config.image_token_id
    cells = grid_thw[:, 1] * grid_thw[:, 2] // backbone.unit(tower)
    found, expected = int(placeholder.sum()), int(cells.sum())
    if found != expected:
        raise ValueError(f"input_ids hold {found} image placeholders; the images have {expected} cells")
    positions, deltas = model.model.get_rope_index(
        input_ids, placeholder.int(), image_grid_thw=grid_thw, attention_mask=attention_mask
    )
    # Keys: a cell's key is its merged token's index among the packed tokens (images in order, as the
    # tower packs them), so a group's placeholders share a row; a text position's key is its own,
    # after all visual ones. layout_from_keys numbers the rows per sample by first position.
    first_token = merged.lengths.cumsum(0) - merged.lengths  # [I]
    token_of_cell = first_token[:, None] + merged.group  # [I, U0]; columns past an image's cells unused
    keys = torch.empty_like(input_ids)
    keys[placeholder] = token_of_cell[merged.group >= 0]  # row-major: image after image, cell order
    batch, length = input_ids.shape
    text_keys = merged.packed.shape[0] + torch.arange(batch * length, device=input_ids.device)
    keys[~placeholder] = text_keys.view(batch, length)[~placeholder]
    valid = torch.ones_like(placeholder) if attention_mask is None else attention_mask.bool()
    layout, row_key = layout_from_keys(keys, positions, valid)

    embeds = model.get_input_embeddings()(input_ids)  # the placeholders' embeddings go unused
    table = torch.cat([merged.packed.to(embeds.dtype), embeds.flatten(0, 1)])  # indexed by key
    rows = torch.where(row_key[..., None] >= 0, table[row_key.clamp(min=0)], 0)  # [B, N_un, C]
    return QwenDymuInputs(rows, layout, merged, deltas)


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
