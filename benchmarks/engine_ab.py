"""The capacity engine against other engines, in adjacent pairs.

Each round times one forward of each engine back to back, on the same images and policy, and the
result is the median over rounds of the per-round time ratio (other / capacity, > 1 = the capacity
engine is faster). Pairs adjacent in time see the same machine load, so the ratio survives a busy
machine that makes absolute times and even interleaved medians unreliable. The other engines:

* ``padded``: the engine before capacity buffers (``core/padded_engine.py``), always;
* ``--compile-merge``: the capacity engine with matching and the merge step through ``torch.compile``
  (compiled before the timed rounds);
* ``--against-commit REV``: the capacity engine of ``dymu_lightning/core`` at git revision REV,
  imported as a package of its own (the same backbone, blocks and policy);
* ``--widened``: the capacity engine with proportional attention as widened heads folded into the
  projection weights (on the CPU the widened grid reference; the form ``varlen_attn`` runs on a GPU).

    python benchmarks/encoder_speed.py ...   # the full table; this script is the focused A/B
    python benchmarks/engine_ab.py --geometry b16_224 --batch 8 1 --rounds 9
    python benchmarks/engine_ab.py --batch 8 1 --rounds 9 --against-commit e9bef3a --compile-merge
    python benchmarks/engine_ab.py --batch 8 1 --rounds 7 --against-commit 41ed74b --widened
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from encoder_speed import GEOMETRIES, machine_name, photos, write_report

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.encoder import run_blocks
from dymu_lightning.core.padded_engine import run_blocks_padded


def run_blocks_at(revision: str) -> Callable:
    """``run_blocks`` of ``dymu_lightning/core`` at a git revision, imported as a package of its own."""
    archive = subprocess.run(["git", "archive", revision, "dymu_lightning/core"], capture_output=True, check=True)
    root = Path(tempfile.mkdtemp())
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as files:
        files.extractall(root, filter="data")
    package = "core_at_" + re.sub(r"\W", "_", revision)
    (root / "dymu_lightning" / "core").rename(root / package)
    for file in (root / package).glob("*.py"):
        file.write_text(file.read_text().replace("dymu_lightning.core", package))
    sys.path.insert(0, str(root))
    return importlib.import_module(f"{package}.encoder").run_blocks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="b16_224", choices=sorted(GEOMETRIES))
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--images", type=int, default=8, help="images per round (batches of --batch)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.33], help="fractions of tokens left")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_ab"))
    parser.add_argument("--compile-merge", action="store_true", help="add the engine with a compiled merge")
    parser.add_argument("--against-commit", metavar="REV", help="add the capacity engine at a git revision")
    parser.add_argument("--widened", action="store_true", help="add the engine with folded widened heads")
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
        f"# capacity engine vs other engines, {args.geometry}, {machine_name(torch.device('cpu'))}, "
        f"torch {torch.__version__}, {args.rounds} paired rounds of {args.images} images",
        f"# command: python {' '.join(sys.argv)}",
        "",
        "| variant | batch | other engine | other / capacity time, median | quartiles | capacity s/round "
        "| other s/round |",
        "|---|---|---|---|---|---|---|",
    ]
    others: dict[str, Callable] = {"padded": run_blocks_padded}
    if args.compile_merge:
        others["compiled merge"] = lambda *a, **k: run_blocks(*a, compile_merge=True, **k)
    if args.against_commit:
        others[f"capacity at {args.against_commit}"] = run_blocks_at(args.against_commit)
    if args.widened:
        others["widened heads"] = lambda *a, **k: run_blocks(*a, widened=True, **k)
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for batch in args.batch:
            chunks = images.split(batch)
            for variant, policy in policies.items():
                engines = {
                    name: lambda engine=engine, policy=policy, chunks=chunks: [
                        engine(backbone.embed(model, c), blocks, policy, prefix, final) for c in chunks
                    ]
                    for name, engine in {"capacity": run_blocks, **others}.items()
                }
                times = {name: [] for name in engines}
                for round_ in range(args.rounds + 1):
                    order = list(engines) if round_ % 2 else list(reversed(engines))  # alternate who goes first
                    for name in order:
                        start = time.perf_counter()
                        engines[name]()
                        if round_ > 0:  # round 0 warms up (and compiles)
                            times[name].append(time.perf_counter() - start)
                for name in others:
                    ratios = [o / c for o, c in zip(times[name], times["capacity"], strict=True)]
                    q1, median, q3 = statistics.quantiles(ratios, n=4)
                    lines.append(
                        f"| {variant} | {batch} | {name} | {median:.3f} | {q1:.3f}–{q3:.3f} | "
                        f"{statistics.median(times['capacity']):.2f} | {statistics.median(times[name]):.2f} |"
                    )
                    print(lines[-1], flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
