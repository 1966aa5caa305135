"""generate() on the small real LLaVA (DINOv2-S + projector + SmolLM2-135M): the stock model against
DyMU with the compact and with the expanded KV cache, at several batch sizes.

Prompts are the chat template around one photo each (the bundled photos, so every sample of a batch
has its own image and its own visual token count). Thresholds are DyMU-mid-like: found in this
process on 13 photos with r = 35 over the 11 blocks the LLaVA reads, or read from `--thresholds`.
For each variant, from inside one generate() call: the prefill (until the first next-token scores),
the median time per further token (between consecutive scores), the visual rows, the KV cache bytes,
and on GPU the peak memory. Rounds interleave the variants in one process.

    python benchmarks/llava_generate.py                      # batch 1 and 4, CPU, float32
    python benchmarks/llava_generate.py --batch 1 16 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from encoder_speed import add_run_arguments, encoder_flops, machine_name, photos, write_report
from transformers import LogitsProcessor, LogitsProcessorList
from vtu_prefill import prefill_flops

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import apply_dymu, dymu_inputs, is_dymu, last_prefill, remove_dymu
from dymu_lightning.core import MergePolicy
from dymu_lightning.thresholds import batch_thresholds

VARIANTS = ("stock", "compact", "expanded")


class StepClock(LogitsProcessor):
    """Stamps the time each time generate() has next-token scores: after the prefill, then after
    every decoding step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def cache_bytes(cache: object) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated in the timed decode")
    parser.add_argument("--thresholds", help="a thresholds.json for the tower (default: found here, r = 35)")
    add_run_arguments(parser, "llava_generate")
    args = parser.parse_args(argv)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dymu_lightning.small_llava import small_llava_dir

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    processor = AutoProcessor.from_pretrained(small_llava_dir())
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(small_llava_dir(), dtype=dtype).to(device).eval()
    tower = model.model.vision_tower
    if args.thresholds:
        thresholds = args.thresholds
    else:
        calibration = processor.image_processor(photos(13), return_tensors="pt")["pixel_values"]
        found = batch_thresholds(get_backbone("hf_dinov2"), tower, calibration.to(device, dtype), r=[35] * 11 + [0])
        thresholds = MergePolicy(thresholds=found)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe this picture."}], tokenize=False, add_generation_prompt=True
    )
    text, vision = model.config.text_config, model.config.vision_config
    llm = {
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
    }

    def run(variant: str, inputs: dict, new_tokens: int) -> tuple[float, float, object]:
        """Prefill seconds, median seconds per further token, and generate()'s output."""
        if variant == "stock" and is_dymu(model):
            remove_dymu(model)
        elif variant != "stock":
            apply_dymu(model, thresholds, cache=variant)
        clock = StepClock()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                return_dict_in_generate=True,
            )
        steps = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:], strict=True)]
        return clock.stamps[0] - start, statistics.median(steps), out

    lines = [
        f"# generate() on the small real LLaVA, {machine_name(device)}, {args.dtype}, torch {torch.__version__}",
        f"# command: python {' '.join(sys.argv)}",
        "DINOv2-S tower at 336 px (576 patches, 11 blocks read) + SmolLM2-135M; one photo per prompt; "
        f"decode = {args.new_tokens} new tokens after the first",
        "",
        "| batch | variant | visual rows (mean) | prefill | / stock | FLOPs ideal | per new token | / stock "
        "| KV cache | / stock | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in args.batch:
        inputs = processor(images=photos(batch), text=[prompt] * batch, return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        prefill: dict[str, list[float]] = {v: [] for v in VARIANTS}
        decode: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for variant in VARIANTS:
                seconds, per_token, _ = run(variant, inputs, 1 + args.new_tokens)
                if round_:
                    prefill[variant].append(seconds)
                    decode[variant].append(per_token)
        prefill = {v: statistics.median(t) for v, t in prefill.items()}
        decode = {v: statistics.median(t) for v, t in decode.items()}

        # FLOPs of the prefill: the tower with its per-layer token counts, the LLM on rows / positions
        apply_dymu(model, thresholds)
        with torch.inference_mode():
            merged = dymu_inputs(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
        tokens = merged.merged.tokens_per_layer
        mlp_ratio = vision.intermediate_size / vision.hidden_size
        full_tokens = tokens[:, :1].expand_as(tokens)
        positions = inputs["input_ids"].shape[1]
        counts = merged.layout.counts()
        rows = (counts > 0).sum(1)
        dymu = encoder_flops(tokens, vision.hidden_size, mlp_ratio) + sum(
            prefill_flops(int(r), positions, llm) for r in rows
        )
        stock = encoder_flops(full_tokens, vision.hidden_size, mlp_ratio) + batch * prefill_flops(
            positions, positions, llm
        )

        for variant in VARIANTS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = run(variant, inputs, 2)[2]
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else "-"
            size = cache_bytes(out.cache)
            if variant == "stock":
                stock_size, visual = size, 576.0
            else:
                visual = float(last_prefill(model)["visual_rows"].float().mean())
            ideal = f"{dymu / stock:.2f}x" if variant != "stock" else "1.00x"
            lines.append(
                f"| {batch} | {variant} | {visual:.1f} | {prefill[variant] * 1e3:.0f} ms | "
                f"{prefill[variant] / prefill['stock']:.2f}x | {ideal} | {decode[variant] * 1e3:.0f} ms | "
                f"{decode[variant] / decode['stock']:.2f}x | {size / 2**20:.1f} MiB | "
                f"{size / stock_size:.2f}x | {peak} |"
            )
            print(lines[-1], flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
