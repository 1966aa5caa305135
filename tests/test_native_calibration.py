"""Calibration of the Qwen-VL towers on images at native resolution (``data.crops=native``): each
shard image resized by the tower's own rule, images of different cell counts packed in one batch,
every image's edges ranked together over all processes; what thresholds.json records of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from PIL import Image
from tests_support import VISION

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.config import load_recipe
from dymu_lightning.config.recipes import ConfigError
from dymu_lightning.core import LayerMerges, MergePolicy
from dymu_lightning.data import write_shards
from dymu_lightning.data.native import GlobalBatchNative
from dymu_lightning.lit.run import calibrate, check
from dymu_lightning.loading import load_encoder
from dymu_lightning.merges import native_token_groups

# (height, width) in px: the tiny tower's cells are 8 px (patch 4 x merge 2); with the bounds below
# they resize to 40 x 72, 80 x 40, 64 x 64, 32 x 96, 24 x 24 (grown to min_pixels) and 64 x 56 px.
SIZES = ((40, 70), (90, 50), (64, 64), (33, 100), (10, 10), (200, 170))
BOUNDS = {"min_pixels": 512, "max_pixels": 4096}  # 8 to 64 cells
GLOBAL_BATCH = 4  # 2 steps, the second half padding


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> SimpleNamespace:
    """Shards of six PNG images of different sizes, smooth and noisy in turn."""
    root = tmp_path_factory.mktemp("native")
    generator = torch.Generator().manual_seed(0)
    (root / "images").mkdir()
    paths = []
    for i, (height, width) in enumerate(SIZES):
        if i % 2 == 0:
            coarse = torch.rand(1, 3, 3, 3, generator=generator)
            image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
        else:
            image = torch.rand(3, height, width, generator=generator)
        paths.append(root / "images" / f"img{i}.png")  # PNG: lossless, so the shards hold these pixels
        Image.fromarray((image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(paths[-1])
    write_shards(paths, root / "shards", shard_size=4)
    return SimpleNamespace(root=root, shards=root / "shards", photos=[Image.open(p).convert("RGB") for p in paths])


def recipe(setting, folder: Path, backbone: str = "hf_qwen2_vl", **data) -> Path:
    if backbone.startswith("hf_qwen"):
        arch = dict(get_backbone(backbone).tiny_configs()[0].config)
        arch.pop("img_size")
        model = {"backbone": backbone, "random_init": True, "arch": arch, "image_size": 64}
    else:
        model = {"backbone": backbone, "random_init": True, "arch": VISION}
    body = {
        "task": "calibrate",
        "out_dir": str(folder / "out"),
        "model": model,
        "data": {"shards": str(setting.shards), "global_batch_size": GLOBAL_BATCH, **data},
        "schedule": {"r": 2},
        "trainer": {"accelerator": "cpu", "progress_bar": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r.yaml").write_text(yaml.safe_dump(body))
    return folder / "r.yaml"


NATIVE = ["data.crops=native", f"data.min_pixels={BOUNDS['min_pixels']}", f"data.max_pixels={BOUNDS['max_pixels']}"]


def naive_thresholds(backbone, model, images: list[torch.Tensor], r: list[int]) -> list[float]:
    """Per global batch of GLOBAL_BATCH images in order: one packed forward in which every layer
    merges the best (images x r) edges of all its images; the mean over batches of each layer's cut."""
    sums = torch.zeros(len(r), dtype=torch.float64)
    batches = [images[i : i + GLOBAL_BATCH] for i in range(0, len(images), GLOBAL_BATCH)]
    for batch in batches:

        def record(merges: LayerMerges) -> None:
            sums[merges.layer] += float(merges.batch_threshold)

        with torch.no_grad():
            backbone.merged_forward_images(model, batch, MergePolicy(mode="batch_topk", r=r, on_layer=record))
    return (sums / len(batches)).tolist()


def test_batches_hold_each_image_at_its_native_size(setting):
    """Rows keep their sizes (the tower's rule, as preprocess_native), ranks split each global batch,
    padding rows are invalid."""
    backbone = get_backbone("hf_qwen2_vl")
    model = backbone.build(backbone.tiny_configs()[0].config)
    transform = lambda image: backbone.preprocess_native(model, [image], **BOUNDS)[0]  # noqa: E731
    expected = backbone.preprocess_native(model, setting.photos, **BOUNDS)
    assert [tuple(x.shape[1:]) for x in expected] == [(40, 72), (80, 40), (64, 64), (32, 96), (24, 24), (64, 56)]
    ranks = [
        list(GlobalBatchNative(setting.shards, 4, transform=transform, dummy_shape=(3, 16, 16), rank=r, world_size=2))
        for r in (0, 1)
    ]
    rows = [image for step in zip(*ranks, strict=True) for local in step for image in local["pixels"]]
    valid = torch.cat([local["valid"] for step in zip(*ranks, strict=True) for local in step])
    assert valid.tolist() == [True] * 6 + [False] * 2
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(rows, expected, strict=False))
    assert [tuple(x.shape) for x in rows[6:]] == [(3, 16, 16)] * 2


