"""Prefill of a whole Qwen2.5-VL with DyMU against the stock model: the vision tower alone and the
whole prefill (tower, then the M-RoPE language model with VTU), interleaved in one process.

Random weights (timing does not depend on them). Each prompt is 32 text tokens and one image at
native resolution, the sizes cycling through ``--sizes`` (the prompts of a batch have different
lengths, left-padded). The tower merges ``--keep`` of each image's cells left, roughly, with a fixed
``r`` per block (the same for every image, within windows); the rotary mode is the exact one. The
FLOPs ideal counts the projections and MLPs on the merged rows, attention over the full grid in the
tower (the exact rotary mode spans it) and over every position in the language model (VTU does).

    python benchmarks/qwen_vl_prefill.py                       # --geometry tiny: CPU, float32
    python benchmarks/qwen_vl_prefill.py --geometry qwen2.5-vl-7b --device cuda --dtype bfloat16 --batch 1 8
"""

from __future__ import annotations

import argparse
import sys

import torch
from encoder_speed import add_run_arguments, machine_name, timed, write_report
from torch import Tensor, nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from vtu_prefill import prefill_flops

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.hf_llava import apply_dymu, last_prefill
from dymu_lightning.core import MergePolicy

IMAGE, TEXT = 151655, 32
QWEN25_VL_7B = {  # Qwen/Qwen2.5-VL-7B-Instruct's config.json
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
    "text": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    },
    "sizes": ["448x448", "672x448"],  # 256 and 384 cells
}
TINY = {  # the same shape of model, scaled down for a CPU: 8 blocks, 2 of them full attention
    "vision": {
        "depth": 8,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_heads": 4,
        "out_hidden_size": 256,
        "patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [3, 7],
    },
    "text": {
        "vocab_size": 152064,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
    },
    "sizes": ["448x448", "336x448"],  # 256 and 192 cells
}
GEOMETRIES = {"tiny": TINY, "qwen2.5-vl-7b": QWEN25_VL_7B}


