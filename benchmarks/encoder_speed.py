"""Encoder throughput with DToMe against the stock timm encoder and against the FLOPs ideal.

All variants run in one process on the same images, so ratios are comparable even on a noisy
machine. Token counts vary per image as real photos make them: thresholds for each budget are
found on the photos themselves (batch top-k rule), then every run uses threshold mode.

"token-drop limit" runs the stock blocks on the per-layer token counts DToMe reaches at the 33%
budget (each layer keeps the batch's mean count per image, dropping the rest; no matching or
merging work): the speed-up a merged encoder could reach if merging were free.
"--compare-padded" adds the padded engine (exact shapes, one host sync per merging layer, the
engine before capacity buffers) at each budget, interleaved with the current one.

    python benchmarks/encoder_speed.py                       # CPU: ViT-B/16-224 and ViT-L/14-336, batch 1 and 16
    python benchmarks/encoder_speed.py --geometry b16_224 --batch 16 --repeats 5
    python benchmarks/encoder_speed.py --geometry b16_224 --batch 16 1 --compare-padded
    python benchmarks/encoder_speed.py --device cuda --dtype bfloat16 --geometry l14_336 --batch 1 64 \
        --paths dynamic static --compare-padded

"--paths" adds the 33% budget with the engine's path forced (merged_forward picks one by itself:
static, replayed as a CUDA graph, for CUDA batches up to STATIC_BATCH_CUTOFF, else dynamic).
"--compile-merge" adds the 33% budget with matching and the merge step through torch.compile, once per
forced path (or once, on the automatic path); the warm-up call compiles. "--compile-blocks" does the
same with every block through torch.compile (``compile_blocks=True``: host layers, matching and merge).
"--bias-heads" adds the 33% budget with proportional attention as a log-size bias on the padded grid
(SDPA) instead of widened heads folded into the projections (``varlen_attn``, the default on CUDA in
half precision), once per forced path.
    python benchmarks/encoder_speed.py --device cuda --dtype bfloat16 --geometry siglip_b16_384 l14_336 --batch 1 64

Prints a markdown table and writes it, with the raw numbers as JSON, next to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.padded_engine import run_blocks_padded

GEOMETRIES = {
    # name: (timm model, kwargs)
    "b16_224": ("vit_base_patch16_224", {}),
    "l14_336": ("vit_large_patch14_clip_336", {}),
    "siglip_b16_384": ("vit_base_patch16_siglip_384", {}),
}
BUDGETS = (0.66, 0.33, 0.15)  # fraction of the tokens left after the last block
LIMIT_BUDGET = 0.33  # the budget whose token counts the token-drop limit replays


@dataclass
class Row:
    geometry: str
    variant: str
    batch: int
    tokens_mean: float
    tokens_std: float
    images_per_s: float
    speedup: float
    flops_ideal: float

    @property
    def of_ideal(self) -> float:
        return self.speedup / self.flops_ideal


def block_flops(n_in: torch.Tensor, n_out: torch.Tensor, channels: int, mlp_ratio: float) -> torch.Tensor:
    """Multiply-adds x2 of one pre-norm block per image: q/k/v and output projections and attention on
    the tokens entering the block, the MLP on the tokens left after merging."""
    n_in, n_out = n_in.double(), n_out.double()
    projections = 2 * n_in * channels * 4 * channels
    attention = 4 * n_in**2 * channels
    mlp = 4 * n_out * channels * mlp_ratio * channels
    return projections + attention + mlp


def encoder_flops(tokens_per_layer: torch.Tensor, channels: int, mlp_ratio: float) -> float:
    """Total over the batch; ``tokens_per_layer`` is ``[B, L + 1]`` as returned by the merged forward."""
    n_in, n_out = tokens_per_layer[:, :-1], tokens_per_layer[:, 1:]
    return float(block_flops(n_in, n_out, channels, mlp_ratio).sum())


def add_run_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every benchmark script shares: rounds, device, dtype and where results go."""
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{name}"), help="results path stem")


def write_report(lines: list[str], out: Path) -> None:
    """Print the report and write it to ``out`` with a .md suffix."""
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def photos(count: int) -> list[Image.Image]:
    from dymu_lightning.assets import fetch as assets

    paths = sorted(assets.sample_images().values())
    images = [Image.open(path).convert("RGB") for path in paths]
    return [images[i % len(images)] for i in range(count)]


