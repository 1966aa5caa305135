"""benchmarks/llava_generate.py --model llava15-7b: the model it builds and the inputs it makes.

Timing is never asserted. The full-size model is checked on the meta device (no memory), the
generation itself with ``--tiny``, the same structure shrunk.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from dymu_lightning.backbones.hf_llava import apply_dymu
from dymu_lightning.core import MergePolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llava_generate  # noqa: E402
from llava_generate import IMAGE_TOKEN, dymu_mid_r, llava15_config, llava15_prompts, random_llava  # noqa: E402


def test_llava15_7b_has_llava_1_5_7b_geometry_and_is_built_where_asked():
    model = random_llava(llava15_config(), torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    r = dymu_mid_r(model)
    # 23 blocks read (features of hidden_states[-2]); 577 - 381 = 196 tokens: 195 patches and the CLS
    assert len(r) == 24 and r[-1] == 0 and all(x > 0 for x in r[:-1])
    assert sum(r) == 577 - 196


def test_prompts_are_left_padded_around_one_image_each():
    prompts = llava15_prompts(5, patches=576)
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    assert ids.shape == (5, 4 + 576 + 36)
    assert (ids == IMAGE_TOKEN).sum(1).tolist() == [576] * 5
    assert mask.sum(1).tolist() == [616, 615, 614, 613, 616]
    assert (mask.cumsum(1)[:, :3] == 0).any()  # padding on the left
    assert (ids[:, -1] != IMAGE_TOKEN).all() and mask[:, -1].all()


def test_tiny_llava15_with_dymu_at_infinite_thresholds_generates_the_stock_tokens():
    model = random_llava(llava15_config(tiny=True), torch.device("cpu"), torch.float64)
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    batch = {**llava15_prompts(3, patches), "pixel_values": torch.randn(3, 3, 112, 112, dtype=torch.float64)}
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.inference_mode():
        stock = model.generate(**batch, **kwargs)
        assert stock.shape[1] == batch["input_ids"].shape[1] + 4
        for cache in ("compact", "expanded"):
            apply_dymu(model, MergePolicy(thresholds=[math.inf] * vision.num_hidden_layers), cache=cache)
            assert torch.equal(model.generate(**batch, **kwargs), stock), cache


@pytest.mark.slow  # the bundled photos (make assets)
def test_tiny_run_reports_every_variant(tmp_path):
    out = tmp_path / "llava"
    argv = ["--model", "llava15-7b", "--tiny", "--batch", "1", "2", "--repeats", "1", "--new-tokens", "2"]
    assert llava_generate.main([*argv, "--out", str(out)]) == 0
    report = out.with_suffix(".md").read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 1 |")]
    assert [row[1] for row in rows] == ["stock", "compact", "expanded"]
    # peak memory against the stock model's, and the decode per-token ratio, for every variant
    assert rows[0][11] == "1.000x" and rows[0][12] == "+0.0 MiB |"
    assert all(float(row[11].rstrip("x")) > 0 and float(row[7].rstrip("x")) > 0 for row in rows)
    # the language model's rows are packed: never more than padding every prompt to the busiest
    packed = re.findall(r"batch (\d+): the language model runs (\d+) packed rows; .* = (\d+)", report)
    assert [int(b) for b, _, _ in packed] == [1, 2] and all(int(t) <= int(p) for _, t, p in packed)
    # issue 12's targets, for the batches measured (batch 16 and 64 are not: no line for them)
    targets = re.findall(r"- target: (\w+) <= ([\d.]+)x stock at batch (\d+): .* \((met|NOT met)\)", report)
    assert [(what, batch) for what, _, batch, _ in targets] == [("prefill", "1"), ("peak", "1"), ("peak", "2")]


@pytest.mark.slow  # the real DINOv2-S weights and the bundled photos (make assets)
def test_tiny_dinov2s_run_feeds_the_language_model_the_real_towers_counts(tmp_path):
    out = tmp_path / "llava"
    argv = ["--model", "dinov2s-7b", "--tiny", "--batch", "2", "--repeats", "1", "--new-tokens", "2"]
    assert llava_generate.main([*argv, "--out", str(out)]) == 0
    report = out.with_suffix(".md").read_text()
    assert "REAL DINOv2-S tower at 336 px (576 patches" in report
    rows = {line.split(" | ")[1]: line.split(" | ") for line in report.splitlines() if line.startswith("| 2 |")}
    assert list(rows) == ["stock", "compact", "expanded"]
    assert rows["stock"][2] == "576.0"
    # Both caches run the same tower on the same photos: the same rows, fewer than the placeholders.
    assert rows["compact"][2] == rows["expanded"][2] and float(rows["compact"][2]) < 576
