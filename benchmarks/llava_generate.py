"""generate() on a LLaVA: the stock model against DyMU with the compact and with the expanded KV cache,
at several batch sizes.

`--model small` (default): the small real LLaVA (DINOv2-S + projector + SmolLM2-135M). Prompts are
the chat template around one photo each (the bundled photos, so every sample of a batch has its own
image and its own visual token count). Thresholds are DyMU-mid-like: found in this process on 13
photos with r = 35 over the 11 blocks the LLaVA reads, or read from `--thresholds`.

`--model dinov2s-7b`: the small LLaVA's real tower (DINOv2-S read at its penultimate layer, 336 px,
576 patches) with a random projector and a random Llama-2-7B: the language model of LLaVA-1.5-7B fed
the per-image visual token counts of a real tower. The tower's weights come from `make assets`;
thresholds from `--thresholds` (e.g. the small LLaVA's DyMU-mid calibration) or found here on 16
photos with DyMU-mid's budget. Prompts as for `llava15-7b`. A GPU model, like the next.

`--model llava15-7b`: LLaVA-1.5-7B's geometry with random weights (CLIP-L/14-336 tower read at its
penultimate layer, 2-layer GELU projector, Llama-2-7B), built directly on the device in the run's
dtype; about 14 GB in bfloat16, so for a GPU. No tokenizer: each prompt is BOS and 3 text tokens,
576 image placeholders and 33 to 36 more text tokens (random ids), left-padded. Pixels are the
bundled photos with CLIP's preprocessing at 336 px. Thresholds are found in this process on 16 photos
with DyMU-mid's budget (195 of 576 patch tokens left after the 23 blocks read); the tower is random,
so each photo's token count is not what the real CLIP-L would give it.

For each variant, from inside one generate() call: the prefill (until the first next-token scores),
the median time per further token (between consecutive scores), the visual rows, the KV cache bytes,
and the peak memory of a generate() of 2 tokens. Rounds interleave the variants in one process.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the whole call (weights included;
"prefill peak" is the same counter read at the first scores); on the CPU, the peak bytes of the
tensors allocated inside the call (weights and inputs excluded; ``benchmarks/peak_memory.py``). Both
are also given per prompt above the stock model's, the quantity the issue's "+160 MiB per prompt"
is about. The report ends with issue 12's targets for the batches measured (prefill at most 1.0x
stock at batch 1 and 0.55x at batch 16, compact-cache decoding at most 1.1x per token at batch 64,
peak memory at most 1.05x stock), each marked met or NOT met.

    python benchmarks/llava_generate.py                      # batch 1 and 4, CPU, float32
    python benchmarks/llava_generate.py --model llava15-7b --tiny --batch 1 4   # CPU, a small geometry
    python benchmarks/llava_generate.py --batch 1 16 --device cuda --dtype bfloat16
    python benchmarks/llava_generate.py --model llava15-7b --batch 1 16 64 --device cuda --dtype bfloat16
    python benchmarks/llava_generate.py --model dinov2s-7b --batch 1 16 --device cuda --dtype bfloat16 \
        --thresholds runs/results/calibrate/llava_mid/thresholds.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from encoder_speed import add_run_arguments, encoder_flops, machine_name, photos, write_report
from peak_memory import PeakTensorBytes
from torch import Tensor
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)
from vtu_prefill import LLAMA2_7B, prefill_flops

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import apply_dymu, dymu_inputs, is_dymu, last_prefill, remove_dymu
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.schedule import merges_per_layer

VARIANTS = ("stock", "compact", "expanded")

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336, Llama-2-7B, image token 32000, pad 32001.
LLAVA15_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# `--tiny` (tests on CPU only): the same structure, a few layers and narrow.
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2,
               "image_size": 112}  # fmt: skip
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4}  # fmt: skip
IMAGE_TOKEN, PAD_TOKEN = 32000, 32001
DYMU_MID_LEFT = 195 / 576  # patch tokens DyMU-mid leaves after LLaVA-1.5's feature layer


@dataclass
class Setup:
    """A LLaVA ready to benchmark.

    Attributes:
        model: the LLaVA, on the device, in eval mode.
        thresholds: what apply_dymu gets (a thresholds.json path or a policy).
        inputs: batch size -> generate()'s inputs on the device (pixels in the model's dtype).
        patches: image placeholders per image.
        title: what the model is, for the report's heading.
        about: one line on the tower, the prompts and the thresholds.
    """

    model: LlavaForConditionalGeneration
    thresholds: str | MergePolicy
    inputs: Callable[[int], dict[str, Tensor]]
    patches: int
    title: str
    about: str


class StepClock(LogitsProcessor):
    """Stamps the time each time generate() has next-token scores: after the prefill, then after
    every decoding step; on CUDA also the peak memory allocated so far, at the first scores (the
    prefill's peak)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.prefill_peak: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.is_cuda:
            torch.cuda.synchronize()
            if self.prefill_peak is None:
                self.prefill_peak = torch.cuda.max_memory_allocated(scores.device)
        self.stamps.append(time.perf_counter())
        return scores


def cache_bytes(cache: object) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# Issue 12's GPU targets for generate(): (what, ratio, batch, variants, at most)
TARGETS = (
    ("prefill", 1, ("compact", "expanded"), 1.0),
    ("prefill", 16, ("compact", "expanded"), 0.55),
    ("decode", 64, ("compact",), 1.1),
    ("peak", None, ("compact", "expanded"), 1.05),
)


def target_lines(ratios: dict[tuple[int, str], dict[str, float]]) -> list[str]:
    """One line per target whose batch was measured: each variant's ratio to stock and whether it is met
    (``peak`` applies at every batch)."""
    lines = []
    for what, batch, variants, limit in TARGETS:
        batches = sorted({b for b, _ in ratios}) if batch is None else [batch]
        for b in batches:
            if (b, "stock") not in ratios:
                continue
            found = ", ".join(f"{v} {ratios[b, v][what]:.2f}x" for v in variants)
            verdict = "met" if all(ratios[b, v][what] <= limit for v in variants) else "NOT met"
            lines.append(f"- target: {what} <= {limit:.2f}x stock at batch {b}: {found} ({verdict})")
    return ["", *lines] if lines else []


def measured_memory(run: Callable, variant: str, inputs: dict, device: torch.device) -> tuple[object, StepClock, int]:
    """generate() of 2 tokens with ``variant``: its output, its clock and its peak memory in bytes (on
    CUDA the allocator's peak, weights included; on the CPU the peak of the tensors allocated inside
    the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _, _, out, clock = run(variant, inputs, 2)
        return out, clock, torch.cuda.max_memory_allocated(device)
    with PeakTensorBytes() as tracker:
        _, _, out, clock = run(variant, inputs, 2)
    return out, clock, tracker.peak


def small_setup(device: torch.device, dtype: torch.dtype, thresholds_path: str | None) -> Setup:
    """The small real LLaVA of `make assets`, its processor's chat template around each photo."""
    from transformers import AutoProcessor

    from dymu_lightning.assets.paths import small_llava_dir

    processor = AutoProcessor.from_pretrained(small_llava_dir())
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(small_llava_dir(), dtype=dtype).to(device).eval()
    tower = model.model.vision_tower
    if thresholds_path:
        thresholds = thresholds_path
    else:
        calibration = processor.image_processor(photos(13), return_tensors="pt")["pixel_values"]
        found = batch_thresholds(get_backbone("hf_dinov2"), tower, calibration.to(device, dtype), r=[35] * 11 + [0])
        thresholds = MergePolicy(thresholds=found)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nDescribe this picture."}], tokenize=False, add_generation_prompt=True
    )

    def inputs(batch: int) -> dict[str, Tensor]:
        encoded = processor(images=photos(batch), text=[prompt] * batch, return_tensors="pt", padding=True)
        encoded = {k: v.to(device) for k, v in encoded.items()}
        encoded["pixel_values"] = encoded["pixel_values"].to(dtype)
        return encoded

    about = "DINOv2-S tower at 336 px (576 patches, 11 blocks read) + SmolLM2-135M; one photo per prompt"
    return Setup(model, thresholds, inputs, 576, "the small real LLaVA", about)


