"""The small LLaVA's next-token fidelity study (issue 5): KL against hand-computed values, matched
ToMe counts, and the results-page section."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dymu_lightning.eval.next_token import kl_from_reference, study
from dymu_lightning.eval.page import Collected, NextTokenStudy, _next_token_section
from dymu_lightning.eval.schema import NextTokenMetrics


def test_kl_matches_hand_computed_values():
    reference = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).log()
    other = torch.tensor([[0.9, 0.1], [0.25, 0.75]]).log() + 3.0  # logits: an offset changes nothing
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    torch.testing.assert_close(kl_from_reference(reference, other), torch.tensor([expected, 0.0], dtype=torch.float64))


@pytest.mark.slow
def test_study_on_the_small_llava(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    from dymu_lightning.assets import fetch as assets
    from dymu_lightning.assets.paths import small_llava_dir, small_llava_tower_dir
    from dymu_lightning.backbones import get_backbone
    from dymu_lightning.backbones.thresholds import ThresholdsFile, batch_thresholds

    photos = assets.sample_images()
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "page", "moon"):
        Image.open(photos[name]).convert("RGB").save(folder / f"{name}.png")
    backbone = get_backbone("hf_dinov2")
    tower = backbone.load(small_llava_tower_dir())
    pixels = AutoProcessor.from_pretrained(small_llava_dir()).image_processor(
        [Image.open(p) for p in sorted(folder.iterdir())], return_tensors="pt"
    )["pixel_values"]
    found = batch_thresholds(backbone, tower, pixels, r=[35] * 11 + [0])
    path = ThresholdsFile(
        "hf_dinov2", 12, 336, found, [35] * 11 + [0], {"kind": "constant"}, 4, 4, 1, {}, num_blocks=11
    ).save(tmp_path / "thresholds.json")

    metrics = study({"mid": path}, images=str(folder), max_images=4, batch_size=2)
    variants = metrics.variants
    assert metrics.images == 4 and list(variants) == [
        "DyMU-mid + VTU",
        "DyMU-mid, no VTU",
        "ToMe at DyMU-mid's count + VTU",
    ]
    dymu, tome = variants["DyMU-mid + VTU"], variants["ToMe at DyMU-mid's count + VTU"]
    assert variants["DyMU-mid, no VTU"].visual_rows_mean == dymu.visual_rows_mean
    assert abs(tome.visual_rows_mean - dymu.visual_rows_mean) <= 1.0  # matched counts
    assert all(e.kl_mean > 0 and 0 <= e.top1_agreement <= 1 for e in variants.values())
    assert len(metrics.per_image["DyMU-mid + VTU"]["kl"]) == 4
    # What is written reads back as the same study (the results page reads it so).
    assert NextTokenMetrics.load(metrics.save(tmp_path / "metrics.json")).to_json() == metrics.to_json()

    section = _next_token_section(Collected([], {}, {}, NextTokenStudy("python -m ...", metrics)))
    assert "## Next-token fidelity (small LLaVA)" in section
    assert f"| DyMU-mid + VTU | {dymu.visual_rows_mean:.1f} | {dymu.kl_mean:.4f}" in section
    assert Path(path).is_file()


def test_the_section_names_the_projector_the_study_ran_with(tmp_path):
    from dymu_lightning.eval.next_token import aligned_projector
    from dymu_lightning.eval.schema import NextTokenVariant

    assert aligned_projector(tmp_path) is None  # no dymu_alignment.json: the untrained projector
    record = '{"command": "python -m dymu_lightning align_small_llava", "seed": 0}'
    (tmp_path / "dymu_alignment.json").write_text(record)
    projector = aligned_projector(tmp_path)
    assert projector == "`python -m dymu_lightning align_small_llava`, seed 0"
    variant = NextTokenVariant(kl_mean=0.1, kl_std=0.0, kl_median=0.1, top1_agreement=1.0, visual_rows_mean=10.0)
    metrics = NextTokenMetrics(4, "assets:mvtb", "<image>\nHi.", {}, {}, {"DyMU-mid + VTU": variant}, {}, 1.0)
    untrained = _next_token_section(Collected([], {}, {}, NextTokenStudy("c", metrics)))
    assert "untrained projector" in untrained and "aligned" not in untrained
    metrics.projector = projector
    aligned = _next_token_section(Collected([], {}, {}, NextTokenStudy("c", metrics)))
    assert f"projector aligned by {projector}" in aligned and "untrained" not in aligned
    assert "projector" not in NextTokenMetrics.from_json({**metrics.to_json(), "projector": None}).to_json()
