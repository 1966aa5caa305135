"""Study 2's VTU question: is VTU's loss the merged content, or VTU's approximation of the full grid?

On the first N Fashion-MNIST test images at 112 px, with DyMU-mid thresholds found on the first 256
training images (batch top-k, r = 4 per block, 3 in the 11th, 0 in the last, as ``vlm_study``'s mid),
the aligned small LLaVA scores the ten class names (mean log-probability of a name's tokens after
"A photo of a") for:

* the full model;
* DyMU + VTU, and DyMU with the merged rows as a plain shorter sequence (``vlm_study``'s rows);
* the **expanded** sequence: each merged row repeated at every position it stands for, run through
  the stock language model. VTU equals it at the first layer and approximates it after (each layer
  computes one output per merged row, not one per position), so the gap between the two is VTU's
  approximation alone.

    python scripts/vtu_against_expanded.py 100     # about 6 min on 2 CPU cores
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from dymu_lightning.assets.paths import small_llava_dir
from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import apply_dymu, dymu_inputs, remove_dymu
from dymu_lightning.backbones.hf_vit import dinov2_image_processor
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy
from dymu_lightning.vlm.align import pixel_tensor
from dymu_lightning.vlm.captions import caption_set, class_token_ids
from dymu_lightning.vlm.evaluate import Reduction, classify, scoring_input_ids

MID_R = [4] * 10 + [3, 0]
BATCH = 10


def expanded_scores(model, tokenizer, pixels: torch.Tensor, patches: int) -> torch.Tensor:
    """``[n, K]`` mean log-probability of each class name, the merged rows expanded to every position."""
    prompt = scoring_input_ids(tokenizer, model.config.image_token_id, patches)
    names = class_token_ids(tokenizer)
    scores = torch.zeros(len(pixels), len(names))
    with torch.inference_mode():
        for start in range(0, len(pixels), BATCH):
            batch = pixels[start : start + BATCH]
            for k, name in enumerate(names):
                ids = torch.cat([prompt, torch.tensor(name)])[None].expand(len(batch), -1)
                inputs = dymu_inputs(model, ids, batch)
                index = inputs.layout.expand[..., None].expand(-1, -1, inputs.rows.shape[-1])  # [B, N, C]
                hidden = model.model.language_model(inputs_embeds=inputs.rows.gather(1, index)).last_hidden_state
                logp = model.lm_head(hidden[:, -len(name) - 1 : -1]).log_softmax(-1)  # predicts each name token
                target = torch.tensor(name)[None, :, None].expand(len(batch), -1, 1)
                scores[start : start + BATCH, k] = logp.gather(-1, target)[..., 0].mean(1)
    return scores


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    tokenizer = AutoTokenizer.from_pretrained(small_llava_dir())
    model = LlavaForConditionalGeneration.from_pretrained(small_llava_dir(), dtype=torch.float32).eval()
    processor = dinov2_image_processor(112, shortest_edge=112)
    calibration = pixel_tensor(caption_set("fashion_mnist:train:256").paths, processor)
    with torch.no_grad():
        thresholds = batch_thresholds(get_backbone("hf_dinov2"), model.model.vision_tower, calibration, MID_R)
    policy = MergePolicy(thresholds=thresholds)
    test = caption_set(f"fashion_mnist:test:{count}")
    pixels = pixel_tensor(test.paths, processor)
    reductions = [
        Reduction("full"),
        Reduction("DyMU-mid + VTU", policy),
        Reduction("DyMU-mid, no VTU", policy, vtu=False),
    ]
    found = classify(model, tokenizer, pixels, reductions)
    for name, result in found.items():
        accuracy = float((result["predicted"] == test.labels).double().mean())
        print(f"{name}: {accuracy:.1%} ({float(result['visual_rows'].double().mean()):.1f} visual rows)", flush=True)
    apply_dymu(model, policy)
    predicted = expanded_scores(model, tokenizer, pixels, (112 // 14) ** 2).argmax(1)
    remove_dymu(model)
    print(f"DyMU-mid, rows expanded to every position: {float((predicted == test.labels).double().mean()):.1%}")


if __name__ == "__main__":
    main()
