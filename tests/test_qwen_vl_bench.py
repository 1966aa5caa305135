"""benchmarks/qwen_vl_prefill.py: the model it builds, the prompts it makes and its FLOPs count.

Timing is never asserted. The 7B geometry is checked on the meta device (no memory); the FLOPs count
against torch's own counter on the stock tower (eager attention, so that the products are counted).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dymu_lightning.backbones import get_backbone
from dymu_lightning.core import MergePolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import qwen_vl_prefill  # noqa: E402
from qwen_vl_prefill import GEOMETRIES, IMAGE, TEXT, build, prompts, tower_flops  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = [(112, 168), (56, 112)]  # 24 and 8 cells; windows of 112 px: 2 and 1 windows


@cache
def tiny():
    return build(GEOMETRIES["tiny"], torch.device("cpu"), torch.float32)


def test_the_7b_geometry_is_qwen2_5_vl_7b_and_is_built_where_asked():
    model = build(GEOMETRIES["qwen2.5-vl-7b"], torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656  # Qwen/Qwen2.5-VL-7B-Instruct
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}


def test_prompts_are_left_padded_with_one_image_placeholder_per_cell():
    inputs = prompts(tiny(), SIZES, 3)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 12], [1, 4, 8], [1, 8, 12]]
    assert (inputs["input_ids"] == IMAGE).sum(1).tolist() == [24, 8, 24]
    assert inputs["attention_mask"].sum(1).tolist() == [TEXT + 24, TEXT + 8, TEXT + 24]
    assert inputs["attention_mask"][1, : 24 - 8].sum() == 0  # left padding
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == IMAGE).int())


def test_tower_flops_count_what_torch_counts_on_the_stock_tower_and_shrink_with_merges():
    model = build(GEOMETRIES["tiny"], torch.device("cpu"), torch.float32)  # its own: attention goes eager
    tower = model.model.visual
    inputs = prompts(model, SIZES, 2)
    patches, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    tower.config._attn_implementation = "eager"
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tower(hidden_states=patches, grid_thw=grid)
    counts = counter.get_flop_counts()["Global"]
    counted = counter.get_total_flops() - counts[torch.ops.aten.convolution]  # all but the patch embedding
    cells = (grid.prod(1) // 4)[:, None].expand(-1, tower.config.depth + 1)
    assert tower_flops(tower, grid, cells) == counted
    with torch.no_grad():
        merged = get_backbone("hf_qwen2_5_vl").merged_forward_patches(
            tower, patches, grid, MergePolicy(mode="fixed_r", r=1)
        )
    assert merged.tokens_per_layer[:, -1].tolist() == [24 - 8, 8 - 8 + 1]  # r = 1 a block, 8 blocks
    assert tower_flops(tower, grid, merged.tokens_per_layer) < counted


def test_the_cpu_run_writes_its_table(tmp_path):
    qwen_vl_prefill.main(["--batch", "1", "--repeats", "1", "--sizes", "56x112", "--out", str(tmp_path / "q")])
    lines = (tmp_path / "q.md").read_text().splitlines()
    assert "r = 1 cells a block" in lines[2]  # keep 0.33 of 8 cells over 8 blocks
    assert lines[-1].startswith("| 1 | 8 -> 1 |") and lines[-1].count("|") == 11  # r = 1 in each of 8 blocks
