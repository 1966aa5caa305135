"""Calibration throughput against a plain forward of the same encoder and batch, and what the global
ranking sends between processes against the size of all edges.

Calibration runs the encoder in batch top-k mode with the global cut (one process here: the gather is
the identity, but the same top-(k+1) selection, padding and ranking run). The plain forward is the
stock, unpatched encoder. Both run interleaved in one process on the same real photos.

    python benchmarks/calibration_speed.py                    # ViT-B/16-224, batch 16, r = 11, CPU
    python benchmarks/calibration_speed.py --geometry l14_336 --batch 16 --r 16
    python benchmarks/calibration_speed.py --device cuda --dtype bfloat16 --geometry l14_336 --batch 64 --r 16
"""

from __future__ import annotations

import argparse
import sys

import torch
from encoder_speed import GEOMETRIES, add_run_arguments, machine_name, photos, timed, write_report

from dymu_lightning.backbones import get_backbone
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.calibration import GlobalBatchCut


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="b16_224", choices=sorted(GEOMETRIES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--r", type=int, default=11)
    add_run_arguments(parser, "calibration_speed")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backbone = get_backbone("timm_vit")
    model_name, kwargs = GEOMETRIES[args.geometry]
    torch.manual_seed(0)
    model = backbone.build({"model_name": model_name, **kwargs})
    pixels = backbone.preprocess(model, photos(args.batch)).to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    layers = backbone.num_layers(model)
    valid = torch.ones(args.batch, dtype=torch.bool, device=device)
    cuts: list[GlobalBatchCut] = []

    def calibration_step() -> None:
        cut = GlobalBatchCut([args.r] * layers, valid, global_images=args.batch)
        cuts.append(cut)
        backbone.merged_forward(model, pixels, MergePolicy(mode="batch_topk", r=args.r, batch_cut=cut))

    with torch.inference_mode():
        seconds = timed(
            {"plain forward": lambda: backbone.stock_features(model, pixels), "calibration": calibration_step},
            args.repeats,
            device,
        )
        out = backbone.merged_forward(model, pixels, MergePolicy.off())
    tokens = out.tokens.shape[1]
    # Edge scores in the stock model: one per A token per image per layer (an upper bound: merging shrinks it).
    all_edges_bytes = args.batch * ((tokens + 1) // 2) * 4 * layers
    sent_bytes = sum(cuts[-1].bytes_sent)
    ratio = seconds["plain forward"] / seconds["calibration"]
    lines = [
        f"# calibration speed on {machine_name(device)}, {args.dtype}, torch {torch.__version__}",
        f"# command: python {' '.join(sys.argv)}",
        f"{args.geometry}, batch {args.batch}, r = {args.r} per layer, {layers} layers, {tokens} tokens",
        f"plain forward: {args.batch / seconds['plain forward']:.2f} images/s",
        f"calibration:   {args.batch / seconds['calibration']:.2f} images/s ({ratio:.2f}x the plain forward)",
        f"all-gather payload per process per step: {sent_bytes} bytes "
        f"(k+1 = B*r+1 scores per layer) vs {all_edges_bytes} bytes for all edges "
        f"({sent_bytes / all_edges_bytes:.0%})",
    ]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
