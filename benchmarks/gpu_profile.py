"""Where the time goes on a GPU: torch.profiler over the DToMe encoder and the LLaVA prefill, against
the stock model, so that a slowdown can be traced to kernels, host syncs or launch overhead.

For each case: wall time per call, the summed CUDA kernel time, the number of kernels launched and
of device-to-host syncs, then the top operators by self CUDA time and by self CPU time.

    python benchmarks/gpu_profile.py --out benchmarks/results/gpu_profile   # needs CUDA

Cases: CLIP-L/14-336 (timm, random weights) at batch 1 and 64 with DToMe at 33% of the tokens, and
the LLaVA-1.5-7B geometry (random weights, benchmarks/llava_generate.py) prefill at batch 16.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from encoder_speed import GEOMETRIES, machine_name, photos, write_report
from torch.profiler import ProfilerActivity, profile

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.padded_engine import run_blocks_padded

PSEUDO_KERNELS = ("Command Buffer Full", "Activity Buffer Request")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def profiled(name: str, fn: Callable[[], object], lines: list[str], rows: int) -> None:
    """Warm up, time three calls, then profile one and append its summary to ``lines``."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # "Command Buffer Full" is the host waiting for a free launch slot, which the profiler books as
    # device time: leave it out of the kernels' sum.
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.key not in PSEUDO_KERNELS]
    cuda_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    launches = sum(e.count for e in kernels)
    syncs = {e.key: e.count for e in events if e.key in SYNC_EVENTS}
    lines += [
        f"## {name}",
        "",
        f"- wall {wall * 1e3:.1f} ms per call; CUDA kernels {cuda_ms:.1f} ms ({cuda_ms / (wall * 1e3):.0%} of wall); "
        f"{launches} kernel launches; host calls: {syncs}",
        "",
        "```",
        events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60),
        events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60),
        "```",
        "",
    ]
    print(lines[-6], flush=True)


def encoder_cases(lines: list[str], dtype: torch.dtype, rows: int) -> None:
    backbone = get_backbone("timm_vit")
    model_name, kwargs = GEOMETRIES["l14_336"]
    torch.manual_seed(0)
    model = backbone.build({"model_name": model_name, **kwargs}).to("cuda", dtype).eval()
    pixels = backbone.preprocess(model, photos(64)).to("cuda", dtype)
    layers = backbone.num_layers(model)
    with torch.inference_mode():
        full = backbone.embed(model, pixels[:1]).shape[1]
    r = round(0.67 * (full - backbone.num_prefix_tokens(model)) / layers)  # 33% left, as encoder_speed.py
    policy = MergePolicy(thresholds=batch_thresholds(backbone, model, pixels, r))
    blocks = backbone.blocks(model)
    with torch.inference_mode():
        for batch in (1, 64):
            chunk = pixels[:batch]
            stock = lambda c=chunk: backbone.stock_features(model, c)  # noqa: E731
            profiled(f"encoder l14_336 batch {batch}: stock", stock, lines, rows)
            profiled(
                f"encoder l14_336 batch {batch}: DToMe 33% (r={r})",
                lambda c=chunk: backbone.merged_forward(model, c, policy),
                lines,
                rows,
            )
            profiled(
                f"encoder l14_336 batch {batch}: DToMe 33% (r={r}), padded engine (before capacity buffers)",
                lambda c=chunk: run_blocks_padded(backbone.embed(model, c), blocks, policy, 1, model.norm),
                lines,
                rows,
            )


def llava_cases(lines: list[str], dtype: torch.dtype, rows: int, batch: int) -> None:
    from llava_generate import llava15_setup

    from dymu_lightning.backbones.hf_llava import apply_dymu, remove_dymu

    setup = llava15_setup(torch.device("cuda"), dtype, None, tiny=False)
    model, inputs = setup.model, setup.inputs(batch)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    def prefill() -> object:
        return model(**inputs, position_ids=positions, logits_to_keep=1)

    with torch.inference_mode():
        profiled(f"LLaVA-7B geometry prefill, batch {batch}: stock", prefill, lines, rows)
        apply_dymu(model, setup.thresholds, cache="expanded")
        profiled(f"LLaVA-7B geometry prefill, batch {batch}: DyMU + VTU (expanded cache)", prefill, lines, rows)
        tower, backbone = model.model.vision_tower, get_backbone("hf_clip")
        blocks = model.config.vision_config.num_hidden_layers + 1 + model.config.vision_feature_layer
        profiled(
            f"CLIP-L tower alone, batch {batch}: DToMe ({blocks} blocks, as LLaVA reads it)",
            lambda: backbone.merged_forward(tower, inputs["pixel_values"], setup.thresholds, num_blocks=blocks),
            lines,
            rows,
        )
        remove_dymu(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_profile"))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=12, help="operators listed per table")
    parser.add_argument("--llava-batch", type=int, default=16)
    parser.add_argument("--encoder-only", action="store_true", help="skip the LLaVA cases")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    lines = [
        f"# GPU profile on {machine_name(torch.device('cuda'))}, {args.dtype}, torch {torch.__version__}",
        f"# command: python {' '.join(sys.argv)}",
        "",
    ]
    encoder_cases(lines, dtype, args.rows)
    if not args.encoder_only:
        llava_cases(lines, dtype, args.rows, args.llava_batch)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
