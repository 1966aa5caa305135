"""Prefill and generate() on the small real LLaVA-OneVision: the stock model against DyMU, for one
AnyRes image and for one video.

The model is `python -m dymu_lightning small_onevision` (built here if absent): DINOv2-S at 336 px
crops, SmolLM2-135M, OneVision's layout (grid pinpoints up to 3 x 3 crops, anyres_max_9, video frames
pooled 2 x 2). Thresholds are DyMU-mid-like, found in this process by batch top-k (r = 35 over the 11
blocks the model reads) on the crops OneVision's own processor cuts from 4 bundled photos. The image
prompt is the chat template around one photo (``chelsea``, 451 x 300: a base crop and 2 x 1 tiles);
the video prompt around ``--frames`` photos resized to 336 x 336, as frames.

For each prompt: visual cells (placeholders) and the rows DyMU makes of them, per image and per video
frame; the prefill (a forward with ``logits_to_keep=1``) and a greedy generate() of ``--new-tokens``,
stock and DyMU (median of ``--repeats`` rounds after a warm-up, rounds interleaved); and the FLOPs
ideal of the prefill: the tower's blocks on its per-layer token counts plus the language model's
linear layers on its rows and attention over all positions, DyMU over stock.

    python benchmarks/onevision_generate.py --repeats 3 --frames 4 --new-tokens 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_speed import add_run_arguments, encoder_flops, machine_name, write_report  # noqa: E402
from vtu_prefill import prefill_flops  # noqa: E402

from dymu_lightning.assets.paths import photos  # noqa: E402
from dymu_lightning.assets.small_onevision import materialise_small_onevision  # noqa: E402
from dymu_lightning.backbones import get_backbone  # noqa: E402
from dymu_lightning.backbones.hf_llava import apply_dymu, dymu_inputs, last_prefill, remove_dymu  # noqa: E402
from dymu_lightning.backbones.hf_llava_next import processor_crops  # noqa: E402
from dymu_lightning.backbones.thresholds import batch_thresholds  # noqa: E402
from dymu_lightning.core import MergePolicy  # noqa: E402

R_MID = 35  # DyMU-mid of the small LLaVA (recipes/small_llava_calib.yaml): ~195 of 576 tokens left
BLOCKS = 11  # the model reads hidden_states[-2] of DINOv2-S's 12 blocks


def timed(function) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        function()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4, help="video frames (photos resized to 336 x 336)")
    parser.add_argument("--new-tokens", type=int, default=4)
    add_run_arguments(parser, "onevision_generate")
    args = parser.parse_args(argv)
    from PIL import Image
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    folder = materialise_small_onevision()
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()
    tower, backbone = model.model.vision_tower, get_backbone("hf_dinov2")
    found = photos("skimage")
    pictures = {name: Image.open(found[name]).convert("RGB") for name in sorted(found)}
    calibration = processor_crops(model, processor.image_processor, list(pictures.values())[:4])
    r = [R_MID] * BLOCKS + [0] * (backbone.num_layers(tower) - BLOCKS)
    thresholds = MergePolicy(thresholds=batch_thresholds(backbone, tower, calibration, r=r))

    def prompt(token: str) -> str:
        turn = [{"role": "user", "content": f"{token}\nWhat is in this picture?"}]
        return processor.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)

    frames = [picture.resize((336, 336)) for picture in list(pictures.values())[: args.frames]]
    prompts = {
        "image": processor(images=pictures["chelsea"], text=prompt("<image>"), return_tensors="pt"),
        "video": processor(videos=[frames], text=prompt("<video>"), return_tensors="pt"),
    }
    vision, llm = model.config.vision_config, model.config.text_config.to_dict()
    lines = [
        f"# generate() on the small real LLaVA-OneVision ({machine_name(torch.device('cpu'))}, float32)",
        "",
        f"DyMU-mid-like thresholds (r = {R_MID} over {BLOCKS} blocks, batch top-k on {calibration.shape[0]} crops "
        f"of 4 photos); {args.repeats} timed round(s) after a warm-up; {args.new_tokens} new tokens.",
        "",
        "| prompt | visual cells | DyMU rows | per image / frame | prefill stock | prefill DyMU | / stock "
        "| FLOPs ideal | generate stock | generate DyMU | / stock |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, inputs in prompts.items():
        times: dict[str, list[float]] = {"prefill stock": [], "prefill dymu": [], "gen stock": [], "gen dymu": []}
        for round_ in range(args.repeats + 1):
            for variant in ("stock", "dymu"):
                if variant == "dymu":
                    apply_dymu(model, thresholds)
                prefill = timed(lambda: model(**inputs, logits_to_keep=1))  # noqa: B023
                generate = timed(lambda: model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False))  # noqa: B023
                if variant == "dymu":
                    remove_dymu(model)
                if round_:
                    times[f"prefill {variant}"].append(prefill)
                    times[f"gen {variant}"].append(generate)
        median = {key: statistics.median(values) for key, values in times.items()}
        apply_dymu(model, thresholds)
        with torch.inference_mode():
            given = {k: v for k, v in inputs.items() if k not in ("attention_mask", "pixel_values")}
            merged = dymu_inputs(model, pixel_values=inputs.get("pixel_values"), **given)
        counts = last_prefill(model)
        remove_dymu(model)
        kind = "video" if name == "video" else "visual"
        cells, rows = int(counts[f"{kind}_positions"].sum()), int(counts[f"{kind}_rows"].sum())
        units = args.frames if name == "video" else 1
        tokens = merged.merged.tokens_per_layer
        mlp = vision.mlp_ratio
        positions = inputs["input_ids"].shape[1]
        dymu_flops = encoder_flops(tokens, vision.hidden_size, mlp) + prefill_flops(
            int(counts["rows"][0]), positions, llm
        )
        stock_flops = encoder_flops(tokens[:, :1].expand_as(tokens), vision.hidden_size, mlp) + prefill_flops(
            positions, positions, llm
        )
        per = f"{cells / units:.0f} -> {rows / units:.0f}"
        lines.append(
            f"| {name}{f' ({units} frames)' if units > 1 else ''} | {cells} | {rows} | {per} | "
            f"{median['prefill stock']:.2f} s | {median['prefill dymu']:.2f} s | "
            f"{median['prefill dymu'] / median['prefill stock']:.2f}x | {dymu_flops / stock_flops:.2f}x | "
            f"{median['gen stock']:.2f} s | {median['gen dymu']:.2f} s | "
            f"{median['gen dymu'] / median['gen stock']:.2f}x |"
        )
        print(lines[-1], flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
