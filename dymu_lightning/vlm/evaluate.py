"""Zero-shot Fashion-MNIST accuracy of the small LLaVA under several ways of reducing its visual tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dymu_lightning.backbones.hf_llava import apply_dymu, is_dymu, remove_dymu
from dymu_lightning.core import MergePolicy
from dymu_lightning.vlm.captions import class_token_ids, prompt_ids, scoring_prefix_ids
from dymu_lightning.vlm.scoring import score_classes


@dataclass(frozen=True)
class Reduction:
    """How the visual tokens reach the language model: ``policy`` None is the full model; otherwise
    the tower merges under ``policy`` and ``vtu`` says whether VTU unmerges them virtually."""

    name: str
    policy: MergePolicy | None = None
    vtu: bool = True


def scoring_input_ids(tokenizer: Any, image_token_id: int, patches: int) -> Tensor:
    """``[N]``: the chat prompt with ``patches`` placeholders, then the answer's start before the class name."""
    return torch.cat([prompt_ids(tokenizer, image_token_id, patches).prompt, scoring_prefix_ids(tokenizer)])


def classify(
    model: nn.Module,
    tokenizer: Any,
    pixels: Tensor,
    reductions: list[Reduction],
    batch_size: int = 8,
    reduce: str = "mean",
) -> dict[str, dict[str, Tensor]]:
    """Per reduction: ``predicted`` ``[n]`` class and ``visual_rows`` ``[n]`` of every image in ``pixels``
    (``[n, 3, S, S]``). DyMU is removed from ``model`` afterwards."""
    patches = (pixels.shape[-1] // model.config.vision_config.patch_size) ** 2
    ids = scoring_input_ids(tokenizer, model.config.image_token_id, patches)
    names = class_token_ids(tokenizer)
    found: dict[str, dict[str, list[Tensor]]] = {r.name: {"predicted": [], "visual_rows": []} for r in reductions}
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start : start + batch_size].to(model.dtype)
            input_ids = ids.expand(len(batch), -1)
            for reduction in reductions:
                if is_dymu(model):
                    remove_dymu(model)
                if reduction.policy is not None:
                    apply_dymu(model, reduction.policy)
                scores = score_classes(model, input_ids, batch, names, vtu=reduction.vtu)
                found[reduction.name]["predicted"].append(scores.predict(reduce))
                found[reduction.name]["visual_rows"].append(scores.visual_rows.cpu())
    if is_dymu(model):
        remove_dymu(model)
    return {name: {k: torch.cat(v) for k, v in entry.items()} for name, entry in found.items()}