def timed(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each variant. Rounds interleave the variants, so a slow phase of
    a noisy machine hits all of them alike; one warm-up call each comes first."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def token_drop_forward(model: torch.nn.Module, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The stock timm blocks on ``x`` (``[B, N, C]`` embedded tokens), keeping the first ``counts[l]``
    tokens of every image before block l's attention and ``counts[l + 1]`` before its MLP, where
    DToMe merges. ``counts``: ``num_blocks + 1`` host ints."""
    for layer, block in enumerate(model.blocks):
        x = x[:, : counts[layer]]
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        x = x[:, : counts[layer + 1]]
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return model.norm(x)


def run_geometry(
    name: str,
    batches: list[int],
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    compare_padded: bool = False,
    budgets: tuple[float, ...] = BUDGETS,
    paths: tuple[str, ...] = (),
    compile_merge: bool = False,
    bias_heads: bool = False,
    compile_blocks: bool = False,
) -> list[Row]:
    backbone = get_backbone("timm_vit")
    model_name, kwargs = GEOMETRIES[name]
    torch.manual_seed(0)
    model = backbone.build({"model_name": model_name, **kwargs})
    # Thresholds are found on 20 photos or more; the timed runs use the first max(batches) of them.
    pixels_all = backbone.preprocess(model, photos(max(max(batches), 20)))
    model = model.to(device=device, dtype=dtype)
    pixels_all = pixels_all.to(device=device, dtype=dtype)
    layers = backbone.num_layers(model)
    channels = model.embed_dim
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / channels
    full = backbone.embed(model, pixels_all[:1]).shape[1]

    policies = {"stock": None, "patched, +inf": MergePolicy(thresholds=[math.inf] * layers)}
    padded = {}  # variant -> the DToMe variant whose policy the padded engine runs
    for budget in sorted(set(budgets) | {LIMIT_BUDGET}, reverse=True):
        r = round((1 - budget) * (full - backbone.num_prefix_tokens(model)) / layers)
        thresholds = batch_thresholds(backbone, model, pixels_all, r)
        variant = f"DToMe {round(budget * 100)}% (r={r})"
        policies[variant] = MergePolicy(thresholds=thresholds)
        if budget == LIMIT_BUDGET:
            limit_of = variant
        if compare_padded:
            padded[f"{variant}, padded engine"] = variant

    rows = []
    images = pixels_all[: max(batches)]
    for batch in batches:
        # Every batch size sees the same images, as consecutive batches of that size.
        chunks = images.split(batch)

        def run(policy, chunks=chunks, path="auto", widened=None, **compile_options):
            if policy is None:
                return [backbone.stock_features(model, chunk) for chunk in chunks]
            return [
                backbone.merged_forward(model, chunk, policy, path=path, widened=widened, **compile_options)
                for chunk in chunks
            ]

        def run_padded(policy, chunks=chunks):
            prefix = backbone.num_prefix_tokens(model)
            final = backbone.final_norm(model)
            blocks = backbone.blocks(model)
            return [run_blocks_padded(backbone.embed(model, chunk), blocks, policy, prefix, final) for chunk in chunks]

        with torch.inference_mode():
            # The token-drop limit replays, chunk by chunk, the mean per-layer counts DToMe reached.
            limit_counts = [out.tokens_per_layer.cpu() for out in run(policies[limit_of])]
            means = [counts.double().mean(0).round().long().tolist() for counts in limit_counts]

            def run_limit(chunks=chunks, means=means):
                return [
                    token_drop_forward(model, backbone.embed(model, chunk), mean)
                    for chunk, mean in zip(chunks, means, strict=True)
                ]

            variants = {variant: partial(run, policy) for variant, policy in policies.items()}
            variants["token-drop limit (33%)"] = run_limit
            variants.update({variant: partial(run_padded, policies[of]) for variant, of in padded.items()})
            for path in paths:  # the engine's paths forced, at the limit's budget
                variants[f"{limit_of}, {path} path"] = partial(run, policies[limit_of], path=path)
            biased = {  # variant -> path, with proportional attention as a bias on the padded grid
                f"{limit_of}, {path + ' path, ' if path != 'auto' else ''}bias heads": path
                for path in (paths or ("auto",))
                if bias_heads
            }
            for variant, path in biased.items():
                variants[variant] = partial(run, policies[limit_of], path=path, widened=False)
            compiled = {  # variant -> (path, option), with the compiled merge or compiled blocks
                f"{limit_of}, {path + ' path, ' if path != 'auto' else ''}compiled {what}": (path, option)
                for what, option, wanted in (
                    ("merge", "compile_merge", compile_merge),
                    ("blocks", "compile_blocks", compile_blocks),
                )
                for path in (paths or ("auto",))
                if wanted
            }
            for variant, (path, option) in list(compiled.items()):
                variants[variant] = partial(run, policies[limit_of], path=path, **{option: True})
                try:  # compiles here, so that a torch that cannot compile costs this row, not the table
                    variants[variant]()
                except Exception as error:  # noqa: BLE001 (any compiler error)
                    print(f"# {variant}: skipped, {type(error).__name__}: {str(error)[:300]}", flush=True)
                    del variants[variant], compiled[variant]
            seconds = timed(variants, repeats, device)
            stock_counts = torch.full((len(images), layers + 1), full)
            stock_flops = encoder_flops(stock_counts, channels, mlp_ratio)
            limit = torch.cat(
                [torch.tensor(mean).expand(len(c), -1) for mean, c in zip(means, limit_counts, strict=True)]
            )
            counts_of = {"stock": stock_counts, "token-drop limit (33%)": limit}
            for variant, policy in policies.items():
                if policy is not None:
                    counts_of[variant] = torch.cat([out.tokens_per_layer.cpu() for out in run(policy)])
            counts_of.update({variant: counts_of[of] for variant, of in padded.items()})
            counts_of.update({f"{limit_of}, {path} path": counts_of[limit_of] for path in paths})
            counts_of.update({variant: counts_of[limit_of] for variant in (*compiled, *biased)})
            for variant in variants:
                counts = counts_of[variant]
                final = counts[:, -1].double()
                rows.append(
                    Row(
                        geometry=name,
                        variant=variant,
                        batch=batch,
                        tokens_mean=float(final.mean()),
                        tokens_std=float(final.std()),
                        images_per_s=len(images) / seconds[variant],
                        speedup=seconds["stock"] / seconds[variant],
                        flops_ideal=stock_flops / encoder_flops(counts, channels, mlp_ratio),
                    )
                )
                print(_format_row(rows[-1]), flush=True)
    return rows


def _format_row(row: Row) -> str:
    return (
        f"| {row.geometry} | {row.variant} | {row.batch} | {row.tokens_mean:.0f} ± {row.tokens_std:.0f} | "
        f"{row.images_per_s:.2f} | {row.speedup:.2f}x | {row.flops_ideal:.2f}x | {row.of_ideal:.0%} |"
    )


HEADER = (
    "| geometry | variant | batch | tokens out (mean ± std) | images/s | speedup vs stock | FLOPs ideal | of ideal |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", nargs="+", default=["b16_224", "l14_336"], choices=sorted(GEOMETRIES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--compare-padded", action="store_true", help="also time the padded engine")
    parser.add_argument("--paths", nargs="*", default=[], choices=["dynamic", "static"], help="force engine paths")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="fractions of tokens left")
    parser.add_argument("--compile-merge", action="store_true", help="also time the compiled merge step")
    parser.add_argument("--compile-blocks", action="store_true", help="also time every block compiled")
    parser.add_argument("--bias-heads", action="store_true", help="also time the log-size bias on the padded grid")
    add_run_arguments(parser, "encoder_speed")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    machine = machine_name(device)
    print(f"# encoder speed on {machine}, {args.dtype}, torch {torch.__version__}")
    print(f"# command: python {' '.join(sys.argv)}")
    print(HEADER)
    rows = []
    for geometry in args.geometry:
        options = (
            args.compare_padded,
            tuple(args.budgets),
            tuple(args.paths),
            args.compile_merge,
            args.bias_heads,
            args.compile_blocks,
        )
        rows += run_geometry(geometry, args.batch, args.repeats, device, dtype, *options)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = "\n".join([HEADER, *(_format_row(row) for row in rows)])
    args.out.with_suffix(".md").write_text(f"{machine}, {args.dtype}\n\n{table}\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "dtype": args.dtype, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
