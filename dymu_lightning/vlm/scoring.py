"""Zero-shot classification by class-name likelihood.

The language model reads the image and a fixed prompt that ends where a class name would start
("... assistant: A photo of a"); each class is scored by the log-probabilities of its name's tokens
(their sum, and their mean over the name's tokens), and the prediction is the best-scoring class.

The prompt runs once per image; its KV cache is then repeated for the K class names, which are
scored in one batched forward. Three ways of feeding the image (the same prompt and class names):

- the stock model (no DyMU applied): all visual tokens;
- DyMU with VTU (``apply_dymu`` first): merged rows, attention over the full grid's positions;
- DyMU without VTU (``vtu=False``): the merged rows as a shorter sequence at consecutive positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dymu_lightning.backbones.hf_llava import dymu_inputs, is_dymu, last_prefill


@dataclass(frozen=True)
class ClassScores:
    """Attributes: ``total`` and ``mean`` ``[B, K]`` log-probability of each class name (summed
    and averaged over its tokens); ``visual_rows`` ``[B]`` the rows each image became."""

    total: Tensor
    mean: Tensor
    visual_rows: Tensor

    def predict(self, reduce: str = "mean") -> Tensor:
        """``[B]`` the best class under ``total`` or ``mean``."""
        if reduce not in ("total", "mean"):
            raise ValueError(f"reduce must be 'total' or 'mean', got {reduce!r}")
        return getattr(self, reduce).argmax(-1)


def _padded(class_ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """``([K, T] ids padded with 0, [K, T] bool valid)`` of the class names."""
    if not class_ids or any(len(ids) == 0 for ids in class_ids):
        raise ValueError("every class name needs at least one token")
    longest = max(len(ids) for ids in class_ids)
    ids = torch.zeros(len(class_ids), longest, dtype=torch.long)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for k, name in enumerate(class_ids):
        ids[k, : len(name)] = torch.tensor(name)
        valid[k, : len(name)] = True
    return ids, valid


def _prefill(
    model: nn.Module, input_ids: Tensor, pixel_values: Tensor, vtu: bool
) -> tuple[Tensor, object, Tensor, Tensor, Tensor]:
    """Run the prompt: ``([B, V] last logits, cache, [B, M] prefix mask, [B] next position, [B] visual rows)``."""
    batch, length = input_ids.shape
    if not is_dymu(model):
        out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
        placeholders = (input_ids == model.config.image_token_id).sum(1)  # one image per prompt
        mask = torch.ones_like(input_ids)
        return out.logits[:, -1], out.cache, mask, torch.full((batch,), length), placeholders
    if vtu:
        out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
        mask = torch.ones_like(input_ids)
        return out.logits[:, -1], out.cache, mask, torch.full((batch,), length), last_prefill(model)["visual_rows"]
    # Without VTU: the rows at consecutive positions, padding (rows no position uses) masked out.
    inputs = dymu_inputs(model, input_ids, pixel_values)
    used = inputs.layout.counts() > 0  # [B, N_un]
    positions = (used.long().cumsum(1) - 1).clamp(min=0)
    out = model.model.language_model(
        inputs_embeds=inputs.rows, attention_mask=used.long(), position_ids=positions, use_cache=True
    )
    last = inputs.layout.expand[:, -1]  # the row of the prompt's last token
    hidden = out.last_hidden_state[torch.arange(batch, device=last.device), last]
    return model.lm_head(hidden), out.cache, used.long(), used.sum(1), inputs.visual_rows


def score_classes(
    model: nn.Module, input_ids: Tensor, pixel_values: Tensor, class_ids: Sequence[Sequence[int]], vtu: bool = True
) -> ClassScores:
    """Log-likelihood of every class name after every image's prompt.

    Args:
        model: a ``LlavaForConditionalGeneration``, DyMU applied or not.
        input_ids: ``[B, N]`` prompts of equal length (one image each, no padding), ending right
            before the class name.
        pixel_values: ``[B, 3, H, W]``.
        class_ids: K token lists, one per class name.
        vtu: with DyMU applied, False feeds the merged rows as a plain shorter sequence.
    """
    batch = input_ids.shape[0]
    names, valid = (t.to(input_ids.device) for t in _padded(class_ids))  # [K, T]
    classes, longest = names.shape
    logits, cache, mask, start, visual_rows = _prefill(model, input_ids, pixel_values, vtu)
    first = logits.log_softmax(-1)[:, names[:, 0]]  # [B, K]: the first token of each name
    token_logp = first[..., None].expand(-1, -1, longest).clone()  # [B, K, T], the rest filled below
    if longest > 1:
        cache.batch_repeat_interleave(classes)  # [B * K] copies of each prompt
        fed = names[:, :-1].repeat(batch, 1)  # [B * K, T - 1]: token t predicts token t + 1
        steps = torch.arange(longest - 1, device=input_ids.device)
        positions = start.repeat_interleave(classes)[:, None] + steps
        attention = torch.cat([mask.repeat_interleave(classes, 0), valid[:, :-1].long().repeat(batch, 1)], 1)
        hidden = model.model.language_model(
            inputs_embeds=model.get_input_embeddings()(fed),
            attention_mask=attention,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        later = model.lm_head(hidden).log_softmax(-1)  # [B * K, T - 1, V]
        picked = later.gather(-1, names[:, 1:].repeat(batch, 1)[..., None])[..., 0]
        token_logp[..., 1:] = picked.view(batch, classes, longest - 1)
    token_logp = token_logp.masked_fill(~valid, 0.0)
    total = token_logp.sum(-1)
    return ClassScores(total, total / valid.sum(-1), visual_rows)
