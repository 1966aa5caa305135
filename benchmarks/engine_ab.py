"""The capacity engine against the padded engine (the engine before capacity buffers), in adjacent pairs.

Each round times one forward of each engine back to back, on the same images and policy, and the
result is the median over rounds of the per-round time ratio (padded / capacity, > 1 = the capacity
engine is faster). Pairs adjacent in time see the same machine load, so the ratio survives a busy
machine that makes absolute times and even interleaved medians unreliable.

    python benchmarks/encoder_speed.py ...   # the full table; this script is the focused A/B
    python benchmarks/engine_ab.py --geometry b16_224 --batch 8 1 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from encoder_speed import GEOMETRIES, machine_name, photos, write_report

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.padded_engine import run_blocks_padded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="b16_224", choices=sorted(GEOMETRIES))
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--images", type=int, default=8, help="images per round (batches of --batch)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.33], help="fractions of tokens left")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_ab"))
    args = parser.parse_args(argv)

    backbone = get_backbone("timm_vit")
    model_name, kwargs = GEOMETRIES[args.geometry]
    torch.manual_seed(0)
    model = backbone.build({"model_name": model_name, **kwargs})
    pixels_all = backbone.preprocess(model, photos(max(args.images, 20)))
    layers, prefix = backbone.num_layers(model), backbone.num_prefix_tokens(model)
    full = backbone.embed(model, pixels_all[:1]).shape[1]
    policies = {"patched, +inf": MergePolicy(thresholds=[float("inf")] * layers)}
    for budget in args.budgets:
        r = round((1 - budget) * (full - prefix) / layers)
        policies[f"DToMe {round(budget * 100)}% (r={r})"] = MergePolicy(
            thresholds=batch_thresholds(backbone, model, pixels_all, r)
        )
    images = pixels_all[: args.images]
    blocks, final = backbone.blocks(model), backbone.final_norm(model)

    lines = [
        f"# capacity engine vs padded engine, {args.geometry}, {machine_name(torch.device('cpu'))}, "
        f"torch {torch.__version__}, {args.rounds} paired rounds of {args.images} images",
        f"# command: python {' '.join(sys.argv)}",
        "",
        "| variant | batch | padded / capacity time, median | quartiles | capacity s/round | padded s/round |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for batch in args.batch:
            chunks = images.split(batch)
            for variant, policy in policies.items():
                engines = {
                    "capacity": lambda policy=policy, chunks=chunks: [
                        backbone.merged_forward(model, c, policy) for c in chunks
                    ],
                    "padded": lambda policy=policy, chunks=chunks: [
                        run_blocks_padded(backbone.embed(model, c), blocks, policy, prefix, final) for c in chunks
                    ],
                }
                times = {name: [] for name in engines}
                for round_ in range(args.rounds + 1):
                    order = list(engines) if round_ % 2 else list(reversed(engines))  # alternate who goes first
                    for name in order:
                        start = time.perf_counter()
                        engines[name]()
                        if round_ > 0:  # round 0 warms up
                            times[name].append(time.perf_counter() - start)
                ratios = [p / c for p, c in zip(times["padded"], times["capacity"], strict=True)]
                q1, median, q3 = statistics.quantiles(ratios, n=4)
                lines.append(
                    f"| {variant} | {batch} | {median:.3f} | {q1:.3f}–{q3:.3f} | "
                    f"{statistics.median(times['capacity']):.2f} | {statistics.median(times['padded']):.2f} |"
                )
                print(lines[-1], flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