def llava15_config(tiny: bool = False) -> LlavaConfig:
    """LLaVA-1.5-7B's architecture (``tiny``: the same structure, shrunk for CPU tests)."""
    vision = {**LLAVA15_VISION, **(TINY_VISION if tiny else {})}
    text = {**LLAMA2_7B, **(TINY_TEXT if tiny else {})}
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision).to_dict(),
        text_config=LlamaConfig(**text, pad_token_id=PAD_TOKEN).to_dict(),
        image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=patches,
    )


def random_llava(config: LlavaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The model with seeded random weights, created on ``device`` in ``dtype`` (never on the CPU first:
    7B parameters in float32 would be 28 GB)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def llava15_prompts(batch: int, patches: int, seed: int = 0) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[batch, N]``: BOS and 3 text tokens, ``patches`` image
    placeholders, then 36, 35, 34, 33, 36, ... text tokens (random ids), left-padded."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        before = [1, *torch.randint(3, IMAGE_TOKEN, (3,), generator=generator).tolist()]
        after = torch.randint(3, IMAGE_TOKEN, (36 - i % 4,), generator=generator).tolist()
        rows.append([*before, *[IMAGE_TOKEN] * patches, *after])
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[PAD_TOKEN] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def dymu_mid_r(model: LlavaForConditionalGeneration, image_size: int | None = None) -> list[int]:
    """Per-layer r of the tower that leaves DyMU-mid's share of patch tokens after the blocks LLaVA
    reads, for images of ``image_size`` (default: the tower's configured size)."""
    vision = model.config.vision_config
    patches = ((image_size or vision.image_size) // vision.patch_size) ** 2
    blocks = vision.num_hidden_layers + 1 + model.config.vision_feature_layer  # hidden_states[-2]: all but one
    left = round(patches * DYMU_MID_LEFT) + 1  # and the CLS token
    return merges_per_layer(vision.num_hidden_layers, "constant", tokens_left=left, tokens=patches + 1,
                            merging_layers=blocks)  # fmt: skip


def llava15_setup(device: torch.device, dtype: torch.dtype, thresholds_path: str | None, tiny: bool) -> Setup:
    model = random_llava(llava15_config(tiny), device, dtype)
    tower, backbone = model.model.vision_tower, get_backbone("hf_clip")
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    r = dymu_mid_r(model)
    if thresholds_path:
        thresholds = thresholds_path
    else:
        calibration = backbone.preprocess(tower, photos(16)).to(device, dtype)
        thresholds = MergePolicy(thresholds=batch_thresholds(backbone, tower, calibration, r=r))

    def inputs(batch: int) -> dict[str, Tensor]:
        prompts = {k: v.to(device) for k, v in llava15_prompts(batch, patches).items()}
        return {**prompts, "pixel_values": backbone.preprocess(tower, photos(batch)).to(device, dtype)}

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    about = (
        f"LLaVA-1.5-7B geometry{' (--tiny)' if tiny else ''}, RANDOM weights ({weights / 2**30:.1f} GiB): "
        f"CLIP-L/14 tower at {vision.image_size} px ({patches} patches, {sum(x > 0 for x in r)} blocks read) + "
        f"Llama-2-7B; one photo per prompt, 40 or fewer text tokens; thresholds found here on 16 photos, "
        f"r = {r[0]}..{min(x for x in r if x)} per block ({sum(r)} merges: DyMU-mid's budget); random tower, "
        "so per-image counts are not real CLIP's"
    )
    return Setup(model, thresholds, inputs, patches, "LLaVA-1.5-7B geometry, random weights", about)


def dinov2s_7b_setup(device: torch.device, dtype: torch.dtype, thresholds_path: str | None, tiny: bool) -> Setup:
    """The small LLaVA's real DINOv2-S tower with a random projector and a random Llama-2-7B."""
    from transformers import Dinov2Model

    from dymu_lightning.assets import fetch as assets
    from dymu_lightning.assets.small_llava import FEATURE_LAYER, IMAGE_SIZE, PATCH_SIZE, small_llava_image_processor

    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=assets.dinov2_small_config().to_dict(),
        text_config=LlamaConfig(**{**LLAMA2_7B, **(TINY_TEXT if tiny else {})}, pad_token_id=PAD_TOKEN).to_dict(),
        image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="default",
        image_seq_length=patches,
    )
    model = random_llava(config, device, dtype)
    tower = model.model.vision_tower
    tower.load_state_dict(Dinov2Model.from_pretrained(assets.dinov2_small_dir(), dtype=dtype).state_dict())
    processor = small_llava_image_processor()

    def pixels(count: int) -> Tensor:
        return processor(photos(count), return_tensors="pt")["pixel_values"].to(device, dtype)

    r = dymu_mid_r(model, IMAGE_SIZE)
    if thresholds_path:
        thresholds, found = thresholds_path, f"thresholds from {thresholds_path}"
    else:
        thresholds = MergePolicy(thresholds=batch_thresholds(get_backbone("hf_dinov2"), tower, pixels(16), r=r))
        found = f"thresholds found here on 16 photos, {sum(r)} merges per image (DyMU-mid's budget)"

    def inputs(batch: int) -> dict[str, Tensor]:
        prompts = {k: v.to(device) for k, v in llava15_prompts(batch, patches).items()}
        return {**prompts, "pixel_values": pixels(batch)}

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    about = (
        f"REAL DINOv2-S tower at {IMAGE_SIZE} px ({patches} patches, penultimate layer) + random projector + "
        f"{'tiny Llama (--tiny)' if tiny else 'Llama-2-7B'} with RANDOM weights ({weights / 2**30:.1f} GiB); "
        f"one photo per prompt, 40 or fewer text tokens; {found}"
    )
    return Setup(model, thresholds, inputs, patches, "DINOv2-S tower (real) + Llama-2-7B geometry", about)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["small", "llava15-7b", "dinov2s-7b"], default="small")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the 7B models shrunk, for tests
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated in the timed decode")
    parser.add_argument("--thresholds", help="a thresholds.json for the tower (default: found here)")
    add_run_arguments(parser, "llava_generate")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model == "small":
        setup = small_setup(device, dtype, args.thresholds)
    elif args.model == "dinov2s-7b":
        setup = dinov2s_7b_setup(device, dtype, args.thresholds, args.tiny)
    else:
        setup = llava15_setup(device, dtype, args.thresholds, args.tiny)
    model, thresholds = setup.model, setup.thresholds
    text, vision = model.config.text_config, model.config.vision_config
    llm = {
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
    }

    def run(variant: str, inputs: dict, new_tokens: int) -> tuple[float, float, object, StepClock]:
        """Prefill seconds, median seconds per further token, generate()'s output and its clock."""
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
        generated = out.sequences.shape[1] - inputs["input_ids"].shape[1]
        if generated != new_tokens:  # min_new_tokens holds a random model's EOS back; check it did
            raise RuntimeError(f"{variant}: generate() made {generated} tokens, not {new_tokens}")
        steps = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:], strict=True)]
        return clock.stamps[0] - start, statistics.median(steps) if steps else math.nan, out, clock

    peak_what = "peak memory (prefill)" if device.type == "cuda" else "peak tensor bytes"
    lines = [
        f"# generate() on {setup.title}, {machine_name(device)}, {args.dtype}, torch {torch.__version__}",
        f"# command: python {' '.join(sys.argv)}",
        f"{setup.about}; decode = {args.new_tokens} new tokens after the first",
        "",
        "| batch | variant | visual rows (mean) | prefill | / stock | FLOPs ideal | per new token | / stock "
        f"| KV cache | / stock | {peak_what} | / stock | per prompt vs stock |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    ratios: dict[tuple[int, str], dict[str, float]] = {}
    for batch in args.batch:
        inputs = setup.inputs(batch)
        prefill: dict[str, list[float]] = {v: [] for v in VARIANTS}
        decode: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for variant in VARIANTS:
                seconds, per_token, *_ = run(variant, inputs, 1 + args.new_tokens)
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
        # CLIP's config names the MLP width, DINOv2's its ratio to the hidden size
        mlp_ratio = getattr(vision, "intermediate_size", None) or vision.mlp_ratio * vision.hidden_size
        mlp_ratio /= vision.hidden_size
        full_tokens = tokens[:, :1].expand_as(tokens)
        positions = inputs["input_ids"].shape[1]
        counts = merged.layout.counts()
        rows = (counts > 0).sum(1)
        notes.append(
            f"- batch {batch}: the language model runs {int(rows.sum())} packed rows; padded to the prompt "
            f"with most rows they would be {batch} x {merged.layout.num_rows} = {batch * merged.layout.num_rows}"
        )
        dymu = encoder_flops(tokens, vision.hidden_size, mlp_ratio) + sum(
            prefill_flops(int(r), positions, llm) for r in rows
        )
        stock = encoder_flops(full_tokens, vision.hidden_size, mlp_ratio) + batch * prefill_flops(
            positions, positions, llm
        )

        peaks: dict[str, int] = {}
        for variant in VARIANTS:
            out, clock, peak = measured_memory(run, variant, inputs, device)
            peaks[variant] = peak
            ratios[batch, variant] = {
                "prefill": prefill[variant] / prefill["stock"],
                "decode": decode[variant] / decode["stock"],
                "peak": peak / peaks["stock"],
            }
            size = cache_bytes(out.cache)
            if variant == "stock":
                stock_size, visual = size, float(setup.patches)
            else:
                visual = float(last_prefill(model)["visual_rows"].float().mean())
            ideal = f"{dymu / stock:.2f}x" if variant != "stock" else "1.00x"
            prefill_peak = f" ({clock.prefill_peak / 2**20:.0f})" if clock.prefill_peak is not None else ""
            lines.append(
                f"| {batch} | {variant} | {visual:.1f} | {prefill[variant] * 1e3:.0f} ms | "
                f"{prefill[variant] / prefill['stock']:.2f}x | {ideal} | {decode[variant] * 1e3:.0f} ms | "
                f"{decode[variant] / decode['stock']:.2f}x | {size / 2**20:.1f} MiB | "
                f"{size / stock_size:.2f}x | {peak / 2**20:.0f}{prefill_peak} MiB | {peak / peaks['stock']:.3f}x | "
                f"{(peak - peaks['stock']) / batch / 2**20:+.1f} MiB |"
            )
            print(lines[-1], flush=True)
    write_report([*lines, "", *notes, *target_lines(ratios)], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
