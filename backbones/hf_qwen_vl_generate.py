"""``generate()`` with DyMU in ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
``Qwen3VLForConditionalGeneration`` (whose DeepStack features the prefill adds as rows).

:func:`~dymu_lightning.backbones.hf_llava.apply_dymu` dispatches a Qwen model here for its two methods
(:func:`qwen_methods`) and sets them, with the patch state, as instance attributes, exactly as for a
LLaVA: :func:`~dymu_lightning.backbones.hf_llava.remove_dymu` deletes them and the stock model is back.
While applied:

* a forward with ``pixel_values`` or ``pixel_values_videos`` (generate()'s prefill) merges the tower's
  cells with DToMe (a video slice by slice)
  (:func:`~dymu_lightning.backbones.hf_qwen_vl_lm.qwen_dymu_inputs`) and prefills the language model
  with VTU. The virtual positions are the host's own ``get_rope_index`` M-RoPE positions of the full
  prompt, and its ``rope_deltas`` are recorded on the model as the stock forward records them, so
  decoding positions continue as stock;
* later forwards (decoding) run the stock model on the expanded cache, or VTU decoding on the compact
  one, at the M-RoPE positions generate() passes.

``input_ids`` keep one placeholder per cell, as Qwen's processor writes them: they are the virtual
positions, so generate()'s bookkeeping (attention mask, positions, cache length) needs no change.

Not done: a training loss, continuing a cached prompt with new images or videos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.backbones.hf_llm import (
    CacheKind,
    HFCompactCache,
    positions_kept,
    stock_unless_dymu,
    vtu_decode,
    vtu_prefill,
)
from dymu_lightning.backbones.hf_qwen_vl_lm import next_positions, qwen_dymu_inputs
from dymu_lightning.core import MergePolicy

QWEN_MODELS = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)


@dataclass(frozen=True)
class QwenPatch:
    """What :func:`~dymu_lightning.backbones.hf_llava.apply_dymu` attaches to a Qwen2-VL model.

    Attributes:
        backbone: the tower's adapter (``hf_qwen2_vl``, ``hf_qwen2_5_vl`` or ``hf_qwen3_vl``).
        policy: DToMe's merging policy for the tower.
        cache: ``"expanded"`` or ``"compact"``, the KV cache ``generate()`` decodes with.
        rotary: the tower's rotary mode for merged cells (``"exact"`` or ``"mean"``).
        last: what the latest prefill produced (``visual_rows``, ``visual_positions`` per image and
            per video slice, images first; ``rows``, ``positions`` per sample), as for a LLaVA.
    """

    backbone: Backbone
    policy: MergePolicy
    cache: CacheKind
    rotary: str = "exact"
    last: dict[str, Tensor] = field(default_factory=dict)


def qwen_methods(state: QwenPatch) -> tuple[Callable[..., object], Callable[..., object]]:
    """The patched ``forward`` and ``_expand_inputs_for_generation`` (unbound; ``self`` first), closed
    over ``state``."""

    def forward(
        self: nn.Module,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: object | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        second_per_grid_ts: Tensor | None = None,
        **kwargs: object,
    ) -> MultimodalCausalLMOutputWithPast:
        # Keep this signature free of `mm_encoder_outputs`: generate() then passes the raw pixels
        # here instead of encoding the images with the stock tower first.
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("DyMU encodes pixel_values itself; precomputed mm_encoder_outputs are not supported")
        if second_per_grid_ts is not None:  # only Qwen2.5-VL's forward knows it
            kwargs["second_per_grid_ts"] = second_per_grid_ts
        prefill = pixel_values is not None or pixel_values_videos is not None
        stock = stock_unless_dymu(
            self,
            prefill,
            cache,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            mm_token_type_ids=mm_token_type_ids,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if stock is not None:
            return stock
        language = self.model.language_model
        if not prefill:  # decoding with the compact cache
            positions = _decode_positions(position_ids, cache, input_ids.shape[1])
            embeds = self.get_input_embeddings()(input_ids)
            hidden = vtu_decode(language, embeds, cache, positions, attention_mask)
            kept = positions_kept(hidden.shape[1], logits_to_keep, hidden.device)
            return MultimodalCausalLMOutputWithPast(logits=self.lm_head(hidden[:, kept]), cache=cache)

        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "DyMU prefills from an empty cache; continuing a cached prompt with images is not supported"
            )
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError(f"{type(self).__name__} needs pixel_values and image_grid_thw together")
        if (pixel_values_videos is None) != (video_grid_thw is None):
            raise ValueError(f"{type(self).__name__} needs pixel_values_videos and video_grid_thw together")
        inputs = qwen_dymu_inputs(
            self,
            input_ids,
            pixel_values,
            image_grid_thw,
            state.policy,
            attention_mask,
            state.rotary,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
        )
        # Later steps without position_ids (and the stock forward on the expanded cache) read these.
        self.model.rope_deltas = inputs.rope_deltas
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        hidden, store = vtu_prefill(
            language, inputs.rows, inputs.layout, state.cache if use_cache else None, inputs.deepstack
        )
        kept = positions_kept(input_ids.shape[1], logits_to_keep, hidden.device)
        rows = inputs.layout.expand[:, kept]  # [B, K]: the row behind each kept position
        hidden = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        counts = inputs.layout.counts()  # [B, N_un] valid positions per row
        state.last.clear()
        state.last.update(
            rows=(counts > 0).sum(1),
            positions=counts.sum(1).long(),
            visual_rows=inputs.merged.lengths,
            visual_positions=inputs.merged.group.ge(0).sum(1),
        )
        return MultimodalCausalLMOutputWithPast(logits=self.lm_head(hidden), cache=store)

    def expand_inputs(
        self: nn.Module, expand_size: int = 1, input_ids: Tensor | None = None, **model_kwargs: object
    ) -> tuple[Tensor | None, dict[str, object]]:
        """generate() copies each sample ``expand_size`` times (beams, ``num_return_sequences``).

        The stock Qwen encodes the images and videos before this hook and copies each sample's
        features. Our forward takes the raw patches instead (``[P, D]``, one row per patch, with a
        grid ``[I, 3]``), which the stock hook would copy row by row. This copies each sample's patches
        and grid rows whole (and a video's ``second_per_grid_ts``), in the order of the copied samples;
        everything else as generate() does."""
        visual = {
            key: model_kwargs.pop(key, None)
            for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        }
        input_ids, model_kwargs = type(self)._expand_inputs_for_generation(
            self, expand_size=expand_size, input_ids=input_ids, **model_kwargs
        )
        if expand_size > 1 and input_ids is not None:
            originals = input_ids[::expand_size]
            unit = state.backbone.unit(self.model.visual)
            for token_id, pixels, grid, extra in (
                (self.config.image_token_id, "pixel_values", "image_grid_thw", None),
                (self.config.video_token_id, "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
            ):
                if visual[pixels] is None or visual[grid] is None:
                    continue
                patches = visual[grid].prod(1)  # [I] patch rows per image or video
                items = _items_per_sample((originals == token_id).sum(1), patches // unit)  # [B]
                per_sample = torch.zeros_like(items).index_add_(
                    0, torch.repeat_interleave(torch.arange(items.numel()), items), patches.cpu()
                )
                visual[pixels] = visual[pixels][_copy_index(per_sample, expand_size).to(visual[pixels].device)]
                copies = _copy_index(items, expand_size)
                for key in (grid, extra):
                    if key is not None and isinstance(visual[key], Tensor):
                        visual[key] = visual[key][copies.to(visual[key].device)]
        model_kwargs.update({key: value for key, value in visual.items() if value is not None})
        return input_ids, model_kwargs

    return forward, expand_inputs


def _decode_positions(position_ids: Tensor | None, cache: HFCompactCache, new: int) -> Tensor:
    """``[3, B, t]`` M-RoPE positions of the new tokens: generate()'s (which prepends a text row:
    ``[4, B, t]``), or, without any, one past the largest position so far, as the host's rope deltas
    give."""
    if position_ids is None:
        return next_positions(cache.layout.positions, cache.layout.valid, new)
    if position_ids.dim() == 2:  # plain text positions: the same on every axis
        return position_ids[None].expand(3, -1, -1)
    return position_ids[-3:]


def _items_per_sample(placeholders: Tensor, cells: Tensor) -> Tensor:
    """``[B]`` images (or videos) of each sample, from its placeholders (``[B]``) and each item's cells
    (``[I]``), items in sample order."""
    ends = cells.cpu().cumsum(0)  # placeholders up to the end of each image
    last = torch.searchsorted(ends, placeholders.cpu().cumsum(0), right=True)  # images ending in each sample
    return torch.diff(last, prepend=torch.zeros(1, dtype=last.dtype))


def _copy_index(per_sample: Tensor, expand_size: int) -> Tensor:
    """``[sum(per_sample) * expand_size]``: indices of items grouped by sample (``per_sample[b]`` of
    them), each sample's group repeated ``expand_size`` times in a row: ``[A, B]`` -> ``[A, B, A, B]``."""
    starts = per_sample.cumsum(0) - per_sample
    groups = [torch.arange(int(s), int(s + n)).repeat(expand_size) for s, n in zip(starts, per_sample, strict=True)]
    return torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long)
