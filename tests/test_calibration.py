"""Calibration end to end: the Lightning job over webdataset shards, resumable, rank-independent."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tests_support import TINY_TIMM_ARCH as ARCH
from tests_support import assert_same_calibration, make_images, recipe_file, run

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.config import ConfigError, load_recipe
from dymu_lightning.core.calibration import GlobalBatchCut
from dymu_lightning.core.policy import local_batch_cut
from dymu_lightning.data import write_shards
from dymu_lightning.lit.run import check

FULL = 65  # 64 patches + CLS


def test_calibration_merges_exactly_b_times_r(tmp_path, shards):
    result = run(recipe_file(tmp_path, shards))
    assert result.images_seen == 10 and result.tokens["images"] == 10
    # Every global batch merged B * r edges per layer: the mean token count is exact.
    assert result.tokens["mean"] == FULL - 5 * 3
    assert result.tokens["min"] < result.tokens["max"]  # ... unevenly over images
    assert all(t is not None and t >= 0 for t in result.thresholds)
    assert result.extra["index_sum"] == sum(range(10))
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "tokens.png").is_file()


def test_resumed_run_equals_uninterrupted(tmp_path, shards):
    whole = run(recipe_file(tmp_path / "whole", shards))
    recipe = recipe_file(tmp_path / "parts", shards)
    first = run(recipe, "trainer.max_steps=1")
    assert first.images_seen == 4
    resumed = run(recipe)
    assert resumed.images_seen == 10
    assert resumed.thresholds == whole.thresholds
    assert resumed.tokens == whole.tokens


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, shards):
    """A real SIGKILL in the middle of the CLI run (after step 2 of 3), then the same command again."""
    whole = run(recipe_file(tmp_path / "whole", shards))
    recipe = recipe_file(tmp_path / "killed", shards)
    command = [sys.executable, "-m", "dymu_lightning", f"recipe={recipe}"]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DYMU_FAULT_KILL_AFTER_STEP": "2"})  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "out" / "thresholds.json").exists()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr and "from step 2" in resumed.stderr
    result = ThresholdsFile.load(tmp_path / "killed" / "out" / "thresholds.json")
    assert result.images_seen == 10 and result.extra["index_sum"] == sum(range(10))
    assert result.thresholds == pytest.approx(whole.thresholds, abs=1e-12)
    assert result.tokens == whole.tokens


def test_resume_refuses_a_state_from_another_run(tmp_path, shards):
    recipe = recipe_file(tmp_path, shards)
    run(recipe, "trainer.max_steps=1")
    with pytest.raises(ValueError, match=r"holds the state of a different calibration run \(differs in: r\)"):
        run(recipe, "schedule.r=4")


def test_global_cut_equals_single_process_cut():
    """Splitting a batch over fake processes and gathering local top-(k+1) finds the same cut."""
    torch.manual_seed(0)
    scores = torch.rand(8, 6)
    scores[2, 3] = float("-inf")
    expected = local_batch_cut(0, scores, 8 * 2)
    parts = scores.split(2)
    valid = torch.ones(2, dtype=torch.bool)
    tops = []
    for part in parts:  # each "rank" computes what it would send
        capture = GlobalBatchCut([2], valid, global_images=8, gather=lambda t: tops.append(t) or t)
        capture(0, part, k=0)
    gathered = torch.cat(tops)
    cut = GlobalBatchCut([2], valid, global_images=8, gather=lambda t: gathered)(0, parts[0], k=0)
    assert float(cut) == float(expected)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    paths = make_images(tmp_path / "images", 6)
    paths[3].write_bytes(paths[3].read_bytes()[:40])  # a truncated PNG
    write_shards(paths, tmp_path / "shards", shard_size=4)
    result = run(recipe_file(tmp_path, tmp_path / "shards"))
    assert result.extra["images_skipped"] == 1
    assert result.images_seen == 5 and result.tokens["images"] == 5
    assert result.extra["index_sum"] == sum(range(6)) - 3


def test_corrupt_image_is_an_error_when_strict(tmp_path):
    paths = make_images(tmp_path / "images", 6)
    paths[3].write_bytes(paths[3].read_bytes()[:40])
    write_shards(paths, tmp_path / "shards", shard_size=4)
    with pytest.raises(ValueError, match=r"sample .img003. \(global index 3\) in shard .*shard-000000\.tar"):
        run(recipe_file(tmp_path, tmp_path / "shards", strict=True))


def test_missing_shards_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run(recipe_file(tmp_path, missing))


def test_unknown_key_and_wrong_type_name_the_key_and_file(tmp_path, shards):
    recipe = recipe_file(tmp_path, shards)
    with pytest.raises(
        ConfigError, match=rf"{recipe}\): unknown key 'data.global_batchsize'; did you mean 'data.global_batch_size'\?"
    ):
        load_recipe(recipe, ["data.global_batchsize=8"])
    with pytest.raises(ConfigError, match=r"wrong type for 'schedule.r': Value 'many'"):
        load_recipe(recipe, ["schedule.r=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("global_batch_size", "global_batch_sise"))
    with pytest.raises(ConfigError, match=rf"recipe {bad}: unknown key 'data.global_batch_sise'; did you mean"):
        load_recipe(bad)


def test_thresholds_file_refuses_another_backbone(tmp_path, shards):
    result = run(recipe_file(tmp_path, shards))
    other = get_backbone("hf_siglip")
    model = other.build(other.tiny_configs()[0].config)
    with pytest.raises(
        ValueError,
        match=r"calibrated for backbone 'timm_vit' \(3 layers\); they cannot drive backbone 'hf_siglip' \(3 layers\)",
    ):
        result.check_matches(other, model)
    same = get_backbone("timm_vit")
    result.check_matches(same, same.build(ARCH))


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_thresholds_do_not_depend_on_the_number_of_processes(tmp_path, shards, world_size):
    """Real Lightning DDP (gloo on CPU), launched by the CLI as a user would, over uneven shards:
    the same global batches give the same thresholds, and every image is seen exactly once."""
    single = run(recipe_file(tmp_path / "one", shards))
    recipe = recipe_file(tmp_path / "many", shards)
    command = [
        sys.executable, "-m", "dymu_lightning", f"recipe={recipe}",
        f"trainer.devices={world_size}", "trainer.strategy=ddp",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert_same_calibration(tmp_path / "many" / "out", single, world_size)


def test_timeout_needs_ddp(tmp_path, shards):
    recipe = recipe_file(tmp_path, shards)
    with pytest.raises(ConfigError, match=r"trainer.timeout_s needs trainer.strategy=ddp, got 'auto'"):
        check(load_recipe(recipe, ["trainer.timeout_s=30"]))
    assert check(load_recipe(recipe, ["trainer.timeout_s=30", "trainer.strategy=ddp"])).trainer.timeout_s == 30
