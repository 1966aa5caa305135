"""Proportional attention kernels on a GPU at CLIP-L shapes (docs/benchmarks.md, "GPU check", step 1).

One packed batch of variable-length images (lengths drawn like a DToMe-mid run: mean ~200 of 577,
wide spread), proportional attention by each kernel, timed with CUDA events, checked against a
float64 reference:

* bias SDPA on the padded grid (the padded engine's attention);
* ``varlen_attn`` with widened heads (d 64 -> 72), default routing (cuDNN on sm90/sm100 when
  ``max_q > 128``, else FlashAttention-2);
* the same with cuDNN disabled (FA2 if the routing honours the flag: the report says which ran);
* FlexAttention, compiled, with a document mask and a ``log(size)`` score_mod (d stays 64).

Then the whole attention sublayer (norm, qkv projection, attention, output projection) of a random
block at the same shapes, as the engine runs it: bias SDPA on the grid; widened heads made per call
(a zero-padded copy of q, k, v) with ``varlen_attn``; widened heads folded into the projection
weights with ``varlen_attn`` (issue 12's "fold the extra columns into the weights").

    python benchmarks/gpu_attention.py --dtype bfloat16 --batch 64 --heads 16

With ``--cudnn-cache`` it instead runs the padded engine 20 times on a random CLIP-L/14-336 tower
at batch 64 with ``TORCH_CUDNN_SDPA_CACHE_DEBUG=1`` set, so the log shows cuDNN's plan-cache hits
and misses (step 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from dymu_lightning.core.capacity import CapacityState
from dymu_lightning.core.encoder import BlockParts, widened_attention
from dymu_lightning.core.packed_attention import grid_attention, varlen_attention, varlen_widened
from dymu_lightning.core.widened import AttentionLinears


def packed_batch(batch: int, heads: int, head_dim: int, full: int, dtype: torch.dtype, seed: int = 0):
    """A capacity state with ``batch`` images of random lengths (and sizes summing to ``full``
    patches each), and q, k, v ``[T, H, d]`` on the GPU."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(batch, generator=generator) * 120 + 200).clamp(16, full).long()
    sizes = torch.cat([_sizes(int(n), full, generator) for n in lengths])
    total = int(lengths.sum())
    device = torch.device("cuda")
    state = CapacityState.from_rows(
        x=torch.zeros(total, 1, device=device),
        sizes=sizes.to(device),
        image=torch.arange(batch).repeat_interleave(lengths).to(device),
        position=torch.cat([torch.arange(int(n)) for n in lengths]).to(device),
        lengths=lengths.to(device),
        group=torch.zeros(batch, 1, dtype=torch.long, device=device),
        max_len=int(lengths.max()),
    )
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    return state, q, k, v


def _sizes(n: int, full: int, generator: torch.Generator) -> torch.Tensor:
    weights = torch.rand(n, generator=generator) + 0.05
    sizes = (weights / weights.sum() * full).floor().clamp(min=1)
    sizes[0] = 1  # CLS
    return sizes


