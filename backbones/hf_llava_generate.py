"""``generate()`` with DyMU in a HF LLaVA: the patched ``forward`` and ``_expand_inputs_for_generation``.

:func:`~dymu_lightning.backbones.hf_llava.apply_dymu` binds both to the model as instance attributes.
While applied:

* a forward with ``pixel_values`` (or OneVision's ``pixel_values_videos``; the prefill of
  ``generate()``) builds the rows with :func:`~dymu_lightning.backbones.hf_llava_inputs.dymu_inputs`
  and prefills the language model with VTU;
* later forwards (decoding) run the stock model on the expanded cache, or
  :func:`~dymu_lightning.backbones.hf_llm.vtu_decode` on the compact one;
* beam search and ``num_return_sequences`` copy each prompt's images (crops, videos) as a group.

``input_ids`` still hold one placeholder per virtual position, as the processor writes them, which is
why ``generate()``'s bookkeeping (attention mask, positions, cache length) needs no change.
"""

from __future__ import annotations

import inspect
from itertools import accumulate

import torch
import transformers
from torch import Tensor, nn
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from dymu_lightning.backbones.hf_llava_inputs import STATE_ATTRIBUTE, LlavaPatch, dymu_inputs
from dymu_lightning.backbones.hf_llava_next import crops_per_image, image_lengths, is_anyres
from dymu_lightning.backbones.hf_llm import positions_kept, stock_unless_dymu, vtu_decode, vtu_prefill

# generate()'s hook that copies each sample for beams and returned sequences (see its override below).
# It is private: the override is written against this version's parameters, checked by apply_dymu and
# pinned by tests/test_llava.py.
EXPAND_ATTRIBUTE = "_expand_inputs_for_generation"
EXPAND_TESTED_WITH = "5.24"
EXPAND_PARAMETERS = ("self", "expand_size", "is_encoder_decoder", "input_ids", "model_kwargs")


def check_expand_hook(model_class: type) -> None:
    """Refuse a transformers whose private ``_expand_inputs_for_generation`` is not the one our
    override wraps (its parameters changed): beam search would otherwise mix up a prompt's images."""
    stock = getattr(model_class, EXPAND_ATTRIBUTE, None)
    found = tuple(inspect.signature(stock).parameters) if stock is not None else ()
    if found != EXPAND_PARAMETERS:
        raise RuntimeError(
            f"transformers {transformers.__version__}: {model_class.__name__}.{EXPAND_ATTRIBUTE} takes {found}, "
            f"not {EXPAND_PARAMETERS} as in transformers {EXPAND_TESTED_WITH}, which DyMU's override of it "
            "(backbones/hf_llava_generate.py) was written against; update the override for this version"
        )


def expand_inputs_for_generation(
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


def dymu_forward(
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
    stock = stock_unless_dymu(
        self,
        visual,
        cache,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        labels=labels,
        logits_to_keep=logits_to_keep,
        use_cache=use_cache,
        **kwargs,
    )
    if stock is not None:
        return stock

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
