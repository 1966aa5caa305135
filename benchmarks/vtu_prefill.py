"""Prefill time of SmolLM2-135M with VTU, against the full sequence and against the same rows without
VTU; and the bytes of the expanded and the compact KV cache.

The real SmolLM2-135M-Instruct (30 layers, hidden 576, 9 query / 3 key-value heads, RoPE theta 1e5)
when `make assets` has materialised it, else random weights of its architecture (`--weights random`;
timing does not depend on the weights). The sequence is 64 text positions followed by 576 visual
positions (LLaVA-1.5's grid); DToMe leaves `--rows` visual rows (195 ≈ DyMU-mid), grouped at random.
All variants run interleaved in one process.

    python benchmarks/vtu_prefill.py                  # batch 1 and 4, CPU, float32
    python benchmarks/vtu_prefill.py --batch 1 16 --device cuda --dtype bfloat16
    python benchmarks/vtu_prefill.py --geometry llama2-7b --batch 1 16 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys

import torch
from encoder_speed import add_run_arguments, machine_name, timed, write_report
from transformers import LlamaConfig, LlamaModel

from dymu_lightning.backbones.hf_llm import vtu_forward, vtu_prefill
from dymu_lightning.core.vtu import VirtualLayout

SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
}
LLAMA2_7B = {  # LLaVA-1.5-7B's language model (llava-hf/llava-1.5-7b-hf's text config)
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
GEOMETRIES = {"smollm2-135m": SMOLLM2_135M, "llama2-7b": LLAMA2_7B}


def grouped_layout(batch: int, text: int, visual: int, rows: int, seed: int = 0) -> VirtualLayout:
    """``visual`` positions after ``text`` positions, the visual ones in ``rows`` random groups."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(batch):
        groups = torch.cat([torch.arange(rows), torch.randint(0, rows, (visual - rows,), generator=generator)])
        groups = groups[torch.randperm(visual, generator=generator)]
        samples.append(torch.cat([torch.arange(text), text + groups]))
    expand = torch.stack(samples)
    positions = torch.arange(text + visual).expand(batch, -1)
    return VirtualLayout(expand, positions, torch.ones_like(expand, dtype=torch.bool), text + rows)


def language_model(weights: str, geometry: str, device: torch.device, dtype: torch.dtype) -> tuple[LlamaModel, str]:
    """The base model of the real SmolLM2-135M if asked for (or available, with "auto"), else random
    weights of the geometry; and a description of which it is. Random weights are created on
    ``device`` in ``dtype`` (7B parameters in float32 on the CPU first would be 28 GB)."""
    from dymu_lightning.assets.paths import smollm2_dir

    if geometry != "smollm2-135m":
        if weights == "smollm2":
            raise SystemExit("--weights smollm2 needs --geometry smollm2-135m")
        torch.manual_seed(0)
        with torch.device(device):
            config = LlamaConfig(**GEOMETRIES[geometry])
            return LlamaModel._from_config(config, dtype=dtype, attn_implementation="sdpa"), "random weights"

    if weights != "random" and (smollm2_dir() / "config.json").is_file():
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(smollm2_dir(), attn_implementation="sdpa").model
        return model.to(device=device, dtype=dtype), "real weights"
    if weights == "smollm2":
        raise SystemExit(f"no SmolLM2 at {smollm2_dir()}: run `make assets` first")
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(**SMOLLM2_135M, attn_implementation="sdpa"))
    return model.to(device=device, dtype=dtype), "random weights"


def prefill_flops(rows: int, positions: int, config: dict) -> float:
    """Per sequence: linear layers on the rows, attention products over the positions."""
    c, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head = c // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    linear = 2 * rows * (c * c + 2 * c * kv + c * c + 3 * c * i)
    attention = 4 * positions**2 * c
    return layers * (linear + attention)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--visual", type=int, default=576)
    parser.add_argument("--rows", type=int, default=195)
    parser.add_argument("--weights", choices=["auto", "smollm2", "random"], default="auto")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="smollm2-135m", help="llama2-7b: random")
    add_run_arguments(parser, "vtu_prefill")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, weights = language_model(args.weights, args.geometry, device, dtype)
    model = model.eval()
    geometry = GEOMETRIES[args.geometry]
    full, rows = args.text + args.visual, args.text + args.rows
    ideal = prefill_flops(rows, full, geometry) / prefill_flops(full, full, geometry)
    head = geometry["hidden_size"] // geometry["num_attention_heads"]
    kv_per_position = 2 * geometry["num_hidden_layers"] * geometry["num_key_value_heads"] * head
    element = torch.finfo(dtype).bits // 8
    lines = [
        f"# VTU prefill on {machine_name(device)}, {args.dtype}, torch {torch.__version__}",
        f"# command: python {' '.join(sys.argv)}",
        f"{args.geometry}, {weights}; {args.text} text + {args.visual} visual positions, "
        f"{args.rows} visual rows after DToMe",
        "",
        "| batch | full sequence | VTU | VTU / full | FLOPs ideal | rows without VTU | no-VTU / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in args.batch:
        layout = grouped_layout(batch, args.text, args.visual, args.rows)
        layout = VirtualLayout(
            *(t.to(device) for t in (layout.expand, layout.positions, layout.valid)), layout.num_rows
        )
        full_embeds = torch.randn(batch, full, geometry["hidden_size"], device=device, dtype=dtype)
        row_embeds = full_embeds[:, :rows]
        with torch.inference_mode():
            seconds = timed(
                {
                    "full": lambda e=full_embeds: model(inputs_embeds=e),
                    "vtu": lambda e=row_embeds, lay=layout: vtu_forward(model, e, lay),
                    "rows": lambda e=row_embeds: model(inputs_embeds=e),
                },
                args.repeats,
                device,
            )
        lines.append(
            f"| {batch} | {seconds['full'] * 1e3:.0f} ms | {seconds['vtu'] * 1e3:.0f} ms | "
            f"{seconds['vtu'] / seconds['full']:.2f}x | {ideal:.2f}x | {seconds['rows'] * 1e3:.0f} ms | "
            f"{seconds['rows'] / seconds['full']:.2f}x |"
        )
        print(lines[-1], flush=True)
        with torch.inference_mode():
            _, expanded = vtu_prefill(model, row_embeds, layout, cache="expanded")
            _, compact = vtu_prefill(model, row_embeds, layout, cache="compact")
        expanded_bytes = sum(
            t.numel() * t.element_size() for layer in expanded.layers for t in (layer.keys, layer.values)
        )
        assert expanded_bytes == batch * full * kv_per_position * element
        lines.append(
            f"|  | KV cache (measured): expanded {expanded_bytes / 2**20:.1f} MiB, compact "
            f"{compact.nbytes() / 2**20:.1f} MiB ({compact.nbytes() / expanded_bytes:.2f}x, layout maps included) "
            "| | | | | |"
        )
        del expanded, compact
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