@pytest.mark.parametrize("name", ["hf_qwen2_vl", "hf_qwen2_5_vl"])
def test_native_calibration_equals_a_naive_reference_and_records_its_inputs(setting, tmp_path, name):
    """The thresholds are those of a naive in-process ranking over the same images (the padding rows
    of the last batch change nothing; Qwen2.5-VL: windows cut at each image's own size);
    thresholds.json records the inputs, the kept tokens of each image and each image's own full count."""
    path = recipe(setting, tmp_path, backbone=name)
    result = ThresholdsFile.load(calibrate(load_recipe(path, NATIVE)))
    assert result.inputs == {"kind": "native", **BOUNDS}
    L.seed_everything(0, verbose=False)  # the model the run built (seed 0, random init)
    backbone, model, _ = load_encoder(load_recipe(path, NATIVE).to_object().model)
    images = backbone.preprocess_native(model, setting.photos, **BOUNDS)
    assert result.thresholds == pytest.approx(naive_thresholds(backbone, model, images, result.r), abs=1e-6)
    cells = [x.shape[1] * x.shape[2] // 64 for x in images]  # 45, 50, 64, 48, 9, 56
    full = result.extra["full_tokens"]
    assert full["images"] == result.tokens["images"] == result.images_seen == 6
    assert (full["min"], full["max"], full["mean"]) == (min(cells), max(cells), pytest.approx(sum(cells) / 6))
    assert result.tokens["full"] == BOUNDS["max_pixels"] // 64  # the most cells an image can have
    assert result.tokens["mean"] == pytest.approx(sum(cells) / 6 - 2 * len(result.r))  # r=2 per image and layer
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"of {sum(cells) / 6:.1f} on average before merging (min 9, max 64: images at their native sizes)" in report
    assert ThresholdsFile.load(result.save(tmp_path / "again.json")) == result
    assert "![what merged](merges.png)" in report and (tmp_path / "out" / "merges.png").stat().st_size > 1000


def test_native_groups_are_each_images_cells_in_its_own_grid(setting):
    """The panel's group maps: one ``[h, w]`` map per image in its own cell grid, numbering exactly
    the image's output tokens, and equal to the tower's group map cell by cell."""
    backbone = get_backbone("hf_qwen2_5_vl")
    model = backbone.build(backbone.tiny_configs()[0].config)
    images = backbone.preprocess_native(model, setting.photos, **BOUNDS)
    policy = MergePolicy(mode="batch_topk", r=[3] * backbone.num_layers(model))
    groups, lengths = native_token_groups(backbone, model, images, policy)
    assert [tuple(g.shape) for g in groups] == [(5, 9), (10, 5), (8, 8), (4, 12), (3, 3), (8, 7)]
    for group, length in zip(groups, lengths.tolist(), strict=True):
        assert sorted(group.unique().tolist()) == list(range(length))  # every output token holds a cell
    with torch.no_grad():
        out = backbone.merged_forward_images(model, images, policy)
    assert all(torch.equal(g.flatten(), out.group[i, : g.numel()]) for i, g in enumerate(groups))
    assert lengths.tolist() == out.lengths.tolist() and min(lengths) < max(lengths)


@pytest.mark.distributed
def test_two_processes_give_the_thresholds_of_one(setting, tmp_path):
    """Real Lightning DDP (gloo), two processes each holding part of every global batch: the same
    thresholds and token counts as one process."""
    single = ThresholdsFile.load(calibrate(load_recipe(recipe(setting, tmp_path / "one"), NATIVE)))
    path = recipe(setting, tmp_path / "two")
    command = [sys.executable, "-m", "dymu_lightning", f"recipe={path}", *NATIVE, "trainer.devices=2",
               "trainer.strategy=ddp"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "images at native size, world size 2" in completed.stdout
    two = json.loads((tmp_path / "two" / "out" / "thresholds.json").read_text())
    assert two["world_size"] == 2 and two["images_seen"] == 6
    assert two["thresholds"] == pytest.approx(single.thresholds, abs=1e-6)
    assert two["tokens"] == single.tokens and two["extra"]["full_tokens"] == single.extra["full_tokens"]
    assert two["extra"]["index_sum"] == sum(range(6))


def test_recipe_errors(setting, tmp_path):
    path = recipe(setting, tmp_path / "siglip", backbone="hf_siglip")
    with pytest.raises(ConfigError, match=r"data.crops=native needs a backbone that takes images at their native"):
        calibrate(load_recipe(path, ["data.crops=native"]))
    with pytest.raises(ConfigError, match=r"data.min_pixels=512 is read only with data.crops=native"):
        check(load_recipe(path, ["data.min_pixels=512"]))
    with pytest.raises(ConfigError, match=r"data.min_pixels=9000 is above data.max_pixels=4096"):
        check(load_recipe(path, [*NATIVE, "data.min_pixels=9000"]))
    with pytest.raises(ConfigError, match=r"with data.crops=native \(images of different sizes\) set schedule.r"):
        check(load_recipe(path, [*NATIVE, "schedule.r=null", "schedule.tokens_left=20"]))


def test_apply_dymu_on_a_qwen_checks_the_inputs_calibrated_on(tmp_path):
    """A Qwen2-VL takes thresholds of native sizes silently, warns for square images, refuses AnyRes
    crops; a LLaVA-NeXT refuses native sizes (check_inputs)."""
    import warnings

    from test_qwen_vl_lm import build

    from dymu_lightning.backbones.hf_llava import apply_dymu, is_dymu, remove_dymu

    model = build()
    layers = len(model.model.visual.blocks)
    fields = {
        "backbone": "hf_qwen2_vl",
        "num_layers": layers,
        "image_size": 448,
        "thresholds": [0.5] * layers,
        "r": [2] * layers,
        "schedule": {"kind": "constant"},
        "images_seen": 4,
        "global_batch_size": 4,
        "world_size": 1,
        "tokens": {},
    }
    native = ThresholdsFile(**fields, inputs={"kind": "native", **BOUNDS})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_dymu(model, native.save(tmp_path / "native.json"))
    remove_dymu(model)
    with pytest.warns(UserWarning, match=r"square.json: calibrated on square images of 448 px, not at the native"):
        apply_dymu(model, ThresholdsFile(**fields).save(tmp_path / "square.json"))
    remove_dymu(model)
    crops = {"kind": "anyres_crops", "processor": "p", "crop_size": 32, "image_grid_pinpoints": [[32, 32]]}
    with pytest.raises(ValueError, match=r"calibrated on AnyRes crops, but this Qwen2VLForConditionalGeneration"):
        apply_dymu(model, ThresholdsFile(**fields, inputs=crops))
    assert not is_dymu(model)
    with pytest.raises(ValueError, match=r"calibrated on images at their native sizes, but this LlavaNext feeds"):
        native.check_inputs("LlavaNext", 32, [[32, 32]])


def test_a_resumed_native_run_equals_an_uninterrupted_one(setting, tmp_path):
    """Stopped after its first global step (trainer.max_steps=1), then rerun: the same thresholds and
    the same statistics, each image's full count included (saved in the state)."""
    whole = ThresholdsFile.load(calibrate(load_recipe(recipe(setting, tmp_path / "whole"), NATIVE)))
    path = recipe(setting, tmp_path / "parts")
    first = ThresholdsFile.load(calibrate(load_recipe(path, [*NATIVE, "trainer.max_steps=1"])))
    assert first.partial and first.extra["full_tokens"]["images"] == 4
    resumed = ThresholdsFile.load(calibrate(load_recipe(path, NATIVE)))
    assert not resumed.partial and resumed.thresholds == pytest.approx(whole.thresholds, abs=1e-12)
    assert resumed.tokens == whole.tokens and resumed.extra["full_tokens"] == whole.extra["full_tokens"]


def test_the_merges_command_draws_native_thresholds_at_each_images_size(setting, tmp_path, capsys):
    """`dymu merges` on native thresholds sizes each image by the tower's rule within the recorded
    bounds, and prints each image's token count: those of the tower on the same images."""
    from dymu_lightning.cli import main

    backbone = get_backbone("hf_qwen2_vl")
    model = backbone.build(backbone.tiny_configs()[0].config)
    model.save_pretrained(tmp_path / "tower")
    images = backbone.preprocess_native(model, setting.photos, **BOUNDS)
    layers = backbone.num_layers(model)
    found = naive_thresholds(backbone, model, images, [2] * layers)
    path = ThresholdsFile(
        "hf_qwen2_vl", layers, 64, found, [2] * layers, {"kind": "constant"}, 6, GLOBAL_BATCH, 1, {},
        source=str(tmp_path / "tower"), inputs={"kind": "native", **BOUNDS},
    ).save(tmp_path / "thresholds.json")  # fmt: skip
    out = tmp_path / "merges.png"
    assert main(["merges", str(path), "--images", str(setting.root / "images"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"wrote {out}" and out.stat().st_size > 1000
    _, lengths = native_token_groups(backbone, model, images, ThresholdsFile.load(path).policy())
    assert printed[:-1] == [f"img{i}.png: {n} tokens" for i, n in enumerate(lengths.tolist())]
