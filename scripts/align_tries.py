"""Alignment tries for the small LLaVA, judged on validation images carved from the training split.

Trains the projector as ``align_small_llava`` does (the first 384 training images, 48 steps of 8,
seed 0, cached tower features) with one try's settings, then scores the zero-shot class-name accuracy
on the next ``--validate`` training images (384 onwards: never trained on, never test images), under
the mean over a name's tokens (the study's score) and the sum. Nothing is installed; one JSON line
per try is printed and appended to ``--out``. The tries of docs/finetune.md ran as

    python scripts/align_tries.py --lr 0.002 --class-loss 0 --init random
    python scripts/align_tries.py --lr 0.0001            # the defaults of align_small_llava
    python scripts/align_tries.py --steps 0              # the fitted start alone
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from dymu_lightning.assets.align import BATCH_SIZE, IMAGE_SIZE, SEED, TRAIN_IMAGES
from dymu_lightning.assets.paths import small_llava_dir
from dymu_lightning.backbones.hf_vit import dinov2_image_processor
from dymu_lightning.vlm.align import (
    AlignConfig,
    CaptionedImages,
    fit_align,
    fit_projector_to_names,
    init_projector,
    pixel_tensor,
    tower_features,
)
from dymu_lightning.vlm.captions import (
    SCORING_TEMPLATES,
    TEMPLATES,
    answer_ids,
    caption_set,
    class_first_ids,
    class_token_ids,
    prompt_ids,
    scoring_prefix_ids,
)
from dymu_lightning.vlm.evaluate import scoring_input_ids
from dymu_lightning.vlm.scoring import score_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--class-loss", type=float, default=1.0)
    parser.add_argument("--captions", choices=["scoring", "all"], default="scoring")
    parser.add_argument("--init", choices=["names", "random"], default="names")
    parser.add_argument("--steps", type=int, default=None, help="stop after N steps (0: no training)")
    parser.add_argument("--validate", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("runs/align_tries"))
    parser.add_argument("--out", type=Path, default=Path("runs/align_tries/tries.jsonl"))
    args = parser.parse_args()

    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(small_llava_dir())
    model = LlavaForConditionalGeneration.from_pretrained(small_llava_dir(), dtype=torch.float32).eval()
    patches = (IMAGE_SIZE // model.config.vision_config.patch_size) ** 2
    templates = SCORING_TEMPLATES if args.captions == "scoring" else TEMPLATES
    images = caption_set(f"fashion_mnist:train:{TRAIN_IMAGES + args.validate}", SEED, templates)
    images.require("train", "tries")
    pixels = pixel_tensor(images.paths, dinov2_image_processor(IMAGE_SIZE, shortest_edge=IMAGE_SIZE))
    labels = images.labels[:TRAIN_IMAGES]
    features = tower_features(model, pixels[:TRAIN_IMAGES])
    prompt = prompt_ids(tokenizer, model.config.image_token_id, patches)
    answers = answer_ids(tokenizer, images.captions[:TRAIN_IMAGES], prompt.end)
    dataset = CaptionedImages(features, answers, features=True, labels=labels)
    init_projector(model, SEED)
    if args.init == "names":
        fit_projector_to_names(model, features, labels, class_first_ids(tokenizer))
    work = args.work / f"lr{args.lr}_cl{args.class_loss}_{args.captions}_{args.init}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = AlignConfig(
        out_dir=work,
        seed=SEED,
        batch_size=BATCH_SIZE,
        lr=args.lr,
        schedule=args.schedule,
        warmup_steps=args.warmup,
        class_loss=args.class_loss,
        class_first_ids=class_first_ids(tokenizer),
        class_prefix=len(scoring_prefix_ids(tokenizer)),
        stop_after_steps=args.steps or None,
        progress_bar=False,
        resume=False,
    )
    started = time.perf_counter()
    facts = fit_align(model, dataset, prompt, tokenizer.pad_token_id, cfg)[2] if args.steps != 0 else {}
    trained = time.perf_counter() - started
    ids, names = scoring_input_ids(tokenizer, model.config.image_token_id, patches), class_token_ids(tokenizer)
    totals, means = [], []
    with torch.inference_mode():
        for start in range(TRAIN_IMAGES, len(pixels), 8):
            batch = pixels[start : start + 8]
            scores = score_classes(model, ids.expand(len(batch), -1), batch, names)
            totals.append(scores.total)
            means.append(scores.mean)
    truth = images.labels[TRAIN_IMAGES:]
    mean, total = torch.cat(means).argmax(-1), torch.cat(totals).argmax(-1)
    result = {
        **{k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "steps_run": facts.get("global_steps", 0),
        "final_caption_loss": facts.get("final_caption_loss", facts.get("final_train_loss")),
        "final_class_loss": facts.get("final_class_loss"),
        "validation": f"fashion_mnist:train images {TRAIN_IMAGES}..{len(pixels) - 1}",
        "accuracy_mean": float((mean == truth).double().mean()),
        "accuracy_sum": float((total == truth).double().mean()),
        "predicted_per_class_mean": torch.bincount(mean, minlength=len(names)).tolist(),
        "training_seconds": trained,
    }
    print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
