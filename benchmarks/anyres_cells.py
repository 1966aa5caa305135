"""Rows and layout cost of DyMU's AnyRes cells at LLaVA-OneVision's real geometry.

384 px crops of 27 x 27 patches, OneVision's 36 default grid shapes and ``anyres_max_9``; the
language model's hidden size of OneVision-0.5B (896). Every crop keeps one merged token per
``--ratio`` patches in synthetic groups (runs of raster neighbours, the same in every run). Prints,
per image size: crops, cells (placeholders), rows, rows of their own (newlines and downsampled cells
that straddle groups), and the time of ``anyres_cells`` (first call, with the probe, and later calls)
against the stock ``pack_image_features`` on the same crops. Only the layout is timed, no tower or
language model.

    python benchmarks/anyres_cells.py                       # 1920 x 1080 and 640 x 480, CPU, 1 thread
    python benchmarks/anyres_cells.py --sizes 1000x1000 --ratio 2
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from dymu_lightning.backbones.hf_llava_next import anyres_cells, crops_per_image, pack

PATCHES = 27 * 27


def best_of(repeats: int, run) -> float:
    """Seconds of the fastest of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1920x1080", "640x480"], help="WIDTHxHEIGHT")
    parser.add_argument("--ratio", type=int, default=3, help="patches per merged token")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=384, patch_size=14
    )
    text = Qwen2Config(
        vocab_size=64, hidden_size=896, intermediate_size=64, num_hidden_layers=1, num_attention_heads=14
    )
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=63)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = PATCHES // args.ratio
    for text_size in args.sizes:
        width, height = (int(v) for v in text_size.split("x"))
        sizes = torch.tensor([[height, width]])
        crops = crops_per_image(model, sizes)
        # each crop's patches in raster order, cut into `tokens` runs: the groups of its merged tokens
        groups = torch.randint(0, tokens, (crops[0], PATCHES), generator=generator).sort(1).values
        token_of_patch = torch.arange(crops[0])[:, None] * tokens + groups
        visual = torch.randn(crops[0] * tokens, text.hidden_size, generator=generator)
        features = torch.randn(crops[0], PATCHES, text.hidden_size, generator=generator)
        memo: dict = {}
        cells_of = partial(anyres_cells, model, visual, token_of_patch, crops, sizes, memo)
        with torch.no_grad():
            first = best_of(1, cells_of)  # runs the probe
            later = best_of(args.repeats, cells_of)
            stock = best_of(args.repeats, partial(pack, model, [features], sizes, model.model.image_newline))
            cells = cells_of()
        group_rows = cells.token[cells.token >= 0].unique().numel()
        print(
            f"{text_size}: {crops[0]} crops, {cells.token.numel()} cells, {group_rows + cells.own.shape[0]} rows "
            f"({cells.own.shape[0]} of their own); anyres_cells {first * 1e3:.0f} ms first, "
            f"{later * 1e3:.0f} ms later; stock pack_image_features {stock * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
