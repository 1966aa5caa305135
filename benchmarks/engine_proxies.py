"""CPU proxies for the encoder's GPU costs: host syncs and kernel launches per forward.

A GPU forward is slow when the host waits for the device (a sync per merging layer forbids
run-ahead and CUDA graphs) or when it launches many small kernels. Both show on a CPU as counts
(docs/benchmarks.md, "CPU proxies"):

* host syncs: dispatcher ops that read device data on the host (``_local_scalar_dense`` from
  ``.item()``/``int()``, ``nonzero``, boolean-mask indexing, ``repeat_interleave`` without
  ``output_size``) plus ``Tensor.tolist`` calls (on CPU they never reach the dispatcher). Reads of
  counts whose non-blocking copy already finished (``LaggedCounts``) are no sync; they are counted
  apart as "late reads";
* non-view aten ops per forward: roughly the kernels an eager GPU forward launches;
* capturable: whether two forwards on different images (different merge patterns) run the same
  sequence of ops and shapes with no sync, the condition for replaying one CUDA graph.

    python benchmarks/engine_proxies.py                      # timm ViT-Ti/16-224, batch 1 and 64
    python benchmarks/engine_proxies.py --model vit_base_patch16_224 --batch 8
    python benchmarks/engine_proxies.py --batch 8 --breakdown   # + every op of a merging block, by purpose
    python benchmarks/engine_proxies.py --batch 1 --compiled    # + the kernels of compile_blocks=True

``--breakdown`` lists the non-view ops of the static block loop's merging blocks (every block after
the first is the same sequence there) by purpose and by source line, per merging block: on the CPU's
bias grid, and on the GPU's form (widened heads folded into the projections, ``varlen_attn``) with a
CPU stand-in for the kernel that the counters see as one op.

``--compiled`` lists the graphs ``compile_blocks=True`` compiles for the static loop and the kernel
calls in each, read from Inductor's generated code (the dispatcher counters cannot see inside a
compiled graph; on a CPU the fused kernels are C++ loop nests, not the GPU's Triton kernels).

Counts only: no timing, so a noisy machine does not change them.
"""

from __future__ import annotations

import argparse
import linecache
import re
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from encoder_speed import photos
from torch.utils._python_dispatch import TorchDispatchMode

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import LaggedCounts, MergePolicy, encoder, packed_attention
from dymu_lightning.core.encoder import run_blocks, run_capacity_blocks
from dymu_lightning.core.padded_engine import run_blocks_padded

BUDGET = 0.33
_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.nonzero_static.default"}


@dataclass
class Counts:
    ops: int = 0
    syncs: int = 0
    trace: list[tuple[str, tuple]] = field(default_factory=list)


class _Counter(TorchDispatchMode):
    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if (
            name in _SYNC_OPS
            or name.startswith("aten.index.Tensor")
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
            or name.startswith("aten.repeat_interleave.Tensor")
            and kwargs.get("output_size") is None
        ):
            self.counts.syncs += 1
        if not func.is_view:
            self.counts.ops += 1
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            self.counts.trace.append((name, shapes))
        return func(*args, **kwargs)


@contextmanager
def counting(counts: Counts):
    """Count ops and syncs of everything run inside (``Tensor.tolist`` included)."""
    original = torch.Tensor.tolist

    def tolist(self):
        counts.syncs += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with _Counter(counts):
            yield counts
    finally:
        torch.Tensor.tolist = original


@torch.library.custom_op("dymu_proxy::varlen_attn", mutates_args=())
def _varlen_stand_in(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """``varlen_attn`` on the CPU: bias-free SDPA per image. One dispatcher op, as the kernel is one
    launch; the counters never see inside it (a dispatch mode is off while it handles an op)."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.numpy()  # host memory of a CPU tensor: no dispatcher op, no Tensor.tolist
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        segment = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*segment, scale=scale).transpose(0, 1)
    return out


@contextmanager
def varlen_stand_in():
    """Run the engine's CUDA branch on the CPU: widened heads and ``varlen_attn`` (the stand-in)."""
    import torch.nn.attention.varlen as varlen_module

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, num_splits=None):
        return _varlen_stand_in(q, k, v, cu_q, scale)

    saved = varlen_module.varlen_attn, encoder.varlen_available
    varlen_module.varlen_attn, encoder.varlen_available = varlen_attn, lambda device, dtype: True
    packed_attention._varlen_options.cache_clear()
    try:
        yield
    finally:
        varlen_module.varlen_attn, encoder.varlen_available = saved
        packed_attention._varlen_options.cache_clear()


