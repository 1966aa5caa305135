"""What distributed calibration all-gathers, and how long a step takes, at 1, 2 and 4 processes.

Runs the real CLI job (Lightning DDP, gloo on CPU) on the quickstart recipe (real DINOv2-S weights,
real photos; `make assets`) once per process count, and reads the measurements it records in
thresholds.json: `extra.bytes_gathered_per_layer`, `extra.bytes_gathered_per_step` and
`extra.seconds_per_step`. It checks the bytes against the formula of docs/scaling.md and prints a
markdown table.

    python benchmarks/calibration_scaling.py                      # 1, 2 and 4 processes, batch 8, 2 runs each
    python benchmarks/calibration_scaling.py --processes 1 2 --global-batch 16 --images 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def formula_bytes(global_batch: int, world: int, r: list[int]) -> tuple[list[int], int]:
    """(bytes one process sends per merging layer, bytes it sends per step) for a full global batch:
    float32 top-(k+1) scores per layer with k = G * r_l, plus three int64 counters and the token count
    and index of each of its G / W images (int64)."""
    per_layer = [4 * (global_batch * r_l + 1) for r_l in r if r_l > 0]
    return per_layer, sum(per_layer) + 8 * 3 + 2 * 8 * (global_batch // world)


def _run(args: argparse.Namespace, world: int, out_dir: Path) -> tuple[dict, float, dict] | None:
    """(extra, wall seconds, thresholds.json) of one CLI run with ``world`` processes."""
    command = [
        sys.executable, "-m", "dymu_lightning", f"recipe={args.recipe}", f"out_dir={out_dir}",
        f"data.global_batch_size={args.global_batch}", f"data.max_images={args.images}",
        "trainer.accelerator=cpu", f"trainer.devices={world}", "trainer.strategy=ddp",
        "trainer.progress_bar=false", "resume=false",
    ]  # fmt: skip
    started = time.perf_counter()
    # One thread per process, as one GPU per process: on a small shared machine, two intra-op threads
    # in one process were up to 3.8x slower per step than one (threads wait on each other's busy cores).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    result = json.loads((out_dir / "thresholds.json").read_text())
    extra = result["extra"]
    per_layer, per_step = formula_bytes(args.global_batch, world, result["r"])
    assert extra["bytes_gathered_per_layer"] == per_layer, (extra["bytes_gathered_per_layer"], per_layer)
    assert extra["bytes_gathered_per_step"] == per_step, (extra["bytes_gathered_per_step"], per_step)
    return extra, wall, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=24, help="images used (the bundled photos are 26)")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--repeats", type=int, default=2, help="runs per process count; the fastest is shown")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.processes:
            best = None
            for repeat in range(args.repeats):
                measured = _run(args, world, Path(tmp) / f"w{world}-{repeat}")
                if measured is None:
                    return 1
                if best is None or measured[0]["seconds_per_step"] < best[0]["seconds_per_step"]:
                    best = measured
            rows.append((world, *best))

    first = rows[0][3]
    print(f"{first['backbone']}: {first['num_layers']} layers, r = {first['r']}, global batch {args.global_batch},")
    print(f"{args.images} images in {rows[0][1]['steps']} steps, CPU ({os.cpu_count()} cores, 1 thread each), gloo\n")
    print(
        "| processes | sent per layer, per process | sent per step, per process | gathered per step, per process "
        "(W x sent) | seconds per step | wall time of the job |"
    )
    print("|---|---|---|---|---|---|")
    for world, extra, wall, _ in rows:
        layer = extra["bytes_gathered_per_layer"][0]
        step = extra["bytes_gathered_per_step"]
        print(
            f"| {world} | {layer} B | {step} B | {world * step} B | {extra['seconds_per_step']:.3f} s | {wall:.1f} s |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
