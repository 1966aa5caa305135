"""Calibration on the crops an AnyRes model's own processor makes (``data.crops=anyres``), the
``inputs`` it records in thresholds.json, and apply_dymu refusing thresholds of other inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from PIL import Image
from tests_support import VISION
from transformers import AutoImageProcessor, LlavaOnevisionImageProcessor

from dymu_lightning.backbones.hf_llava import apply_dymu
from dymu_lightning.backbones.hf_llava_next import processor_crops
from dymu_lightning.backbones.thresholds import ThresholdsFile, batch_thresholds
from dymu_lightning.config import load_recipe
from dymu_lightning.config.recipes import ConfigError
from dymu_lightning.data import write_shards
from dymu_lightning.data.crops import GlobalBatchCrops
from dymu_lightning.lit.run import calibrate, check
from dymu_lightning.loading import load_encoder

# crops of 32 px; tiles in grids of up to 2 x 3 (as tests/test_llava_anyres.py)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]
SIZES = ((40, 70), (90, 50), (64, 64))  # (height, width): base crop + 2 x 3, 3 x 2 and 2 x 2 tiles
CROPS = 7 + 7 + 5


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> SimpleNamespace:
    """A OneVision image processor saved as a model folder holds it, and shards of three PNG images."""
    root = tmp_path_factory.mktemp("anyres")
    LlavaOnevisionImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    ).save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(0)
    (root / "images").mkdir()
    paths = []
    for i, (height, width) in enumerate(SIZES):
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
        paths.append(root / "images" / f"img{i}.png")  # PNG: lossless, so the shards hold these pixels
        Image.fromarray(pixels).save(paths[-1])
    write_shards(paths, root / "shards", shard_size=2)
    processor = AutoImageProcessor.from_pretrained(root / "model")
    # crops_per_image reads only the config of the model: the tower's side and the pinpoints
    model = SimpleNamespace(
        config=SimpleNamespace(image_grid_pinpoints=PINPOINTS, vision_config=SimpleNamespace(image_size=32))
    )
    expected = processor_crops(model, processor, [Image.open(p).convert("RGB") for p in paths])
    return SimpleNamespace(root=root, processor=processor, expected=expected)


def all_rows(dataset: GlobalBatchCrops) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(dataset)
    valid = torch.cat([b["valid"] for b in batches])
    return torch.cat([b["pixels"] for b in batches])[valid], torch.cat([b["index"] for b in batches])[valid]


def test_the_crops_are_exactly_the_processors(setting):
    """Every crop the processor makes of every image, once, in image order, pixel for pixel; the
    crops counted up front from the headers are those the processor makes."""
    dataset = GlobalBatchCrops(setting.root / "shards", 4, image_processor=setting.processor)
    assert setting.expected.shape == (CROPS, 3, 32, 32)
    assert dataset.part_counts == [7, 7, 5] and dataset.num_samples == CROPS and dataset.num_steps == 5
    pixels, index = all_rows(dataset)
    assert torch.equal(pixels, setting.expected)
    assert index.tolist() == list(range(CROPS))
    assert [dataset.part_of(i) for i in (0, 6, 7, 13, 14, 18)] == [(0, 0), (0, 6), (1, 0), (1, 6), (2, 0), (2, 4)]


def test_ranks_split_each_global_batch_of_crops(setting):
    """Two ranks' local batches of a step are, together, the one-process global batch of that step."""
    one = list(GlobalBatchCrops(setting.root / "shards", 4, image_processor=setting.processor))
    ranks = [
        list(GlobalBatchCrops(setting.root / "shards", 4, image_processor=setting.processor, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 5
    for whole, first, second in zip(one, *ranks, strict=True):
        assert first["pixels"].shape[0] == second["pixels"].shape[0] == 2
        assert torch.equal(torch.cat([first["pixels"], second["pixels"]]), whole["pixels"])
        assert torch.equal(torch.cat([first["index"], second["index"]]), whole["index"])


def recipe(setting, folder: Path, **data) -> Path:
    """A random 3-block SigLIP at 32 px over the shards' AnyRes crops, all 19 in one global batch."""
    body = {
        "task": "calibrate",
        "out_dir": str(folder / "out"),
        "model": {"backbone": "hf_siglip", "random_init": True, "arch": VISION},
        "data": {"shards": str(setting.root / "shards"), "global_batch_size": 20, **data},
        "schedule": {"r": 2},
        "trainer": {"accelerator": "cpu", "progress_bar": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r.yaml").write_text(yaml.safe_dump(body))
    return folder / "r.yaml"


def test_recipe_calibrates_on_the_crops_and_records_them(setting, tmp_path):
    """`data.crops=anyres`: the thresholds are the batch top-k thresholds of the processor's crops
    (each crop an image of the ranking), and thresholds.json records the crops; the record
    round-trips, and a file without it (older) loads as whole images."""
    path = recipe(setting, tmp_path, crops="anyres", processor=str(setting.root / "model"))
    result = ThresholdsFile.load(calibrate(load_recipe(path, [])))
    assert result.inputs == {
        "kind": "anyres_crops",
        "processor": str(setting.root / "model"),
        "crop_size": 32,
        "image_grid_pinpoints": PINPOINTS,
    }
    assert result.images_seen == result.tokens["images"] == CROPS and result.tokens["full"] == 16
    assert result.extra["index_sum"] == sum(range(CROPS))
    L.seed_everything(0, verbose=False)  # the model the run built (seed 0, random init)
    backbone, model, _ = load_encoder(load_recipe(path, []).to_object().model)
    expected = batch_thresholds(backbone, model, setting.expected, r=2)
    assert result.thresholds == pytest.approx(expected, abs=1e-6)
    assert ThresholdsFile.load(result.save(tmp_path / "again.json")) == result
    data = result.to_json()
    del data["inputs"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert ThresholdsFile.load(tmp_path / "old.json").inputs is None
    data["inputs"] = {"kind": "tiles"}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: .inputs. must be null \(whole images\) or an object with the"):
        ThresholdsFile.load(tmp_path / "bad.json")


def test_recipe_errors(setting, tmp_path):
    path = recipe(setting, tmp_path)
    expected = r"data.crops='tiles'; expected one of \('whole', 'anyres', 'frames', 'native'\)"
    with pytest.raises(ConfigError, match=expected):
        check(load_recipe(path, ["data.crops=tiles"]))
    with pytest.raises(ConfigError, match=r"data.crops=anyres needs data.processor=<a LLaVA-NeXT or OneVision"):
        check(load_recipe(path, ["data.crops=anyres"]))
    with pytest.raises(ConfigError, match=r"data.processor='x' is read only with data.crops=anyres"):
        check(load_recipe(path, ["data.processor=x"]))
    overrides = ["data.crops=anyres", f"data.processor={setting.root / 'model'}", "model.arch.image_size=64"]
    with pytest.raises(ConfigError, match=r"cuts crops of 32 px, but the encoder is fed 64 px images"):
        calibrate(load_recipe(path, overrides))


@pytest.mark.distributed
def test_two_processes_give_the_same_crop_thresholds(setting, tmp_path):
    """gloo, launched by the CLI: 2 processes rank the same global batches of crops as one."""
    crops = ["data.crops=anyres", f"data.processor={setting.root / 'model'}", "data.global_batch_size=4"]
    single = ThresholdsFile.load(calibrate(load_recipe(recipe(setting, tmp_path / "one"), crops)))
    command = [sys.executable, "-m", "dymu_lightning", f"recipe={recipe(setting, tmp_path / 'two')}", *crops,
               "trainer.devices=2", "trainer.strategy=ddp"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    two = ThresholdsFile.load(tmp_path / "two" / "out" / "thresholds.json")
    assert two.world_size == 2 and two.images_seen == single.images_seen == CROPS
    assert two.inputs == single.inputs
    assert two.thresholds == pytest.approx(single.thresholds, abs=1e-6)


def thresholds_file(image_size: int, inputs: dict | None) -> ThresholdsFile:
    return ThresholdsFile(
        backbone="hf_siglip", num_layers=3, image_size=image_size, thresholds=[0.9, 0.9, None], r=[1, 1, 0],
        schedule={}, images_seen=1, global_batch_size=1, world_size=1, tokens={}, inputs=inputs,
        origin="t.json",
    )  # fmt: skip


def test_apply_dymu_refuses_thresholds_of_other_inputs():
    """On OneVision (crops of 32 px): whole images at another size and another crop grid are errors
    naming the file; whole images at the crop size a warning; the model's own crops pass."""
    from test_llava_anyres import tiny_model

    model = tiny_model("onevision")
    crops = {"kind": "anyres_crops", "processor": "m", "crop_size": 32, "image_grid_pinpoints": PINPOINTS}
    with pytest.raises(
        ValueError,
        match=r"^t.json: calibrated on whole images at 64 px, but this LlavaOnevisionForConditionalGeneration feeds "
        r"its vision tower AnyRes crops of 32 px; recalibrate with data.crops=anyres data.processor=",
    ):
        apply_dymu(model, thresholds_file(64, None))
    with pytest.raises(
        ValueError, match=r"^t.json: calibrated on AnyRes crops of 32 px on grid pinpoints \[\[32, 32\]\]"
    ):
        apply_dymu(model, thresholds_file(32, {**crops, "image_grid_pinpoints": [[32, 32]]}))
    with pytest.warns(UserWarning, match=r"^t.json: calibrated on whole images, not on the AnyRes crops this"):
        apply_dymu(model, thresholds_file(32, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_dymu(model, thresholds_file(32, crops))
