"""Next-token fidelity of the small LLaVA: how far the distribution of the token after the prompt
moves from the full-token model's when the visual tokens are reduced.

Each prompt is the chat template around one image; the reference is the stock model with all 576
visual tokens. A variant is compared with it by ``KL(p_full || p_variant)`` of the next-token
distribution (torchmetrics) and by whether its most likely token is the reference's. For each DyMU
thresholds file (low / mid / high), three variants at the same token count:

- **DyMU + VTU**: the method;
- **DyMU, no VTU**: the same merged rows fed as a shorter sequence, one position per row;
- **ToMe + VTU**: ToMe's fixed r per layer, chosen so that its token count equals DyMU's mean on these
  images (:func:`~dymu_lightning.core.schedule.matched_fixed_r`).

    python -m dymu_lightning next_token low=runs/l/thresholds.json mid=runs/m/thresholds.json \\
        --images assets:mvtb --max-images 24 --out runs/results/next_token
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.functional import kl_divergence

from dymu_lightning.backbones.hf_llava import (
    STATE_ATTRIBUTE,
    apply_dymu,
    is_dymu,
    last_prefill,
    next_token_logits,
    remove_dymu,
)
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.schedule import matched_fixed_r
from dymu_lightning.data.shards import image_files
from dymu_lightning.data.source import resolve_images
from dymu_lightning.eval.schema import NextTokenMetrics, NextTokenVariant

PROMPT = "<image>\nDescribe this picture in one sentence."


@dataclass(frozen=True)
class Variant:
    """One way of reducing the visual tokens: a tower policy, with or without VTU."""

    name: str
    policy: MergePolicy
    vtu: bool


def kl_from_reference(reference: Tensor, logits: Tensor) -> Tensor:
    """``[B]``: ``KL(softmax(reference) || softmax(logits))`` for each row of two ``[B, V]`` logits."""
    return kl_divergence(
        reference.double().log_softmax(-1), logits.double().log_softmax(-1), log_prob=True, reduction="none"
    )


def _prompt(processor: Any) -> str:
    return processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )


def measure(
    model: nn.Module, processor: Any, images: Sequence[Image.Image], variants: Sequence[Variant], batch_size: int = 4
) -> dict[str, dict[str, list[float]]]:
    """Per variant, per image: ``kl``, ``top1`` (1.0 where the most likely token is the reference's)
    and ``visual_rows``."""
    prompt = _prompt(processor)
    found = {v.name: {"kl": [], "top1": [], "visual_rows": []} for v in variants}
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        inputs = processor(images=batch, text=[prompt] * len(batch), return_tensors="pt", padding=True)
        args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
        with torch.inference_mode():
            if is_dymu(model):
                remove_dymu(model)
            reference = model(**inputs, logits_to_keep=1).logits[:, -1]
            for variant in variants:
                apply_dymu(model, variant.policy)
                logits = next_token_logits(model, *args, vtu=variant.vtu)
                entry = found[variant.name]
                entry["kl"] += kl_from_reference(reference, logits).tolist()
                entry["top1"] += (logits.argmax(-1) == reference.argmax(-1)).double().tolist()
                entry["visual_rows"] += last_prefill(model)["visual_rows"].double().tolist()
        print(f"next-token fidelity: {min(start + batch_size, len(images))}/{len(images)} images", flush=True)
    if is_dymu(model):
        remove_dymu(model)
    return found


def matched_variants(
    model: nn.Module, processor: Any, images: Sequence[Image.Image], thresholds: dict[str, ThresholdsFile]
) -> list[Variant]:
    """For each named thresholds file: DyMU with and without VTU, and ToMe with VTU at the mean
    visual token count DyMU reaches on ``images`` (found by running the tower alone)."""
    tower = model.model.vision_tower
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    variants = []
    for name, file in thresholds.items():
        dymu = MergePolicy(thresholds=list(file.thresholds))
        state = getattr(apply_dymu(model, file), STATE_ATTRIBUTE)  # the file's checks: tower, size, depth
        with torch.inference_mode():
            merged = state.backbone.merged_forward(tower, pixels, dymu, num_blocks=state.num_blocks)
        remove_dymu(model)
        prefix = merged.num_prefix  # ToMe's schedule counts the never-merging CLS like DyMU's lengths do
        tokens, mean_tokens = merged.group.shape[1] + prefix, float(merged.lengths.double().mean())
        r = matched_fixed_r(len(file.thresholds), tokens, mean_tokens, prefix, state.num_blocks)
        variants += [
            Variant(f"DyMU-{name} + VTU", dymu, True),
            Variant(f"DyMU-{name}, no VTU", dymu, False),
            Variant(f"ToMe at DyMU-{name}'s count + VTU", MergePolicy(mode="fixed_r", r=r), True),
        ]
    return variants


def summarise(found: dict[str, dict[str, list[float]]]) -> dict[str, NextTokenVariant]:
    """Mean, standard deviation and median of the KL, top-1 agreement and mean visual rows, per variant."""
    summary = {}
    for name, entry in found.items():
        kl = torch.tensor(entry["kl"], dtype=torch.float64)
        summary[name] = NextTokenVariant(
            kl_mean=float(kl.mean()),
            kl_std=float(kl.std()) if kl.numel() > 1 else 0.0,
            kl_median=float(kl.median()),
            top1_agreement=float(torch.tensor(entry["top1"]).mean()),
            visual_rows_mean=float(torch.tensor(entry["visual_rows"]).mean()),
        )
    return summary


def study(
    thresholds: dict[str, str | Path], images: str = "assets:mvtb", max_images: int = 24, batch_size: int = 4
) -> NextTokenMetrics:
    """The whole study on the small real LLaVA; returns what ``metrics.json`` holds."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dymu_lightning.assets.paths import small_llava_dir

    started = time.perf_counter()
    processor = AutoProcessor.from_pretrained(small_llava_dir())
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(small_llava_dir()).eval()
    paths = image_files(resolve_images(images))[:max_images]
    pictures = [Image.open(p).convert("RGB") for p in paths]
    files = {name: ThresholdsFile.load(path) for name, path in thresholds.items()}
    variants = matched_variants(model, processor, pictures, files)
    found = measure(model, processor, pictures, variants, batch_size)
    return NextTokenMetrics(
        projector=aligned_projector(small_llava_dir()),
        images=len(pictures),
        image_source=images,
        prompt=PROMPT,
        thresholds={name: str(path) for name, path in thresholds.items()},
        tome_r={v.name: v.policy.r for v in variants if v.policy.mode == "fixed_r"},
        variants=summarise(found),
        per_image={"names": [p.name for p in paths], **found},
        seconds=time.perf_counter() - started,
    )


def aligned_projector(directory: Path) -> str | None:
    """How the folder's projector was aligned (its ``dymu_alignment.json``), or None: untrained."""
    alignment = directory / "dymu_alignment.json"
    if not alignment.is_file():
        return None
    record = json.loads(alignment.read_text())
    return f"`{record['command']}`, seed {record['seed']}"


def run_command(thresholds: list[str], images: str, max_images: int, batch_size: int, out: Path) -> int:
    """The ``next_token`` command: run the study, write ``out/metrics.json``, print a line per variant."""
    named = {}
    for item in thresholds:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"expected NAME=path/to/thresholds.json, got {item!r}")
        named[name] = path
    metrics = study(named, images, max_images, batch_size)
    metrics.save(out / "metrics.json")
    for name, entry in metrics.variants.items():
        print(
            f"{name}: {entry.visual_rows_mean:.1f} visual rows, KL {entry.kl_mean:.4f} ± {entry.kl_std:.4f}, "
            f"top-1 agreement {entry.top1_agreement:.0%}"
        )
    print(f"wrote {out / 'metrics.json'}")
    return 0