# Purpose of an op, from the repository function that issued it (merge_step: from its source line).
_PURPOSES = {
    "attn_in": "host block: norm, qkv projection",
    "attn_out": "host block: output projection",
    "mlp": "host block: norm, MLP",
    "attention": "host block: attention kernel",
    "attend_and_match": "host block: residual adds",
    "feed_forward": "host block: residual adds",
    "grid_attention": "attention grid (CPU reference; varlen on a GPU)",
    "scatter_to_grid": "attention grid (CPU reference; varlen on a GPU)",
    "qkv": "host block: norm, qkv projection",
    "out": "host block: output projection",
    "after_proj": "host block: output projection",
    "log_size_column": "widened heads: log(size)/scale into k's extra column",
    "varlen_widened": "host block: attention kernel",
    "cu_seqlens": "varlen: cu_seqlens",
    "valid_mask": "matching: masks",
    "masks": "matching: masks",
    "bipartite_edges": "matching: cosine similarity, masks, best partner",
    "select": "matching: policy decision",
    "request": "capacity bookkeeping: late counts",
    "shrink": "capacity bookkeeping: shrink",
    "image": "capacity bookkeeping: shrink",
    "position": "capacity bookkeeping: shrink",
}
_MERGE_WORDS = (  # first keyword found in merge_step's source line wins
    ("group=", "merge: group map"),
    ("slot", "merge: grid slots of the new rows"),
    ("cell = ", "merge: grid slots of the new rows"),
    ("summed", "merge: size-weighted sums and sizes (one scatter)"),
    ("weighted", "merge: size-weighted sums and sizes (one scatter)"),
    ("sizes", "merge: size-weighted sums and sizes (one scatter)"),
    ("", "merge: survivors and destinations"),
)


class _Recorder(TorchDispatchMode):
    """Records each non-view op with the innermost repository frame that issued it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str, str, int]] = []  # (op, file, function, line)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            frames = [
                f for f in traceback.extract_stack() if "/dymu_lightning/" in f.filename or "/backbones/" in f.filename
            ]
            frame = frames[-1]
            self.ops.append((str(func).removeprefix("aten."), frame.filename, frame.name, frame.lineno))
        return func(*args, **(kwargs or {}))


def _purpose(op: str, filename: str, function: str, line: int) -> str:
    if op == "mean.dim":
        return "matching: keys averaged over heads"
    if function != "merge_step":
        return _PURPOSES.get(function, function)
    source = linecache.getline(filename, line)
    return next(purpose for word, purpose in _MERGE_WORDS if word in source)


def breakdown(backbone, model, policy: MergePolicy, pixels: torch.Tensor, gpu_form: bool = False) -> list[str]:
    """Markdown tables: the ops of one merging block of the static loop, by purpose and by line;
    ``gpu_form``: widened heads and the varlen stand-in instead of the CPU's bias grid."""
    if gpu_form:
        with varlen_stand_in():
            return breakdown(backbone, model, policy, pixels)
    prefix = backbone.num_prefix_tokens(model)
    blocks = backbone.blocks(model)
    merging = [layer for layer in range(1, len(blocks)) if policy.merges_at(layer)]
    with torch.inference_mode():
        x = backbone.embed(model, pixels)
        run_capacity_blocks(x, blocks, policy, prefix, static=True)  # folds the weights once, if widened
    recorder = _Recorder()
    with torch.inference_mode(), recorder:
        run_capacity_blocks(x, blocks, policy, prefix, static=True)
    ops = recorder.ops
    # Per merging block: every non-first block of the static loop runs the same sequence, the first
    # one (dense, views only) and the final stack are left out by counting the whole loop minus them.
    first = MergePolicy(thresholds=[policy.threshold(0)] + [float("inf")] * (len(blocks) - 1))
    recorder = _Recorder()
    with torch.inference_mode(), recorder:
        run_capacity_blocks(x, blocks[:1], first, prefix, static=True)
    ops = ops[len(recorder.ops) - 1 : -1]  # drop block 0 and the final stack of counts
    per_block = len(ops) / len(merging)
    by_purpose = Counter(_purpose(*op) for op in ops)
    by_line = Counter((name, line, op) for op, _, name, line in ops)
    form = "widened heads, varlen stand-in" if encoder.varlen_available(x.device, x.dtype) else "CPU bias grid"
    lines = [
        f"## one merging block, static path, {form} ({len(merging)} merging blocks after the first, "
        f"batch {pixels.shape[0]}): {per_block:.1f} non-view ops per block",
        "",
        "| purpose | ops per merging block |",
        "|---|---|",
    ]
    lines += [f"| {purpose} | {count / len(merging):g} |" for purpose, count in sorted(by_purpose.items())]
    lines += ["", "| function:line | op | per block |", "|---|---|---|"]
    lines += [
        f"| {name}:{line} | {op} | {count / len(merging):g} |" for (name, line, op), count in sorted(by_line.items())
    ]
    return lines