def build(geometry: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random weights, created on ``device`` in ``dtype`` (8B parameters in float32 on the CPU first
    would be 33 GB)."""
    config = Qwen2_5_VLConfig(
        vision_config=geometry["vision"], text_config=geometry["text"], image_token_id=IMAGE, video_token_id=IMAGE + 1
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def prompts(model: nn.Module, sizes: list[tuple[int, int]], batch: int) -> dict[str, Tensor]:
    """``batch`` prompts of :data:`TEXT` tokens and one smooth random image each, as Qwen's processor
    gives them (left-padded to the longest)."""
    backbone, tower = get_backbone("hf_qwen2_5_vl"), model.model.visual
    generator = torch.Generator().manual_seed(1)
    images, ids = [], []
    for b in range(batch):
        height, width = sizes[b % len(sizes)]
        coarse = torch.randn(1, 3, height // 56, width // 56, generator=generator)
        images.append(torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear")[0])
        cells = height * width // backbone.cell_pixels(tower) ** 2
        ids.append([1] * (TEXT // 2) + [IMAGE] * cells + [2] * (TEXT // 2))
    longest = max(map(len, ids))
    input_ids = torch.tensor([[0] * (longest - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in ids])
    patches, grid = backbone.patchify(tower, images)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values": patches.to(device, dtype),
        "image_grid_thw": grid.to(device),
        "mm_token_type_ids": (input_ids == IMAGE).int().to(device),
    }


def tower_flops(model: nn.Module, grid: Tensor, counts: Tensor) -> float:
    """The tower's FLOPs: projections and MLP on the cells there are (``counts`` ``[I, L + 1]``: cells
    before each block, and after the last), attention over every window or image (full grid), and the
    patch merger on the final cells."""
    config, backbone = model.config, get_backbone("hf_qwen2_5_vl")
    c, i, unit = config.hidden_size, config.intermediate_size, backbone.unit(model)
    windows = backbone.windows(model, grid).split((grid.prod(1) // unit).tolist())
    window_squares = sum(int((w.bincount() * unit).pow(2).sum()) for w in windows)
    image_squares = int((grid.prod(1) ** 2).sum())
    windowed = backbone.windowed_layers(model)
    total = 0.0
    for layer in range(config.depth):
        before, after = unit * counts[:, layer].sum().item(), unit * counts[:, layer + 1].sum().item()
        total += 8 * before * c * c + 6 * after * c * i  # q, k, v, proj; gated MLP (after the merge)
        total += 4 * c * (window_squares if layer in windowed else image_squares)
    merged = counts[:, -1].sum().item()
    return total + 2 * merged * (unit * c) * (unit * c + config.out_hidden_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--sizes", nargs="+", help="HxW px, multiples of 28 (default: the geometry's)")
    parser.add_argument("--keep", type=float, default=0.33, help="fraction of each image's cells left, roughly")
    add_run_arguments(parser, "qwen_vl_prefill")
    args = parser.parse_args(argv)

    geometry = GEOMETRIES[args.geometry]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = [tuple(int(v) for v in size.split("x")) for size in (args.sizes or geometry["sizes"])]
    model = build(geometry, device, dtype)
    tower, backbone = model.model.visual, get_backbone("hf_qwen2_5_vl")
    cells = [h * w // backbone.cell_pixels(tower) ** 2 for h, w in sizes]
    r = round((1 - args.keep) * min(cells) / tower.config.depth)
    policy = MergePolicy(mode="fixed_r", r=r)
    lines = [
        f"# Qwen2.5-VL prefill with DyMU on {machine_name(device)}, {args.dtype}, torch {torch.__version__}",
        f"# command: python {' '.join(sys.argv)}",
        f"{args.geometry}, random weights; {TEXT} text tokens and one image per prompt, sizes cycling "
        f"{' '.join(args.sizes or geometry['sizes'])} ({' / '.join(map(str, cells))} cells); "
        f"r = {r} cells a block (fixed_r), exact rotary, compact cache",
        "",
        "| batch | cells -> rows per image | tower: stock | DyMU | ratio | FLOPs ideal "
        "| prefill: stock | DyMU | ratio | FLOPs ideal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    apply_dymu(model, policy, cache="compact")
    for batch in args.batch:
        inputs = prompts(model, sizes, batch)
        patches, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        with torch.inference_mode():
            merged = backbone.merged_forward_patches(tower, patches, grid, policy)
            seconds = timed(
                {
                    "tower stock": lambda x=patches, g=grid: tower(hidden_states=x, grid_thw=g),
                    "tower dymu": lambda x=patches, g=grid: backbone.merged_forward_patches(tower, x, g, policy),
                    "stock": lambda i=inputs: type(model).forward(model, **i, use_cache=True, logits_to_keep=1),
                    "dymu": lambda i=inputs: model(**i, use_cache=True, logits_to_keep=1),
                },
                args.repeats,
                device,
            )
        counts = merged.tokens_per_layer.cpu()
        accounting = last_prefill(model)
        visual_rows, visual_cells = accounting["visual_rows"].cpu(), accounting["visual_positions"].cpu()
        positions = inputs["attention_mask"].sum(1).cpu()
        rows = positions - visual_cells + visual_rows  # one image per prompt
        text = model.config.text_config.to_dict()
        lm = [
            sum(prefill_flops(int(n), int(p), text) for n, p in zip(k, positions, strict=True))
            for k in (rows, positions)
        ]
        full = counts[:, :1].expand_as(counts)
        tower_ideal = tower_flops(tower, grid.cpu(), counts) / tower_flops(tower, grid.cpu(), full)
        ideal = (tower_flops(tower, grid.cpu(), counts) + lm[0]) / (tower_flops(tower, grid.cpu(), full) + lm[1])
        ms = {name: value * 1e3 for name, value in seconds.items()}
        lines.append(
            f"| {batch} | {visual_cells.float().mean():.0f} -> {visual_rows.float().mean():.0f} "
            f"| {ms['tower stock']:.1f} ms | {ms['tower dymu']:.1f} ms | {ms['tower dymu'] / ms['tower stock']:.2f}x "
            f"| {tower_ideal:.2f}x | {ms['stock']:.1f} ms | {ms['dymu']:.1f} ms | {ms['dymu'] / ms['stock']:.2f}x "
            f"| {ideal:.2f}x |"
        )
        print(lines[-1], flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