def flex_attention_fn(state: CapacityState, scale: float) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    image = state.image
    log_sizes = state.sizes.log()
    total = state.capacity

    def document(b, h, q_idx, kv_idx):
        return image[q_idx] == image[kv_idx]

    def proportional(score, b, h, q_idx, kv_idx):
        return score + log_sizes[kv_idx]

    mask = create_block_mask(document, None, None, total, total, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        out = compiled(
            *(t.transpose(0, 1)[None] for t in (q, k, v)), score_mod=proportional, block_mask=mask, scale=scale
        )
        return out[0].transpose(0, 1)

    return run


def time_cuda(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds per call after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernels(args: argparse.Namespace) -> list[str]:
    dtype = getattr(torch, args.dtype)
    state, q, k, v = packed_batch(args.batch, args.heads, args.head_dim, args.full, dtype)
    scale = args.head_dim**-0.5
    grid_args = (state.sizes, state.slot, state.batch, state.max_len, scale)
    cu_seqlens = state.cu_seqlens()
    exact = grid_attention(q.double(), k.double(), v.double(), *grid_args)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "bias SDPA, padded grid": lambda: grid_attention(q, k, v, *grid_args),
        "varlen d72, default routing": lambda: varlen_attention(q, k, v, state.sizes, cu_seqlens, state.max_len, scale),
    }

    def varlen_no_cudnn():
        with torch.backends.cudnn.flags(enabled=False):
            return varlen_attention(q, k, v, state.sizes, cu_seqlens, state.max_len, scale)

    variants["varlen d72, cuDNN disabled"] = varlen_no_cudnn
    try:
        flex = flex_attention_fn(state, scale)
        variants["flex (compiled), d64"] = lambda: flex(q, k, v)
    except Exception as error:  # noqa: BLE001 - report and go on: Flex is the second opinion
        print(f"flex unavailable: {type(error).__name__}: {error}")

    lengths = state.lengths.float()
    lines = [
        f"# proportional attention, {args.dtype}, batch {args.batch}, {args.heads} heads, d {args.head_dim}, "
        f"lengths {lengths.mean():.0f} ± {lengths.std():.0f} (max {state.max_len}) of {args.full}, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        "| kernel | ms | vs bias SDPA | max error vs float64 |",
        "|---|---|---|---|",
    ]
    baseline = None
    for name, fn in variants.items():
        try:
            error = (fn().double() - exact).abs().max().item()
            ms = time_cuda(fn, args.repeats)
        except Exception as failure:  # noqa: BLE001 - one kernel failing must not hide the others
            lines.append(f"| {name} | failed: {type(failure).__name__}: {str(failure)[:80]} | | |")
            continue
        baseline = baseline or ms
        lines.append(f"| {name} | {ms:.3f} | {baseline / ms:.2f}x | {error:.2e} |")
        print(lines[-1], flush=True)
    lines += sublayers(args, state, dtype)
    if args.profile:  # which kernels each variant launched (cuDNN vs flash)
        for name, fn in variants.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
                fn()
                torch.cuda.synchronize()
            names = sorted({event.name[:60] for event in profiler.events() if event.device_type.name == "CUDA"})
            lines.append(f"- {name}: {', '.join(names[:6])}")
    return lines


def sublayers(args: argparse.Namespace, state: CapacityState, dtype: torch.dtype) -> list[str]:
    """The attention sublayer with proportional attention in each form, timed and checked."""
    channels = args.heads * args.head_dim
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(channels).cuda()
    qkv, proj = torch.nn.Linear(channels, 3 * channels).cuda(), torch.nn.Linear(channels, channels).cuda()
    scale = args.head_dim**-0.5

    def attn_in(x):
        return qkv(norm(x)).view(x.shape[0], 3, args.heads, args.head_dim).unbind(1)

    parts = BlockParts(attn_in, proj, lambda x: x, scale, AttentionLinears(norm, (qkv,), proj, None, args.head_dim))
    per_call = BlockParts(attn_in, proj, lambda x: x, scale)
    x = torch.randn(state.capacity, channels, device="cuda")
    cu_seqlens = state.cu_seqlens()

    def bias():
        q, k, v = attn_in(x)
        grid = (state.sizes, state.slot, state.batch, state.max_len, scale)
        return proj(grid_attention(q, k, v, *grid).flatten(1))

    def widened(parts):
        attention = widened_attention(parts)
        h, d = attention.qkv(x, state.sizes)
        return attention.out(varlen_widened(h, d, cu_seqlens, state.max_len, scale))

    with torch.no_grad():
        for module in (norm, qkv, proj):
            module.double()
        x = x.double()
        exact = bias()
        for module in (norm, qkv, proj):
            module.to(dtype)
        x = x.to(dtype)
        variants = {
            "sublayer, bias SDPA on the grid": bias,
            "sublayer, widened per call, varlen": lambda: widened(per_call),
            "sublayer, widened folded into the weights, varlen": lambda: widened(parts),
        }
        lines = ["", "| attention sublayer (norm, qkv, attention, out) | ms | vs bias | max error vs float64 |"]
        lines.append("|---|---|---|---|")
        baseline = None
        for name, fn in variants.items():
            try:
                error = (fn().double() - exact).abs().max().item()
                ms = time_cuda(fn, args.repeats)
            except Exception as failure:  # noqa: BLE001 - one form failing must not hide the others
                lines.append(f"| {name} | failed: {type(failure).__name__}: {str(failure)[:80]} | | |")
                continue
            baseline = baseline or ms
            lines.append(f"| {name} | {ms:.3f} | {baseline / ms:.2f}x | {error:.2e} |")
            print(lines[-1], flush=True)
    return lines


def cudnn_cache(args: argparse.Namespace) -> list[str]:
    """Run the padded engine 20 times; cuDNN prints its plan-cache debug lines to stdout."""
    os.environ["TORCH_CUDNN_SDPA_CACHE_DEBUG"] = "1"  # read when the first cuDNN SDPA graph is built
    from encoder_speed import photos

    from dymu_lightning.backbones import get_backbone
    from dymu_lightning.backbones.thresholds import batch_thresholds
    from dymu_lightning.core import MergePolicy
    from dymu_lightning.core.padded_engine import run_blocks_padded

    backbone = get_backbone("timm_vit")
    torch.manual_seed(0)
    model = backbone.build({"model_name": "vit_large_patch14_clip_336"})
    pixels = backbone.preprocess(model, photos(args.batch))
    model, pixels = model.to("cuda", getattr(torch, args.dtype)), pixels.to("cuda", getattr(torch, args.dtype))
    with torch.inference_mode():
        thresholds = batch_thresholds(backbone, model, pixels, 16)
        policy = MergePolicy(thresholds=thresholds)
        for _ in range(20):
            x = backbone.embed(model, pixels)
            run_blocks_padded(x, backbone.blocks(model), policy, 1, model.norm)
        torch.cuda.synchronize()
    return [f"# padded engine, 20 forwards at batch {args.batch}: count the cache lines above"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--full", type=int, default=577, help="tokens per image before merging")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="list the CUDA kernels each variant runs")
    parser.add_argument("--cudnn-cache", action="store_true", help="step 2: cuDNN plan-cache hit rate instead")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_attention"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    lines = cudnn_cache(args) if args.cudnn_cache else kernels(args)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