# A line of Inductor's wrapper code that runs a kernel: a fused loop nest (C++ on a CPU, Triton on a
# GPU), an extern kernel (GEMM, attention) or an aten fallback.
_KERNEL_CALL = re.compile(
    r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|(?:torch\.ops\.)?aten\.\w+)"
)


def compiled_kernels(backbone, model, policy: MergePolicy, pixels: torch.Tensor) -> list[str]:
    """Markdown: the graphs ``compile_blocks=True`` compiles for the static block loop, and the kernel
    calls in each (from Inductor's generated wrapper code). The dispatcher counters cannot see inside
    a compiled graph, so this is the compiled path's op count. On a CPU Inductor writes C++ loop
    nests, which it splits differently from a GPU's Triton kernels: a proxy, like the eager count."""
    from torch._inductor.utils import run_and_get_code

    prefix = backbone.num_prefix_tokens(model)
    torch._dynamo.reset()
    encoder.compiled_block_steps.cache_clear()
    with torch.inference_mode():
        x = backbone.embed(model, pixels)
        _, codes = run_and_get_code(
            run_capacity_blocks, x, backbone.blocks(model), policy, prefix, static=True, compile_blocks=True
        )
    lines = [
        f"## compiled blocks (compile_blocks=True), static path, batch {pixels.shape[0]}: "
        f"{len(codes)} graphs for all {backbone.num_layers(model)} blocks",
        "",
        "| graph (in order of compilation) | kernel calls | of which extern / aten |",
        "|---|---|---|",
    ]
    latest = {}  # role -> kernel calls of the graph compiled last for it (the later blocks' graphs)
    for number, code in enumerate(codes):
        body = code[code.index("def call(") :].split("\ndef ", 1)[0]
        calls = [m.group(1) for line in body.splitlines() if (m := _KERNEL_CALL.match(line))]
        extern = sum(not c.startswith(("cpp_fused", "triton_")) for c in calls)
        names = ", ".join(sorted({c.split(".")[-1] for c in calls if not c.startswith(("cpp_fused", "triton_"))}))
        role = _graph_role(code)
        latest[role] = len(calls)
        lines.append(f"| {number}: {role} | {len(calls)} | {extern} ({names}) |")
    steps = ("attention half + matching", "merge step", "MLP half")
    if all(role in latest for role in steps):
        per_block = sum(latest[role] for role in steps) + 1  # + the policy's decision, eager
        lines += ["", f"A merging block after the first: **{per_block}** kernel calls (its three graphs, plus the "]
        lines[-1] += "policy's decision, one eager op)."
    return lines


def _graph_role(code: str) -> str:
    """Which step a graph compiles, from the ops it contains."""
    if "index_add" in code:
        return "merge step"
    if "gelu" in code:
        return "MLP half"
    return "attention half + matching" if "max" in code else "attention half"


# A variant runs on pixels and returns how many late reads of counts it made.
Forward = Callable[[torch.Tensor], int]


def measure(forward: Forward, pixels: torch.Tensor) -> tuple[Counts, int]:
    counts = Counts()
    with counting(counts):
        late = forward(pixels)
    return counts, late


def _variants(backbone, model, policy: MergePolicy) -> dict[str, tuple[Forward, Forward | None]]:
    """Each variant's whole forward and (for the capacity engine) its block loop alone."""
    prefix = backbone.num_prefix_tokens(model)

    def stock(pixels):
        backbone.stock_features(model, pixels)
        return 0

    def padded(pixels):
        run_blocks_padded(backbone.embed(model, pixels), backbone.blocks(model), policy, prefix, model.norm)
        return 0

    def engine(path, make_reader, whole):
        def forward(pixels):
            reader = make_reader() if path == "dynamic" else None
            x, blocks = backbone.embed(model, pixels), backbone.blocks(model)
            if whole:
                run_blocks(x, blocks, policy, prefix, model.norm, path=path, counts_reader=reader)
            else:
                run_capacity_blocks(x, blocks, policy, prefix, static=path == "static", counts_reader=reader)
            return 0 if reader is None else reader.reads

        return forward

    def on_gpu_form(forward):
        def run(pixels):
            with varlen_stand_in():
                return forward(pixels)

        return run

    variants = {"stock": (stock, None), "DToMe, padded engine (before)": (padded, None)}
    for name, path, make_reader in (
        ("dynamic, counts at once (CPU)", "dynamic", LaggedCounts),
        ("dynamic, counts one merge late", "dynamic", one_merge_late),
        ("static", "static", None),
    ):
        variants[f"DToMe, {name}"] = (engine(path, make_reader, True), engine(path, make_reader, False))
    for name, path, make_reader in (("dynamic, one merge late", "dynamic", one_merge_late), ("static", "static", None)):
        whole, loop = engine(path, make_reader, True), engine(path, make_reader, False)
        variants[f"DToMe, {name}, GPU form (widened heads, varlen stand-in)"] = (on_gpu_form(whole), on_gpu_form(loop))
    return variants


def one_merge_late() -> LaggedCounts:
    """A reader whose copies finish one merge after they start: how a GPU that the host runs ahead
    of delivers counts (the CPU's own reader has them at once)."""
    reader = LaggedCounts()
    reader.ready = lambda request: reader.requests - request > 1
    return reader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_proxies"))
    parser.add_argument("--breakdown", action="store_true", help="also list the ops of a merging block")
    parser.add_argument(
        "--compiled", action="store_true", help="also count the kernels of compile_blocks=True (compiles: minutes)"
    )
    args = parser.parse_args(argv)

    backbone = get_backbone("timm_vit")
    torch.manual_seed(0)
    model = backbone.build({"model_name": args.model})
    layers = backbone.num_layers(model)
    prefix = backbone.num_prefix_tokens(model)
    largest = max(args.batch)
    pixels_all = backbone.preprocess(model, photos(2 * largest))
    full = backbone.embed(model, pixels_all[:1]).shape[1]
    r = round((1 - BUDGET) * (full - prefix) / layers)
    with torch.inference_mode():
        thresholds = batch_thresholds(backbone, model, pixels_all[: max(largest, 20)], r)
    policy = MergePolicy(thresholds=thresholds)
    merging_layers = sum(policy.merges_at(layer) for layer in range(layers))

    lines = [
        f"# engine proxies: timm {args.model} (random weights, {layers} layers, {full} tokens), "
        f"DToMe {round(BUDGET * 100)}% (r={r}, {merging_layers} merging layers), torch {torch.__version__}",
        f"# command: python {' '.join(sys.argv)}",
        "",
        "| batch | variant | host syncs (blocks) | host syncs (forward) | late reads | non-view aten ops "
        "| ops vs stock | capturable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    forwards = _variants(backbone, model, policy)
    for batch in args.batch:
        first, second = pixels_all[:batch], pixels_all[largest : largest + batch]  # other photos
        stock_ops = None
        with torch.inference_mode():
            for variant, (forward, loop) in forwards.items():
                forward(first)  # uncounted: the widened variants fold the projection weights once
                whole, late = measure(forward, first)
                again, _ = measure(forward, second)
                capturable = whole.syncs == 0 and whole.trace == again.trace
                loop_syncs = "-"
                if loop is not None:  # the block loop alone, without building the host-sized output
                    a, b = measure(loop, first)[0], measure(loop, second)[0]
                    loop_syncs, capturable = str(a.syncs), a.syncs == 0 and a.trace == b.trace
                stock_ops = stock_ops or whole.ops
                row = (
                    f"| {batch} | {variant} | {loop_syncs} | {whole.syncs} | {late} | {whole.ops} "
                    f"| {whole.ops / stock_ops:.2f}x | {'yes' if capturable else 'no'} |"
                )
                lines.append(row)
                print(row, flush=True)
    if args.breakdown:
        for batch in args.batch:
            for gpu_form in (False, True):
                table = breakdown(backbone, model, policy, pixels_all[:batch], gpu_form)
                print("\n".join(["", *table]), flush=True)
                lines += ["", *table]
    if args.compiled:
        table = compiled_kernels(backbone, model, policy, pixels_all[: min(args.batch)])
        print("\n".join(["", *table]), flush=True)
        lines += ["", *table]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
